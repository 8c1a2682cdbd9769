"""Data-parallel training: 2 gloo processes on the CPU against one process with the same batches."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from conftest import REPO
from csfd.checkpoint import CheckpointSpec, load_checkpoint
from csfd.config import SliceModelConfig
from csfd.distributed import (
    ShardedBatchSampler,
    distributed_session,
    get_world_size,
    is_distributed,
    run_on_main,
    select_backend,
)
from csfd.trainer import fit, predict, resolve_device
from test_checkpoint import build_tiny_data, run_overrides

WORLD = 2
# (items, grad_accum_steps): 10 items leave a last global batch of 2 (one per rank), 9 items a
# last batch of 1, so rank 1 gets a zero-weight padding item there.
CASES = [(10, 1), (9, 1), (10, 2)]
# Two processes sum the same per-item gradients in another order than one process does.
ATOL = 1e-6
RTOL = 1e-5


def _dataset(n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    targets = (torch.rand(n, 2, generator=generator) > 0.5).float()
    weights = 0.5 + torch.rand(n, 2, generator=generator)  # unequal, so the global normalisation matters
    return TensorDataset(images, targets, weights)


class _NoBatchNormNet(nn.Module):
    """GroupNorm instead of BatchNorm and no dropout: each item's output does not depend on the
    other items of its batch or on the RNG, so one process and two compute the same function.
    With BatchNorm each rank would normalise over its half batch."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _run_case(n_items: int, accum: int, checkpoint_path: Path | None = None) -> dict:
    torch.manual_seed(0)
    model = _NoBatchNormNet()
    config = SliceModelConfig(epochs=2, batch_size=4, lr=1e-2, num_workers=0, grad_accum_steps=accum, checkpoint_every_steps=1)
    valid = _dataset(7, seed=1)
    spec = CheckpointSpec(checkpoint_path, 1, "hash") if checkpoint_path is not None else None
    result = fit(model, _dataset(n_items), valid, config, torch.device("cpu"), seed=5, label="ddp", checkpoint=spec)
    output = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "probabilities": predict(model, valid, 3, 0, torch.device("cpu")),
        "train_loss": result.train_loss,
        "valid_loss": result.valid_loss,
        "steps": result.optimizer_steps,
    }
    if spec is not None:
        # A second fit finds the final checkpoint (read on rank 0, sent to rank 1) and trains no more.
        torch.manual_seed(1)
        restored = _NoBatchNormNet()
        fit(restored, _dataset(n_items), valid, config, torch.device("cpu"), seed=5, label="ddp", checkpoint=spec)
        output["restored_state"] = restored.state_dict()
    return output


def _refit_case() -> dict:
    """Fit the same model twice (as self-training rounds do): the second DDP wrapper must work alone."""
    torch.manual_seed(0)
    model = _NoBatchNormNet()
    config = SliceModelConfig(epochs=1, batch_size=4, lr=1e-2, num_workers=0)
    for seed in (1, 2):
        fit(model, _dataset(10, seed=seed), None, config, torch.device("cpu"), seed=seed, label="refit")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _raise_on_main():
    raise ValueError("failure on rank 0")


def _ddp_worker(rank: int, port: int, out_dir: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_session("cpu") as context:
        assert context.backend == "gloo"
        assert get_world_size() == WORLD
        results = {case: _run_case(*case, out_dir / f"{case[0]}-{case[1]}.ckpt") for case in CASES}
        results["refit"] = _refit_case()
        try:
            run_on_main(_raise_on_main)
            error = None
        except ValueError as raised:
            error = str(raised)
        (out_dir / f"error{rank}.txt").write_text(str(error))
        if rank == 0:
            torch.save(results, out_dir / "ddp.pt")
    assert not is_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return torch.load(out_dir / "ddp.pt", weights_only=False), out_dir


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one(ddp_results, case):
    with _threads(1):
        single = _run_case(*case)
    ddp = ddp_results[0][case]
    assert ddp["steps"] == single["steps"]
    for key, value in single["state"].items():
        assert torch.allclose(ddp["state"][key], value, atol=ATOL, rtol=RTOL), f"{key}: max diff {(ddp['state'][key] - value).abs().max()}"
    # The trained weights moved far more than the tolerance, so the comparison means something.
    torch.manual_seed(0)
    initial = _NoBatchNormNet().state_dict()
    assert (single["state"]["head.weight"] - initial["head.weight"]).abs().max() > 100 * ATOL
    # Gathered predictions: original order, the padding duplicate of 7 items on 2 ranks dropped.
    assert ddp["probabilities"].shape == (7, 2)
    assert np.allclose(ddp["probabilities"], single["probabilities"], atol=1e-5)
    assert ddp["valid_loss"] == pytest.approx(single["valid_loss"], rel=1e-5)
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)


