"""csfd.allocator: freed memory stays in the process, so reusing it costs no page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

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
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    default = faults_per_slice("default")
    kept = faults_per_slice("keep")
    assert kept["applied"] is True
    # 43 and 0 on the benchmark VM (glibc 2.36).
    assert default["faults_per_slice"] > 10
    assert kept["faults_per_slice"] < 1


def test_missing_mallopt_returns_false(monkeypatch):
    from csfd import allocator

    class NoMallopt:
        pass

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: NoMallopt())
    assert allocator.keep_freed_memory() is False
