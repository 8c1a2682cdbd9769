"""Deadline guard for prediction: measured throughput, ETA and the cheaper paths near the budget.

Prediction runs each study on one of these paths:
- "model (all folds)": every loaded fold model;
- "model (fewer folds)": the first `fallback_folds` fold models only;
- "prior (no images)", "prior (failed)", "prior (deadline)": the prevalence prior.

The guard projects the finish time from the measured cost per slice and moves the remaining
studies to a cheaper path when the projection passes the budget. The paths only ever get
cheaper, in this order:
1. All folds while `elapsed + cost(all folds) * remaining slices <= budget`.
2. Fewer folds after that, for each study whose own cost still fits before the budget
   (`elapsed + cost(fewer folds) * its slices <= budget`).
3. The prior for the first study that no longer fits and for every study after it.
The first study always runs with all folds because it supplies the first measurement.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

PATH_ALL_FOLDS = "model (all folds)"
PATH_FEWER_FOLDS = "model (fewer folds)"
PATH_PRIOR_NO_IMAGES = "prior (no images)"
PATH_PRIOR_FAILED = "prior (failed)"
PATH_PRIOR_DEADLINE = "prior (deadline)"
PATHS = (PATH_ALL_FOLDS, PATH_FEWER_FOLDS, PATH_PRIOR_NO_IMAGES, PATH_PRIOR_FAILED, PATH_PRIOR_DEADLINE)


def count_slice_files(study_dir: Path) -> int:
    """Return the number of files in a study folder (one DICOM file per slice); 0 if it is missing."""
    try:
        with os.scandir(study_dir) as entries:
            return sum(1 for entry in entries if entry.is_file())
    except FileNotFoundError:
        return 0


@dataclass
class Throughput:
    """Running totals of the measured prediction cost.

    The cost of a study with f folds is modelled as `other_rate + model_rate * f` seconds per
    slice. `model_rate` comes from the time spent in the slice models, per slice and fold.
    `other_rate` is the rest of the wall time per slice, mostly waiting for the decode of the
    study; it is overestimated at first because the first study's decode overlaps nothing.
    """

    model_seconds: float = 0.0
    fold_slices: int = 0  # slices times the folds that ran on them
    other_seconds: float = 0.0
    slices: int = 0

    def record(self, n_slices: int, n_folds: int, wall_seconds: float, model_seconds: float) -> None:
        if n_slices < 1 or n_folds < 1:
            raise ValueError(f"a measured study needs at least one slice and one fold, got {n_slices} and {n_folds}")
        self.model_seconds += max(model_seconds, 0.0)
        self.fold_slices += n_slices * n_folds
        self.other_seconds += max(wall_seconds - model_seconds, 0.0)
        self.slices += n_slices

    @property
    def measured(self) -> bool:
        return self.slices > 0

    def seconds_per_slice(self, n_folds: int) -> float:
        """Return the projected wall seconds per slice with `n_folds` folds."""
        if not self.measured:
            raise ValueError("no study has been measured yet")
        return self.other_seconds / self.slices + self.model_seconds / self.fold_slices * n_folds


@dataclass
class DeadlineGuard:
    """Chooses each study's path from the elapsed time, the measured throughput and the budget.

    budget_s 0 disables the guard: every study with images runs with all folds. `start` is the
    clock value that the budget counts from (for a Kaggle kernel, the start of the script).
    """

    budget_s: float
    all_folds: int
    fallback_folds: int
    clock: Callable[[], float] = time.monotonic
    start: float | None = None
    throughput: Throughput = field(default_factory=Throughput)
    n_folds: int = 0  # folds of the current path; 0 once the prior is the only path left

    def __post_init__(self) -> None:
        if self.budget_s < 0:
            raise ValueError(f"budget_s: expected 0 (no budget) or more seconds, got {self.budget_s}")
        if self.all_folds < 1:
            raise ValueError(f"all_folds: expected 1 or more, got {self.all_folds}")
        if self.start is None:
            self.start = self.clock()
        self.fallback_folds = max(1, min(self.fallback_folds, self.all_folds))
        self.n_folds = self.all_folds

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def projected_total(self, n_folds: int, remaining_slices: int) -> float:
        """Return the projected elapsed seconds at the end if `remaining_slices` run with `n_folds` folds."""
        return self.elapsed() + self.throughput.seconds_per_slice(n_folds) * remaining_slices

    def choose(self, study_slices: int, remaining_slices: int) -> int:
        """Return the folds to run on the next study (0 means the prior), with `remaining_slices`
        the slices of that study and of every later study with images."""
        if not self.enabled or not self.throughput.measured or self.n_folds == 0:
            return self.n_folds
        if self.n_folds == self.all_folds and self.all_folds > self.fallback_folds:
            total = self.projected_total(self.all_folds, remaining_slices)
            if total <= self.budget_s:
                return self.n_folds
            logger.warning(
                "Deadline guard: with all %d folds the run would end after %.0f s, past the budget of %.0f s; "
                "the remaining studies use %d fold(s)",
                self.all_folds, total, self.budget_s, self.fallback_folds,
            )
            self.n_folds = self.fallback_folds
        total = self.projected_total(self.n_folds, study_slices)
        if total <= self.budget_s:
            return self.n_folds
        logger.warning(
            "Deadline guard: the next study (%d slices) would end after %.0f s, past the budget of %.0f s; "
            "it and every later study get the prior",
            study_slices, total, self.budget_s,
        )
        self.n_folds = 0
        return 0

    def record(self, n_slices: int, n_folds: int, wall_seconds: float, model_seconds: float) -> None:
        self.throughput.record(n_slices, n_folds, wall_seconds, model_seconds)

    def eta(self, remaining_slices: int) -> float | None:
        """Return the projected seconds left on the current path, or None before any measurement."""
        if not self.throughput.measured:
            return None
        if self.n_folds == 0:
            return 0.0
        return self.throughput.seconds_per_slice(self.n_folds) * remaining_slices


def path_of(n_folds: int, all_folds: int) -> str:
    """Return the path name of a study predicted with `n_folds` of `all_folds` folds."""
    if n_folds <= 0:
        return PATH_PRIOR_DEADLINE
    return PATH_ALL_FOLDS if n_folds >= all_folds else PATH_FEWER_FOLDS


def count_paths(paths: Iterable[str]) -> dict[str, int]:
    """Return the number of studies on each path, every path listed (zeros included), in PATHS order."""
    counts = Counter(paths)
    unknown = sorted(set(counts) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown prediction path(s) {unknown}; expected one of {list(PATHS)}")
    return {name: counts.get(name, 0) for name in PATHS}


def format_duration(seconds: float) -> str:
    """Format seconds as H:MM:SS."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
