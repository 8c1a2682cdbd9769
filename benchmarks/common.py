"""Helpers shared by the benchmarks: machine description, load average, timing and result files."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

RESULTS_DIR = Path("output/bench")
PACKAGES = (
    "numpy", "torch", "timm", "opencv-python-headless", "pydicom", "pylibjpeg",
    "pylibjpeg-libjpeg", "dicomsdl",
)


def cpu_model() -> str:
    """Return the first "model name" of /proc/cpuinfo, or platform.processor() elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    """Return MemTotal of /proc/meminfo in GiB, or None where that file does not exist."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return None


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict:
    """Describe the machine and the software that a benchmark ran on."""
    memory = memory_gib()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores": available_cores(),
        "memory_gib": None if memory is None else round(memory, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }


def wait_for_quiet_machine(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> float:
    """Wait until the 1-minute load average is below `max_load` or `max_wait_s` passed; return it.

    Other processes on the machine take cores from the benchmark, so the numbers are only
    comparable at a low load. The load average is recorded with every result either way.
    """
    deadline = time.monotonic() + max_wait_s
    load = load_average()[0]
    while load >= max_load and time.monotonic() < deadline:
        logger.info("1-minute load average %.2f >= %.2f; waiting %.0f s before measuring", load, max_load, poll_s)
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        load = load_average()[0]
    if load >= max_load:
        logger.warning("measuring at a 1-minute load average of %.2f (wanted below %.2f)", load, max_load)
    return load


def peak_rss_mib() -> dict[str, float]:
    """Return the peak resident set size of this process and of its waited-for children, in MiB.

    On Linux ru_maxrss is in KiB. For children it is the largest single child, not the sum.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "largest_child": round(children, 1)}


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs of one measurement, each over `items` items."""

    items: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Items per second of the median run."""
        return self.items / self.median_s

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how much the runs disagree."""
        return (max(self.seconds) - min(self.seconds)) / self.median_s


class CpuMeter:
    """Measure wall time and the CPU time of this process and its waited-for children over a block.

    `cores_used` = CPU seconds / wall seconds. On an otherwise idle machine a run that can use n
    cores reaches about n, so a lower value shows that other processes took cores from it.
    """

    def __enter__(self) -> "CpuMeter":
        self._start_times = os.times()
        self._start_wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        end = os.times()
        self.wall_s = time.perf_counter() - self._start_wall
        self.cpu_s = sum(getattr(end, name) - getattr(self._start_times, name)
                         for name in ("user", "system", "children_user", "children_system"))

    @property
    def cores_used(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def time_repeated(run: Callable[[], object], items: int, repeats: int, warmup: int = 1) -> Timing:
    """Call `run` `warmup` times untimed, then `repeats` times timed; each call handles `items` items."""
    for _ in range(warmup):
        run()
    timing = Timing(items)
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timing.seconds.append(time.perf_counter() - start)
    return timing


def format_table(rows: list[dict], columns: Iterable[str]) -> str:
    """Render rows as a Markdown table with the given columns; floats get 3 significant digits."""
    columns = list(columns)

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, rows: list[dict], results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write `payload` as <name>.json and `rows` as <name>.csv under `results_dir`; return both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}.json"
    csv_path = results_dir / f"{name}.csv"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def build_synthetic_cache(cache_dir: Path, n_studies: int, n_slices: int, size: int, seed: int = 0) -> list[str]:
    """Write random uint8 volumes and slices.csv in the prepared-cache layout; return the study UIDs."""
    import numpy as np
    import pandas as pd

    from csfd import cache

    rng = np.random.default_rng(seed)
    studies = cache.studies_dir(cache_dir, "train")
    studies.mkdir(parents=True, exist_ok=True)
    uids, frames = [], []
    for index in range(n_studies):
        uid = f"1.2.826.0.1.3680043.97.{index + 1}"
        np.save(cache.volume_path(studies, uid), rng.integers(0, 256, size=(n_slices, size, size), dtype=np.uint8))
        frames.append(pd.DataFrame({"StudyInstanceUID": uid, "slice_number": np.arange(1, n_slices + 1),
                                    "position_index": np.arange(n_slices), "z": -np.arange(n_slices, dtype=float)}))
        uids.append(uid)
    pd.concat(frames).to_csv(cache.split_dir(cache_dir, "train") / "slices.csv", index=False)
    return uids
