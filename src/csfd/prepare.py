"""Prepare stage: decode every study once into the uint8 slice cache that training reads.

Worker processes decode the studies in parallel with csfd.volume.load_study. Each worker
writes its study's .npy and then its JSON, and returns only a report row. The cache layout
and the resume rule are described in csfd.cache and docs/DATA_FORMATS.md.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from csfd import cache
from csfd.cache import StudyCache
from csfd.config import ExperimentConfig, PrepareConfig
from csfd.io_utils import atomic_write_csv
from csfd.hounsfield import window_to_uint8
from csfd.prepare_runner import run_tasks
from csfd.prepare_worker import StudyTask, marker_path, prepare_study, report_row
from csfd.volume import PreparedStudy, load_study, resize_keep_aspect

# Other stages import the reader and the in-memory loader from here, the stage's entry point.
__all__ = [
    "PreparedStudy",
    "StudyCache",
    "load_study",
    "prepare_split",
    "prepare_study",
    "resize_keep_aspect",
    "run_prepare",
    "window_to_uint8",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
STATUSES = ("done", "skipped", "failed", "excluded", "dropped")
REPORT_COLUMNS = (
    "StudyInstanceUID", "split", "status", "n_slices", "rows", "cols", "transfer_syntaxes",
    "reader", "reversed", "irregular", "warnings", "error", "seconds",
)
COMPETITION_LAYOUT = (
    "train.csv, train_images/<StudyInstanceUID>/<slice_number>.dcm, "
    "segmentations/<StudyInstanceUID>.nii, test.csv, test_images/<StudyInstanceUID>/<slice_number>.dcm"
)


def find_segmentations(data_dir: Path) -> dict[str, Path]:
    """Map StudyInstanceUID to its segmentation NIfTI (.nii or .nii.gz) in data_dir/segmentations."""
    folder = data_dir / "segmentations"
    if not folder.is_dir():
        logger.warning("%s not found: vertebra_labels.csv will be empty", folder)
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        for suffix in (".nii.gz", ".nii"):
            if path.name.endswith(suffix):
                found[path.name[: -len(suffix)]] = path
    return found


def _available_cores() -> int:
    # The cores this process may run on, which a container or taskset can set below os.cpu_count().
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _remove_leftover_temporaries(studies: Path) -> None:
    # A killed run leaves `.<name>.<random>.tmp` files from atomic writes; they never count as done.
    # NOTE: two prepare runs on the same cache folder at once would delete each other's files here.
    leftovers = list(studies.glob(".*.tmp"))
    if leftovers:
        size = sum(path.stat().st_size for path in leftovers)
        logger.info("removing %d unfinished temporary file(s) (%.1f MB) from %s", len(leftovers), size / 1e6, studies)
        for path in leftovers:
            path.unlink(missing_ok=True)


def _cached_status(record: dict, prepare: PrepareConfig) -> str:
    if record["StudyInstanceUID"] in prepare.exclude_studies:
        return "excluded"
    if record.get("irregular") and prepare.irregular_series == "drop":
        return "dropped"
    return "skipped"


def prepare_split(
    data_dir: str | Path,
    cache_dir: str | Path,
    split: str,
    config: ExperimentConfig,
    study_uids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Prepare every study of one split (or only `study_uids`) into the cache; return the report.

    Studies already prepared with the same settings are skipped. slices.csv, report.csv and,
    for train, vertebra_labels.csv are rewritten for every study in the cache, so a cached
    study outside `study_uids` appears as skipped.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    prepare = config.prepare
    if prepare.workers < 0:
        raise ValueError(f"prepare.workers must be 0 (all cores) or more, got {prepare.workers}")
    data_dir = Path(data_dir)
    images_dir = data_dir / f"{split}_images"
    if not images_dir.is_dir():
        missing = f"data folder {data_dir} does not exist" if not data_dir.is_dir() else f"{images_dir} not found"
        raise FileNotFoundError(
            f"{missing}. The prepare stage expects the Kaggle competition layout in "
            f"{data_dir}: {COMPETITION_LAYOUT}. Download and unzip the competition data there, "
            "or point to it with --data (DATA= with make) or paths.data_dir."
        )
    studies = cache.studies_dir(cache_dir, split)
    studies.mkdir(parents=True, exist_ok=True)
    _remove_leftover_temporaries(studies)

    available = {path.name: path for path in images_dir.iterdir() if path.is_dir()}
    selected = sorted(available) if study_uids is None else sorted(set(study_uids))
    segmentations = find_segmentations(data_dir) if split == "train" else {}

    rows, tasks = [], []
    for uid in selected:
        if uid in prepare.exclude_studies:
            logger.info("excluding study %s: it is in prepare.exclude_studies", uid)
            rows.append(report_row(uid, split, "excluded"))
            continue
        if uid not in available:
            rows.append(report_row(uid, split, "failed", error=f"study folder not found: {images_dir / uid}"))
            continue
        segmentation = segmentations.get(uid)
        segmentation_name = None if segmentation is None else segmentation.name
        record = cache.read_record(studies, uid)
        if record is not None and cache.record_matches(record, studies, prepare, segmentation_name):
            rows.append(report_row(uid, split, _cached_status(record, prepare), record))
            # A run killed after the JSON and before the marker's removal leaves a stale marker.
            marker_path(studies, uid).unlink(missing_ok=True)
            continue
        segmentation_path = None if segmentation is None else str(segmentation)
        tasks.append(StudyTask(uid, str(available[uid]), split, str(studies), segmentation_path, prepare))

    workers = prepare.workers or _available_cores()
    start = time.perf_counter()
    decoded_slices = 0
    with logging_redirect_tqdm(), tqdm(total=len(tasks), desc=f"prepare {split}", unit="study") as bar:
        for row in run_tasks(tasks, workers):
            rows.append(row)
            if row["status"] == "failed":
                logger.warning("study %s failed: %s", row["StudyInstanceUID"], row["error"])
            elif row["status"] == "dropped":
                logger.warning("study %s dropped (irregular series): %s", row["StudyInstanceUID"], row["warnings"])
            elif row["error"]:
                logger.warning("study %s: %s", row["StudyInstanceUID"], row["error"])
            if row["status"] == "done":
                decoded_slices += int(row["n_slices"])
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"{bar.n / elapsed:.2f} studies/s, {decoded_slices / elapsed:.0f} slices/s")
    elapsed = time.perf_counter() - start

    # Cached studies outside this selection still belong to the split's tables.
    listed = {row["StudyInstanceUID"] for row in rows}
    foreign = []
    for path in sorted(studies.glob("*.json")):
        uid = path.stem
        if uid in listed:
            continue
        record = cache.read_record(studies, uid)
        if record is not None and cache.record_matches(record, studies, prepare):
            rows.append(report_row(uid, split, _cached_status(record, prepare), record))
            if uid not in available:
                foreign.append(uid)
    if foreign:
        logger.warning(
            "%d cached studies in %s are not in %s (e.g. %s). They stay in this split's tables. "
            "Give each data folder its own paths.cache_dir to keep them apart",
            len(foreign), studies, images_dir, foreign[0],
        )

    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS)).sort_values("StudyInstanceUID", ignore_index=True)
    report = report.astype({"n_slices": "Int64", "rows": "Int64", "cols": "Int64"})
    _write_tables(studies, split, report)
    _log_summary(split, report, decoded_slices, elapsed)
    return report


def _write_tables(studies: Path, split: str, report: pd.DataFrame) -> None:
    usable = report.loc[report["status"].isin(["done", "skipped"]), "StudyInstanceUID"]
    records = [cache.read_record(studies, uid) for uid in usable]
    records = [record for record in records if record is not None]
    root = studies.parent
    atomic_write_csv(cache.slices_frame(records), root / "slices.csv")
    atomic_write_csv(report, root / "report.csv")
    if split == "train":
        atomic_write_csv(cache.vertebra_labels_frame(records), root / "vertebra_labels.csv")


def _log_summary(split: str, report: pd.DataFrame, decoded_slices: int, seconds: float) -> None:
    counts = report["status"].value_counts()
    rate = decoded_slices / seconds if seconds > 0 else 0.0
    logger.info(
        "prepare %s: %d done, %d skipped, %d failed, %d excluded, %d dropped; "
        "%d slices decoded in %.1f s (%.0f slices/s)",
        split, *(int(counts.get(status, 0)) for status in STATUSES), decoded_slices, seconds, rate,
    )


def run_prepare(
    config: ExperimentConfig,
    splits: Sequence[str] = SPLITS,
    data_dir: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Prepare each split of `splits` into config.paths.cache_dir; return the report per split."""
    data_dir = Path(data_dir if data_dir is not None else config.paths.data_dir)
    reports = {}
    for split in splits:
        reports[split] = prepare_split(data_dir, config.paths.cache_dir, split, config)
        report_csv = cache.split_dir(config.paths.cache_dir, split) / "report.csv"
        logger.info("prepare %s: report written to %s", split, report_csv)
    return reports
