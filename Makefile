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

.PHONY: venv sample prepare folds train train-all stack predict score demo test clean-sample

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

train: venv
	$(CSFD) train --config $(CONFIG) --fold $(FOLD) $(ARGS)

train-all: venv
	for fold in $(FOLDS); do $(CSFD) train --config $(CONFIG) --fold $$fold $(ARGS) || exit 1; done

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
	@echo "CV table: output/runs/sample/stack/cv.csv"
	@echo "Submission: output/runs/sample/submission.csv"

test: venv
	.venv/bin/pytest -q

clean-sample:
	rm -rf input/sample output/cache/sample output/folds/sample.csv output/runs/sample
