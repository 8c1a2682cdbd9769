"""Atomic writes: all or nothing, with the file mode a plain open() gives."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from csfd.io_utils import atomic_path, atomic_save_npy, atomic_write_text


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_files_get_open_mode(tmp_path):
    text, array = tmp_path / "a.json", tmp_path / "b.npy"
    atomic_write_text(text, "{}")
    atomic_save_npy(array, np.zeros(3, np.uint8))
    expected = 0o666 & ~current_umask()
    assert stat.S_IMODE(text.stat().st_mode) == expected
    assert stat.S_IMODE(array.stat().st_mode) == expected


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
