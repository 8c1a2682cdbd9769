"""Checkpoints and resuming: in-process interruptions and a real killed `python -m csfd train`."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from conftest import REPO, tiny_overrides
from csfd.checkpoint import (
    CheckpointSpec,
    capture_rng_state,
    config_differences,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    start_run_dir,
)
from csfd.cli import main as cli_main
from csfd.config import ConfigError, SliceModelConfig, load_config, save_config
from csfd.trainer import fit, train_stage
from csfd.training_loop import TrainLoop


def _toy_dataset(n: int = 14) -> TensorDataset:
    """Images, targets and per-output loss weights, as the trainer expects."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    targets = (torch.rand(n, 2, generator=generator) > 0.5).float()
    weights = 0.5 + torch.rand(n, 2, generator=generator)
    return TensorDataset(images, targets, weights)


class _Net(nn.Module):
    """A small conv net with dropout, so that a wrong torch RNG state after resuming shows."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _config(**overrides) -> SliceModelConfig:
    base = SliceModelConfig(epochs=3, batch_size=4, lr=1e-2, num_workers=0, checkpoint_every_steps=1)
    return dataclasses.replace(base, **overrides)


class _Interrupted(Exception):
    pass


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    ("accum", "every", "stop_after_saves"),
    [
        (1, 1, 2),  # mid-epoch, after the second optimiser step
        (1, 1, 3),  # the epoch-end checkpoint of epoch 1 (3 batches of 11 items, last one short)
        (2, 1, 3),  # accumulation over 2 batches, with a partial last group
        (3, 0, 1),  # checkpoints at epoch ends only
    ],
)
def test_resume_matches_uninterrupted(tmp_path, monkeypatch, accum, every, stop_after_saves):
    config = _config(grad_accum_steps=accum, checkpoint_every_steps=every)
    dataset, valid = _toy_dataset(), _toy_dataset(5)
    device = torch.device("cpu")

    torch.manual_seed(0)
    reference = _Net()
    expected = fit(reference, dataset, valid, config, device, seed=3, label="toy")
    expected_rng = torch.rand(3)

    spec = CheckpointSpec(tmp_path / "toy.ckpt", every, "hash-a")
    saves = []
    original_save = TrainLoop.save

    def save_then_stop(loop, checkpoint):
        original_save(loop, checkpoint)
        saves.append(dict(vars(loop.progress)))
        if len(saves) == stop_after_saves:
            raise _Interrupted

    torch.manual_seed(0)
    monkeypatch.setattr(TrainLoop, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        fit(_Net(), dataset, valid, config, device, seed=3, label="toy", checkpoint=spec)
    monkeypatch.setattr(TrainLoop, "save", original_save)
    assert spec.path.is_file()
    assert saves[-1]["step"] < expected.optimizer_steps

    # A fresh model with other weights and another RNG state: everything must come from the checkpoint.
    torch.manual_seed(123)
    resumed = _Net()
    result = fit(resumed, dataset, valid, config, device, seed=3, label="toy", checkpoint=spec)
    assert torch.equal(_flat(resumed), _flat(reference))
    assert torch.equal(torch.rand(3), expected_rng)
    assert result.optimizer_steps == expected.optimizer_steps
    assert result.final_lr == expected.final_lr
    assert result.train_loss == pytest.approx(expected.train_loss, rel=1e-12)
    assert result.valid_loss == pytest.approx(expected.valid_loss, rel=1e-12)


def test_checkpoint_records_position(tmp_path):
    spec = CheckpointSpec(tmp_path / "toy.ckpt", 0, "hash-a")
    fit(_Net(), _toy_dataset(), None, _config(epochs=2), torch.device("cpu"), seed=0, label="toy", checkpoint=spec)
    payload = load_checkpoint(spec.path, "hash-a", "toy")
    assert payload["progress"]["epoch"] == 2
    assert payload["progress"]["batch"] == 0
    assert payload["progress"]["step"] == 6  # 2 epochs of 3 full batches of 4 (14 items, 2 dropped)
    assert payload["total_steps"] == 6
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "rng"}
    assert set(payload["rng"]) >= {"python", "numpy", "torch"}


def test_checkpoint_of_other_config_rejected(tmp_path):
    path = tmp_path / "toy.ckpt"
    save_checkpoint(path, {"label": "toy", "config_hash": "hash-a"})
    with pytest.raises(ValueError, match="config hash hash-a"):
        load_checkpoint(path, "hash-b", "toy")
    with pytest.raises(ValueError, match="not of 'fracture'"):
        load_checkpoint(path, "hash-a", "fracture")
    assert load_checkpoint(tmp_path / "none.ckpt", "hash-a", "toy") is None


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "toy.ckpt"
    save_checkpoint(path, {"label": "toy", "config_hash": "h", "value": 1})

    def write_half_then_fail(payload, target):
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"label": "toy", "config_hash": "h", "value": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, "h", "toy")["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["toy.ckpt"]


def test_rng_state_roundtrip(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.normal()  # leaves a cached Gaussian in the legacy numpy state
    save_checkpoint(tmp_path / "rng.ckpt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    restore_rng_state(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert again[0] == expected[0]
    assert again[1] == expected[1]
    assert again[2] == expected[2]
    assert torch.equal(again[3], expected[3])


def test_config_differences_lists_dotted_keys():
    old = {"seed": 1, "fracture": {"epochs": 2, "lr": 0.1}, "stack": {"params": {"num_leaves": 7}}, "gone": 1}
    new = {"seed": 1, "fracture": {"epochs": 3, "lr": 0.1}, "stack": {"params": {"num_leaves": 5}}, "added": [1]}
    assert config_differences(old, new) == [
        "added: <absent> -> [1]",
        "fracture.epochs: 2 -> 3",
        "gone: 1 -> <absent>",
        "stack.params.num_leaves: 7 -> 5",
    ]
    assert config_differences(new, new) == []


def test_run_dir_config_checks(tmp_path, caplog):
    first = load_config(None, [f"paths.runs_dir={tmp_path}"])
    run_dir = first.run_dir(0)
    assert start_run_dir(first, run_dir, resume=True) == "fresh"
    assert json.loads((run_dir / "run.json").read_text())["config_hash"] == first.hash()
    save_config(first, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "fracture.ckpt").write_bytes(b"x")

    assert start_run_dir(first, run_dir, resume=False) == "resume"
    assert (run_dir / "checkpoints" / "fracture.ckpt").is_file()

    changed = load_config(None, [f"paths.runs_dir={tmp_path}", "fracture.epochs=3", "vertebra.lr=0.01"])
    with pytest.raises(ConfigError) as error:
        start_run_dir(changed, run_dir, resume=True)
    assert "fracture.epochs: 10 -> 3" in str(error.value)
    assert "vertebra.lr: 0.001 -> 0.01" in str(error.value)
    assert (run_dir / "checkpoints" / "fracture.ckpt").is_file()

    with caplog.at_level("WARNING"):
        assert start_run_dir(changed, run_dir, resume=False) == "fresh"
    assert "fracture.epochs: 10 -> 3" in caplog.text
    assert not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "run.json").read_text())["config_hash"] == changed.hash()


def test_finished_stage_not_retrained(tmp_path, monkeypatch):
    config = _config(epochs=1)
    dataset = _toy_dataset()
    meta = {"in_chans": 3, "num_outputs": 2}
    torch.manual_seed(0)
    first = _Net()
    result = train_stage(first, dataset, None, config, torch.device("cpu"), 0, "toy", run_dir=tmp_path, config_hash="h1", weights_meta=meta)
    after_first = torch.rand(2)
    assert (tmp_path / "toy.pt").is_file()
    assert not (tmp_path / "checkpoints" / "toy.ckpt").exists()

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr("csfd.trainer.fit", no_fit)
    torch.manual_seed(99)
    second = _Net()
    again = train_stage(second, dataset, None, config, torch.device("cpu"), 0, "toy", run_dir=tmp_path, config_hash="h1", weights_meta=meta)
    assert torch.equal(_flat(second), _flat(first))
    assert again == result
    # The RNG state at the end of training is restored, so later stages start identically.
    assert torch.equal(torch.rand(2), after_first)

    with pytest.raises(AssertionError, match="trained again"):
        train_stage(_Net(), dataset, None, config, torch.device("cpu"), 0, "toy", run_dir=tmp_path, config_hash="h2", weights_meta=meta)


# --- A real process killed with SIGKILL in the middle of training, then resumed ---------------


def build_tiny_data(root: Path) -> int:
    """Write sample data, cache and folds of 12 training studies at 48 px under `root`.

    Returns a fold whose training folds contain segmented studies (the vertebra model needs them).
    """
    import pandas as pd

    from csfd.folds import write_folds
    from csfd.prepare import run_prepare
    from csfd.sample import build_sample

    build_sample(root / "data", n_train=12, n_test=1, image_size=48, seed=0, workers=1)
    config = load_config(REPO / "configs" / "sample.yaml", tiny_overrides(root))
    run_prepare(config, splits=("train",))
    folds = write_folds(root / "data" / "train.csv", root / "folds.csv", config.folds.n_folds, config.folds.seed)
    segmented = set(pd.read_csv(root / "cache" / "train" / "vertebra_labels.csv")["StudyInstanceUID"])
    usable = [k for k in range(config.folds.n_folds) if segmented & set(folds.loc[folds["fold"] != k, "StudyInstanceUID"])]
    assert usable, "no fold of the tiny sample has a segmented training study"
    return usable[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("resume_data")
    return root, build_tiny_data(root)


def run_overrides(root: Path, runs_dir: Path) -> list[str]:
    """Config overrides of the tiny resumable run: a checkpoint after every optimiser step."""
    return [
        *tiny_overrides(root),
        f"paths.runs_dir={runs_dir}",
        "name=resume",
        "vertebra.image_size=32",
        "vertebra.batch_size=16",
        "vertebra.checkpoint_every_steps=1",
        "fracture.image_size=32",
        "fracture.batch_size=16",
        "fracture.epochs=2",
        "fracture.checkpoint_every_steps=1",
    ]


def train_command(root: Path, runs_dir: Path, fold: int, *extra: str) -> list[str]:
    """The `python -m csfd train` command line of the tiny resumable run."""
    config = str(REPO / "configs" / "sample.yaml")
    return [sys.executable, "-m", "csfd", "train", "--config", config, "--fold", str(fold), *extra, *run_overrides(root, runs_dir)]


def single_thread_env() -> dict:
    # One thread per process, so two runs share the CPU without oversubscription and compute alike.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=handle)


def test_killed_run_resumes_identically(tiny_data, tmp_path):
    root, fold = tiny_data
    reference = _start(train_command(root, tmp_path / "reference", fold), tmp_path / "reference.log")

    killed_dir = tmp_path / "killed" / "resume" / f"fold{fold}"
    checkpoint = killed_dir / "checkpoints" / "fracture.ckpt"
    victim = _start(train_command(root, tmp_path / "killed", fold), tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while not checkpoint.is_file():
        log = (tmp_path / "killed.log").read_text()
        assert victim.poll() is None, f"training ended before a fracture checkpoint appeared:\n{log[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at {checkpoint} after 120 s:\n{log[-3000:]}"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL

    # The kill landed inside the fracture fit, after the vertebra stage finished.
    assert (killed_dir / "vertebra.pt").is_file()
    assert not (killed_dir / "fracture.pt").exists()
    assert not (killed_dir / "metrics.json").exists()
    progress = torch.load(checkpoint, weights_only=True)["progress"]
    assert progress["step"] >= 1
    assert progress["epoch"] < 2

    resumed = subprocess.run(
        train_command(root, tmp_path / "killed", fold, "--resume"), env=single_thread_env(), capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Stage vertebra already finished" in resumed.stderr
    assert "Resuming fracture from" in resumed.stderr

    assert reference.wait(timeout=180) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference_dir = tmp_path / "reference" / "resume" / f"fold{fold}"
    for name in ("vertebra.pt", "fracture.pt"):
        expected = torch.load(reference_dir / name, weights_only=True)["state_dict"]
        actual = torch.load(killed_dir / name, weights_only=True)["state_dict"]
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs after resuming"
    expected_metrics = json.loads((reference_dir / "metrics.json").read_text())
    actual_metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert actual_metrics["cv"] == expected_metrics["cv"]
    assert actual_metrics["fracture"]["train_loss"] == pytest.approx(expected_metrics["fracture"]["train_loss"], rel=1e-9)
    assert not (killed_dir / "checkpoints" / "fracture.ckpt").exists()


def test_resume_with_changed_config_fails(tiny_data, tmp_path, caplog):
    root, fold = tiny_data
    run_dir = tmp_path / "runs" / "resume" / f"fold{fold}"
    run_dir.mkdir(parents=True)
    saved = load_config(REPO / "configs" / "sample.yaml", [*run_overrides(root, tmp_path / "runs"), "fracture.epochs=5"])
    save_config(saved, run_dir / "config.yaml")
    (run_dir / "run.json").write_text(json.dumps({"config_hash": saved.hash()}))
    arguments = train_command(root, tmp_path / "runs", fold, "--resume")[3:]  # after `python -m csfd`
    with caplog.at_level("ERROR"):
        assert cli_main(arguments) == 2
    assert "cannot resume" in caplog.text
    assert "fracture.epochs: 5 -> 2" in caplog.text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["fracture"]["epochs"] == 5
