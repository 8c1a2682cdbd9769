"""Shared test fixtures: paths to the real data beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def competition_dir() -> Path:
    path = SHARED_DATA / "competition"
    if not (path / "train.csv").is_file():
        pytest.skip(f"real competition label files not found at {path}")
    return path


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    path = SHARED_DATA / "real-ct"
    if not path.is_dir():
        pytest.skip(f"real CT files not found at {path}")
    return path


def tiny_overrides(root: Path) -> list[str]:
    """Config overrides for a run small enough for the CPU test suite (seconds per fold)."""
    return [
        f"paths.data_dir={root / 'data'}",
        f"paths.cache_dir={root / 'cache'}",
        f"paths.folds_csv={root / 'folds.csv'}",
        f"paths.runs_dir={root / 'runs'}",
        f"paths.submission_csv={root / 'submission.csv'}",
        "prepare.image_size=48",
        "prepare.workers=1",
        "folds.n_folds=2",
        "vertebra.backbone=test_efficientnet",
        "vertebra.image_size=48",
        "vertebra.epochs=1",
        "vertebra.batch_size=32",
        "fracture.backbone=test_efficientnet",
        "fracture.image_size=48",
        "fracture.epochs=1",
        "fracture.batch_size=32",
        "stack.num_boost_round=40",
        "stack.early_stopping_rounds=10",
        "stack.params={objective: binary, learning_rate: 0.1, num_leaves: 4, min_data_in_leaf: 3, verbose: -1, num_threads: 1}",
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A complete tiny run: sample data, cache, folds, two trained folds and a stacker.

    Returns the experiment config; the run folder is config.run_dir().
    """
    from csfd.config import load_config
    from csfd.folds import write_folds
    from csfd.prepare import run_prepare
    from csfd.sample import build_sample
    from csfd.stack import run_stack
    from csfd.train import train_fold

    root = tmp_path_factory.mktemp("tiny_run")
    real_ct = SHARED_DATA / "real-ct"
    build_sample(
        root / "data", n_train=40, n_test=2, image_size=64, seed=0, real_ct_dir=real_ct if real_ct.is_dir() else None
    )
    config = load_config(REPO / "configs" / "sample.yaml", [*tiny_overrides(root), "name=tiny"])
    run_prepare(config)
    write_folds(root / "data" / "train.csv", root / "folds.csv", config.folds.n_folds, config.folds.seed)
    for fold in range(config.folds.n_folds):
        train_fold(config, fold)
    run_stack(config)
    return config