def test_second_fit_of_same_model_matches(ddp_results):
    with _threads(1):
        single = _refit_case()
    for key, value in single.items():
        assert torch.allclose(ddp_results[0]["refit"][key], value, atol=ATOL, rtol=RTOL), key


def test_rank0_checkpoint_restores_on_all_ranks(ddp_results):
    results, out_dir = ddp_results
    for case in CASES:
        payload = load_checkpoint(out_dir / f"{case[0]}-{case[1]}.ckpt", "hash", "ddp")
        assert payload["world_size"] == WORLD
        assert payload["progress"]["epoch"] == 2
        for key, value in results[case]["state"].items():
            assert torch.equal(results[case]["restored_state"][key], value)


def test_rank0_error_raised_on_every_rank(ddp_results):
    _, out_dir = ddp_results
    for rank in range(WORLD):
        assert (out_dir / f"error{rank}.txt").read_text() == "failure on rank 0"


@pytest.mark.parametrize(("n_items", "batch", "world"), [(10, 4, 2), (9, 4, 2), (17, 6, 3), (5, 8, 4), (8, 4, 4)])
def test_shards_form_single_process_batches(n_items, batch, world):
    single = ShardedBatchSampler(n_items, batch, seed=3)
    single.set_epoch(2)
    shards = []
    for rank in range(world):
        sampler = ShardedBatchSampler(n_items, batch, rank, world, seed=3)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    expected = list(single)
    seen = sorted(i for b in expected for i in b)
    assert len(set(seen)) == len(seen)
    if n_items >= batch:
        # A short last batch is dropped: full batches only.
        assert len(seen) == (n_items // batch) * batch
        assert all(len(b) == batch for b in expected)
    else:
        assert seen == list(range(n_items))
    for rank_batches in shards:
        assert len(rank_batches) == len(expected)  # every rank runs the same number of steps
    for index, batch_items in enumerate(expected):
        parts = [shards[rank][index] for rank in range(world)]
        real = sorted(i for part in parts for i in part if i < n_items)
        padding = [i - n_items for part in parts for i in part if i >= n_items]
        assert real == sorted(batch_items)
        assert all(part for part in parts)
        assert set(padding) <= set(batch_items)


def test_sampler_order_depends_on_seed_and_epoch_only():
    sampler = ShardedBatchSampler(20, 4, seed=7)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    sampler.set_start_batch(3)
    assert list(sampler) == first[3:]
    assert len(sampler) == 2
    with pytest.raises(ValueError, match="outside"):
        sampler.set_start_batch(6)


def test_sampler_drops_short_last_batch():
    # 10 items in batches of 4 leave 2 over, 1 per rank on 2 ranks, which BatchNorm rejects.
    # They are dropped, and different items are dropped in each epoch.
    sampler = ShardedBatchSampler(10, 4, seed=1)
    assert sampler.n_batches == 2
    left_out = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches] == [4, 4]
        left_out.append(set(range(10)) - {i for b in batches for i in b})
    assert len({frozenset(s) for s in left_out}) > 1
    # Fewer items than one batch: the one short batch is kept.
    assert list(ShardedBatchSampler(3, 4, seed=1)) != []
    assert ShardedBatchSampler(3, 4, seed=1).n_batches == 1
    # Without shuffling (not used for training) every item stays.
    assert ShardedBatchSampler(10, 4, shuffle=False).n_batches == 3


