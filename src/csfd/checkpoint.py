"""Training checkpoints, random-number-generator state and the run folder's config record.

A checkpoint (run_dir/checkpoints/<model>.ckpt) stores everything that a resumed fit needs to
continue as if it had never stopped: weights, optimiser, scheduler, GradScaler, the Python,
numpy and torch RNG states, and the position in training (epoch, batch within the epoch,
optimiser step, running loss). It is written atomically, so a killed process leaves either
the previous checkpoint or the new one.

run.json records the config hash of the run folder. A run folder is resumed only with the same
config; the error or warning lists the dotted keys whose values differ.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from csfd.config import ConfigError, ExperimentConfig
from csfd.io_utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class CheckpointSpec:
    """Checkpoint file, save interval and config hash of one fit."""

    path: Path
    every_steps: int  # save after every this many optimiser steps; 0 saves at epoch ends only
    config_hash: str


def capture_rng_state() -> dict:
    """Return the Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain types."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore states captured by `capture_rng_state`."""
    random.setstate(state["python"])
    saved = state["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], key, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically (temporary file, then os.replace)."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, config_hash: str, label: str) -> dict | None:
    """Return the checkpoint at `path`, or None when there is none.

    Raises ValueError when it belongs to another config or model, because continuing from it
    would silently mix two trainings.
    """
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {payload.get('format')!r} is not {CHECKPOINT_FORMAT}; delete it to start over")
    if payload.get("config_hash") != config_hash:
        raise ValueError(
            f"{path} was written with config hash {payload.get('config_hash')}, this run has {config_hash}; "
            "resume with the config of that run or delete the checkpoint"
        )
    if payload.get("label") != label:
        raise ValueError(f"{path} is a checkpoint of {payload.get('label')!r}, not of {label!r}; delete it to start over")
    return payload


def read_finished_stage(weights_path: Path, config_hash: str) -> dict | None:
    """Return the weights payload of a finished stage trained with this config, else None."""
    if not weights_path.is_file():
        return None
    payload = torch.load(weights_path, map_location="cpu", weights_only=True)
    if payload.get("config_hash") != config_hash:
        logger.info(
            "%s has config hash %s, this run %s: training that stage again", weights_path, payload.get("config_hash"), config_hash
        )
        return None
    if "fit_result" not in payload or "rng" not in payload:
        logger.info("%s has no training record (written by an older version): training that stage again", weights_path)
        return None
    return payload


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """List `key: old -> new` for every dotted key whose value differs between two plain dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{name}: <absent> -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{name}: {old[key]!r} -> <absent>")
            else:
                lines.extend(config_differences(old[key], new[key], name))
        return lines
    if isinstance(old, tuple):
        old = list(old)
    if isinstance(new, tuple):
        new = list(new)
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _recorded_differences(run_dir: Path, config: ExperimentConfig) -> list[str]:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return [f"(no {saved} to compare keys with)"]
    return config_differences(yaml.safe_load(saved.read_text()) or {}, config.to_dict())


def start_run_dir(config: ExperimentConfig, run_dir: Path, resume: bool) -> str:
    """Check and record the run folder's config before training; run on rank 0 only.

    Returns "fresh" or "resume". A folder whose run.json has this config hash is resumed (its
    checkpoints and finished stages are used) with or without `resume`. A folder of another
    config raises ConfigError with `resume`, because continuing would mix two configs. Without
    `resume` its checkpoints are deleted and training starts over, with a warning that lists
    the differing keys.
    """
    config_hash = config.hash()
    record = run_dir / RUN_FILE
    previous = json.loads(record.read_text()).get("config_hash") if record.is_file() else None
    if previous == config_hash:
        logger.info(
            "Resuming run folder %s (config hash %s): finished stages are loaded and unfinished ones "
            "continue from their last checkpoint; delete the folder to train from scratch",
            run_dir,
            config_hash,
        )
        return "resume"

    if previous is not None:
        differences = "\n  ".join(_recorded_differences(run_dir, config))
        if resume:
            raise ConfigError(
                f"cannot resume {run_dir}: it was trained with config hash {previous}, this config has "
                f"{config_hash}. Keys that differ (saved -> now):\n  {differences}\n"
                "Run with the saved config, or without --resume to train this fold again from scratch."
            )
        logger.warning(
            "Run folder %s has config hash %s, this config %s: training from scratch and deleting its "
            "checkpoints. Keys that differ (saved -> now):\n  %s",
            run_dir,
            previous,
            config_hash,
            differences,
        )
    elif resume:
        logger.warning("--resume: %s has no %s, so there is nothing to resume; training from scratch", run_dir, RUN_FILE)

    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"config_hash": config_hash, "name": config.name}, indent=2) + "\n")
    return "fresh"
