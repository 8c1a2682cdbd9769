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