def test_single_process_has_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_session("auto") as context:
        assert context is None
        assert not dist.is_initialized()
        assert get_world_size() == 1


def test_gpu_ranks_select_nccl(monkeypatch):
    # NOTE: no GPU here; this runs the NCCL path only up to device selection and the group set-up.
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.setdefault("destroyed", True))
    root_level = logging.getLogger().level
    with distributed_session("auto") as context:
        assert context.backend == "nccl"
        assert context.device == torch.device("cuda", 1)
        assert logging.getLogger().level == logging.WARNING  # rank 1 logs warnings only
    assert calls["init"] == {"backend": "nccl", "init_method": "env://", "rank": 1, "world_size": 2}
    assert calls["set_device"] == torch.device("cuda", 1)
    assert calls["destroyed"] is True
    assert logging.getLogger().level == root_level


def test_backend_selection_errors(monkeypatch):
    assert select_backend("cpu", 0) == ("gloo", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend("auto", 0) == ("gloo", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        select_backend("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 1 has no GPU"):
        select_backend("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_batch_must_split_evenly():
    from csfd.distributed import per_rank_batch_size

    assert per_rank_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        per_rank_batch_size(32, 3)


def test_make_passes_torchrun_variables():
    command = ["make", "-n", "-C", str(REPO), "train", "FOLD=3", "GPUS=4", "NNODES=2", "NODE_RANK=1"]
    output = subprocess.run(
        [*command, "MASTER_ADDR=10.0.0.5", "MASTER_PORT=29611", "RESUME=1"], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in output.splitlines() if "csfd train" in line)
    assert line.startswith(".venv/bin/torchrun --nnodes 2 --node_rank 1 --master_addr 10.0.0.5 --master_port 29611 --nproc_per_node 4 -m csfd train --resume")
    assert "--fold 3" in line
    plain = subprocess.run(["make", "-n", "-C", str(REPO), "train", "FOLD=3"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in plain.splitlines() if "csfd train" in line)
    assert line.startswith(".venv/bin/python -m csfd train ")
    assert "torchrun" not in line
    assert "--resume" not in line


def test_torchrun_trains_a_fold(tmp_path):
    """`torchrun --nproc_per_node 2 -m csfd train` on the CPU: files from rank 0 only, full OOF."""
    from csfd.cache import StudyCache
    from csfd.train import SliceTable

    fold = build_tiny_data(tmp_path)
    # 48 px keeps a 2x2 final feature map: a rank's last batch may hold a single item, and
    # BatchNorm in training mode needs more than one value per channel.
    overrides = [*run_overrides(tmp_path, tmp_path / "runs"), "device=cpu", "fracture.epochs=1"]
    overrides += ["vertebra.image_size=48", "fracture.image_size=48"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m", "csfd", "train"]
    command += ["--config", str(REPO / "configs" / "sample.yaml"), "--fold", str(fold), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0 of 2, backend gloo" in result.stderr

    run_dir = tmp_path / "runs" / "resume" / f"fold{fold}"
    for name in ("run.json", "config.yaml", "vertebra.pt", "fracture.pt", "pseudo_labels.csv", "oof_slices.csv", "metrics.json"):
        assert (run_dir / name).is_file(), f"{name} missing"
    log = (run_dir / "train.log").read_text()
    assert log.count("Training resume fold") == 1  # rank 1 does not log to the file

    folds = pd.read_csv(tmp_path / "folds.csv")
    valid = sorted(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
    expected = SliceTable(StudyCache(tmp_path / "cache", "train").slices, valid).frame
    oof = pd.read_csv(run_dir / "oof_slices.csv")
    assert oof[["StudyInstanceUID", "slice_number"]].equals(expected[["StudyInstanceUID", "slice_number"]].reset_index(drop=True))
    assert oof.filter(like="frac_").notna().all().all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["cv"]["aggregate"]["per_study"])
