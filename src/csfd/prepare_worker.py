"""The work of one prepare worker: decode one study, store it in the cache, return its report row.

Spawned workers import only this module and what it needs (no pandas, no tqdm), because each
worker pays its imports before its first study: pandas alone takes about 0.2 s.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from csfd import cache
from csfd.allocator import keep_freed_memory
from csfd.config import PrepareConfig
from csfd.dicom_io import DicomReadError
from csfd.io_utils import atomic_save_npy, atomic_write_text
from csfd.logs import setup_logging
from csfd.volume import PreparedStudy, load_study


@dataclass(frozen=True)
class StudyTask:
    """Arguments of prepare_study for one study; small, so it pickles cheaply to a worker process."""

    study_uid: str
    study_dir: str
    split: str
    studies_dir: str
    segmentation_path: str | None
    prepare: PrepareConfig
    readers: tuple[str, ...] = ("dicomsdl", "pydicom")


def marker_path(studies: Path, study_uid: str) -> Path:
    """Return the file that exists while a worker decodes the study and stays if the worker crashes."""
    return studies / f".{study_uid}.working"


def working_marker(task: StudyTask) -> Path:
    return marker_path(Path(task.studies_dir), task.study_uid)


def report_row(
    study_uid: str,
    split: str,
    status: str,
    record: dict | None = None,
    error: str = "",
    seconds: float = 0.0,
) -> dict:
    """Build one row of the prepare report (csfd.prepare.REPORT_COLUMNS) from a study's JSON record."""
    record = record or {}
    return {
        "StudyInstanceUID": study_uid,
        "split": split,
        "status": status,
        "n_slices": record.get("n_slices"),
        "rows": record.get("rows"),
        "cols": record.get("cols"),
        "transfer_syntaxes": ";".join(record.get("transfer_syntaxes", [])),
        "reader": ";".join(record.get("readers", [])),
        "reversed": record.get("reversed"),
        "irregular": record.get("irregular"),
        "warnings": " | ".join(record.get("warnings", [])),
        "error": error,
        "seconds": round(seconds, 3),
    }


def _study_record(study: PreparedStudy, task: StudyTask) -> dict:
    """Build the per-study JSON record; slices.csv and vertebra_labels.csv are rebuilt from these."""
    visibility = study.vertebra_visibility
    return {
        "StudyInstanceUID": study.study_uid,
        "split": task.split,
        "status": "done",
        "shape": list(study.volume.shape),
        "dtype": "uint8",
        "image_size": task.prepare.image_size,
        "window_center": task.prepare.window_center,
        "window_width": task.prepare.window_width,
        "n_slices": study.n_slices,
        "rows": study.original_shape[0],
        "cols": study.original_shape[1],
        "pixel_spacing": list(study.pixel_spacing),
        "slice_spacing": study.slice_spacing,
        "reversed": study.reversed,
        "irregular": study.irregular,
        "readers": study.readers,
        "transfer_syntaxes": study.transfer_syntaxes,
        "warnings": study.warnings,
        "segmentation": Path(task.segmentation_path).name if task.segmentation_path else None,
        "segmentation_error": study.segmentation_error,
        "vertebra_visibility": None if visibility is None else visibility.tolist(),
        "slice_numbers": study.slice_numbers.tolist(),
        "z": study.z.tolist(),
    }



def prepare_study(task: StudyTask) -> dict:
    """Decode one study, write its .npy and then its JSON, and return its report row (never the volume).

    A marker file exists while the study is decoded. A decoder that crashes the process leaves
    it behind, so that csfd.prepare_runner can retry that study alone.
    """
    marker = working_marker(task)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        return _prepare_study(task)
    finally:
        marker.unlink(missing_ok=True)


def _prepare_study(task: StudyTask) -> dict:
    start = time.perf_counter()
    try:
        study = load_study(task.study_dir, task.prepare, task.segmentation_path, task.readers)
    except (DicomReadError, ValueError) as error:
        return report_row(task.study_uid, task.split, "failed", error=f"{type(error).__name__}: {error}",
                          seconds=time.perf_counter() - start)

    record = _study_record(study, task)
    if study.irregular and task.prepare.irregular_series == "drop":
        return report_row(task.study_uid, task.split, "dropped", record, seconds=time.perf_counter() - start)

    studies = Path(task.studies_dir)
    # An older JSON must not outlive the .npy it describes: a run killed between the two writes
    # would otherwise leave a new volume under old settings that the next run skips as done.
    cache.record_path(studies, task.study_uid).unlink(missing_ok=True)
    atomic_save_npy(cache.volume_path(studies, task.study_uid), study.volume)
    record["seconds"] = round(time.perf_counter() - start, 3)
    # The JSON goes last: its presence marks the study as done.
    atomic_write_text(cache.record_path(studies, task.study_uid), json.dumps(record, separators=(",", ":")))
    return report_row(task.study_uid, task.split, "done", record, error=study.segmentation_error,
                      seconds=time.perf_counter() - start)


def init_worker(log_level: int = logging.WARNING) -> None:
    """Set up a worker process: one OpenCV thread, the parent's log format, and csfd.allocator.

    Each worker is one core, so OpenCV gets one thread.
    """
    cv2.setNumThreads(1)
    keep_freed_memory()
    # A spawned process starts with no logging set up, and its warnings would print bare.
    setup_logging(log_level)
