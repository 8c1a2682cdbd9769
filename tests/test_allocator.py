"""csfd.allocator: freed memory stays in the process, so reusing it costs no page faults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from csfd import allocator, prepare_runner, prepare_worker

SRC = Path(__file__).resolve().parents[1] / "src"

# The allocation pattern of a prepare worker. Per slice, it frees the decoded words, the
# windowed slice and the resize sums, and keeps a 384 x 384 slice. Per study, it stacks the
# kept slices into one volume and frees them. The script counts minor page faults per slice
# after a first study.
SCRIPT = """
import json, resource, sys
import numpy as np
from csfd.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

def study():
    slices = []
    for _ in range(128):
        words, windowed, sums = (np.ones(n * 1024, dtype=np.uint8) for n in (512, 256, 384))
        slices.append(np.ones(144 * 1024, dtype=np.uint8))
        del words, windowed, sums
    return np.stack(slices).sum()

study()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    study()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults_per_slice": faults / 384}))
"""


def faults_per_slice(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # this tree's csfd, not an installed one
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    default = faults_per_slice("default")
    tuned = faults_per_slice("keep")
    assert tuned["applied"] is True
    # 43 and 0 on the benchmark VM (glibc 2.36), and 0.79 with the trim threshold alone.
    assert default["faults_per_slice"] > 10
    assert tuned["faults_per_slice"] < 0.25


def test_missing_mallopt_returns_false(monkeypatch):
    class NoMallopt:
        pass

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: NoMallopt())
    assert allocator.keep_freed_memory() is False


class FakeMallopt:
    """A mallopt that records its calls and accepts mmap thresholds up to `max_mmap` bytes."""

    def __init__(self, max_mmap: int) -> None:
        self.max_mmap = max_mmap
        self.calls: list[tuple[int, int]] = []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return int(parameter != allocator.M_MMAP_THRESHOLD or value <= self.max_mmap)


def patch_mallopt(monkeypatch, mallopt: FakeMallopt) -> None:
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": mallopt})())


def test_rejected_mmap_threshold_falls_back(monkeypatch):
    mallopt = FakeMallopt(max_mmap=allocator.DOCUMENTED_MAX_MMAP_THRESHOLD)
    patch_mallopt(monkeypatch, mallopt)
    assert allocator.keep_freed_memory() is True
    assert mallopt.calls == [
        (allocator.M_TRIM_THRESHOLD, allocator.KEEP_BYTES),
        (allocator.M_MMAP_THRESHOLD, allocator.KEEP_BYTES),
        (allocator.M_MMAP_THRESHOLD, allocator.DOCUMENTED_MAX_MMAP_THRESHOLD),
    ]


def test_prepare_processes_keep_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(prepare_worker, "keep_freed_memory", lambda: calls.append("worker"))
    monkeypatch.setattr(prepare_runner, "keep_freed_memory", lambda: calls.append("in-process"))
    monkeypatch.setattr(prepare_worker, "setup_logging", lambda level: None)
    monkeypatch.setattr(prepare_worker.cv2, "setNumThreads", lambda threads: None)
    prepare_worker.init_worker()
    assert list(prepare_runner._run_in_process([], workers=1)) == []
    assert calls == ["worker", "in-process"]
