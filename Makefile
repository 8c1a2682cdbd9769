# Stages of the pipeline; each runs on its own. Variables:
#   EXP     experiment name, configs/$(EXP).yaml (default: default)
#   FOLD    fold index for train, -1 for all data (default: 0)
#   DATA    competition-format folder (overrides paths.data_dir)
#   ARGS    extra config overrides, for example ARGS="fracture.epochs=2"
PYTHON := .venv/bin/python
EXP ?= default
CONFIG ?= configs/$(EXP).yaml
FOLD ?= 0
FOLDS ?= 0 1 2 3 4
DATA ?=
ARGS ?=
DATA_ARG = $(if $(DATA),--data $(DATA))
CSFD = $(PYTHON) -m csfd

.PHONY: venv sample prepare folds train train-all stack predict demo test clean-sample

venv: .venv/.installed

.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	.venv/bin/pip install -q -r requirements-dev.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

sample: venv
	$(CSFD) sample

prepare: venv
	$(CSFD) prepare --config $(CONFIG) $(DATA_ARG) $(ARGS)

folds: venv
	$(CSFD) folds --config $(CONFIG) $(ARGS)

# Stage 1. GPUS=n starts n processes per node with torchrun (DistributedDataParallel, batch_size
# stays the global batch). On several nodes, also set NNODES, NODE_RANK, MASTER_ADDR and
# MASTER_PORT on each node. RESUME=1 continues from the run folder's last checkpoint and fails
# when the run folder has another config.
GPUS ?=
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
RESUME ?=
TORCHRUN = .venv/bin/torchrun --nnodes $(NNODES) --node_rank $(NODE_RANK) --master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT) --nproc_per_node $(GPUS) -m csfd
TRAIN = $(if $(GPUS),$(TORCHRUN),$(CSFD)) train $(if $(RESUME),--resume)

train: venv
	$(TRAIN) --config $(CONFIG) --fold $(FOLD) $(ARGS)

train-all: venv
	for fold in $(FOLDS); do $(TRAIN) --config $(CONFIG) --fold $$fold $(ARGS) || exit 1; done

stack: venv
	$(CSFD) stack --config $(CONFIG) $(ARGS)

predict: venv
	$(CSFD) predict --config $(CONFIG) $(DATA_ARG) $(ARGS)

# The whole pipeline on the built-in synthetic sample, on the CPU.
demo: venv
	$(CSFD) sample
	$(CSFD) prepare --config configs/sample.yaml
	$(CSFD) folds --config configs/sample.yaml
	$(CSFD) train --config configs/sample.yaml --fold all
	$(CSFD) stack --config configs/sample.yaml
	$(CSFD) predict --config configs/sample.yaml
	@echo "Out-of-fold score of the stacked predictions on the sample:"
	$(CSFD) score --labels input/sample/train.csv --predictions output/runs/sample/stack/oof_predictions.csv
	$(CSFD) leaderboard --runs output/runs
	@echo "CV table: output/runs/sample/stack/cv.csv"
	@echo "Submission: output/runs/sample/submission.csv"

test: venv
	.venv/bin/pytest -q

clean-sample:
	rm -rf input/sample output/cache/sample output/folds/sample.csv output/runs/sample

# Kaggle submission folders of a trained run under output/kaggle (docs/KAGGLE.md).
# RUN names the experiment (configs/$(RUN).yaml, default: EXP).
RUN ?= $(EXP)
.PHONY: kernel
kernel: venv
	$(CSFD) kernel --config configs/$(RUN).yaml $(ARGS)

# Local CV leaderboard of every run under output/runs: output/leaderboard.{csv,md,*.png}.
.PHONY: leaderboard report
leaderboard: venv
	$(CSFD) leaderboard --runs output/runs

# Visual report of one run into output/runs/$(RUN)/report/index.html; STUDY=<uid> picks the study shown.
RUN ?= $(EXP)
STUDY ?=
report: venv
	$(CSFD) report --config configs/$(RUN).yaml $(if $(STUDY),--study $(STUDY)) $(ARGS)

# Throughput benchmarks (BENCHMARKS.md); results in output/bench/. BENCH_ARGS passes options,
# for example BENCH_ARGS="--max-wait-min 10" to wait for a quiet machine first.
BENCH_ARGS ?=
.PHONY: bench bench-prepare
bench-prepare: venv
	$(PYTHON) -m benchmarks.bench_prepare $(BENCH_ARGS)

bench: venv
	$(PYTHON) -m benchmarks.bench_speed $(BENCH_ARGS)

# Label-fraction study of semi-supervised stage 1 (docs/SSL_STUDY.md): supervised vs self-training
# at ssl.study.fractions x ssl.study.seeds on ssl.study.folds. SSL_CONFIG picks the experiment;
# the default runs on the synthetic sample, built first when input/sample is missing.
SSL_CONFIG ?= configs/sample.yaml
.PHONY: ssl-study
ssl-study: venv
	if [ "$(SSL_CONFIG)" = configs/sample.yaml ] && [ ! -f input/sample/train.csv ]; then $(CSFD) sample; fi
	$(CSFD) prepare --config $(SSL_CONFIG) --splits train
	$(CSFD) folds --config $(SSL_CONFIG)
	$(CSFD) ssl-study --config $(SSL_CONFIG) $(ARGS)
