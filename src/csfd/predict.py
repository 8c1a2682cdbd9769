"""Predict test_images with a run's fold models and stacker, and write submission.csv.

Every row_id of test.csv gets a value, in test.csv's order. A study with no image folder, or
one that fails to read or predict, gets the prevalence prior and a warning naming it. A
background thread decodes the next study while the models run on the current one, and the
deadline guard (csfd.deadline) moves the remaining studies to fewer folds, then to the prior,
when the projected time would pass predict.time_budget_s. The Kaggle kernel runs this same
code (csfd.kernel).

Besides the submission, the output folder gets test_slices.csv (slice predictions, the
out-of-fold file's layout) and study_paths.csv (StudyInstanceUID, path).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from csfd.config import ExperimentConfig, PrepareConfig
from csfd.constants import PREVALENCE, TARGETS
from csfd.deadline import (
    PATH_PRIOR_DEADLINE,
    PATH_PRIOR_FAILED,
    PATH_PRIOR_NO_IMAGES,
    DeadlineGuard,
    count_paths,
    count_slice_files,
    format_duration,
    path_of,
)
from csfd.dicom_io import DicomReadError
from csfd.inference import check_same_preparation, load_fold_models, predict_volume, slice_predictions_frame
from csfd.io_utils import atomic_write_csv
from csfd.trainer import resolve_device

logger = logging.getLogger(__name__)

# Errors that make one study fall back to the prior instead of stopping the run.
STUDY_ERRORS = (DicomReadError, ValueError, OSError, RuntimeError)


def read_test_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"test.csv not found: {path}; point DATA at a competition-format folder")
    test = pd.read_csv(path)
    missing = {"row_id", "StudyInstanceUID", "prediction_type"} - set(test.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    bad = sorted(set(test["prediction_type"]) - set(TARGETS))
    if bad:
        raise ValueError(f"{path}: unknown prediction_type(s) {', '.join(bad)}; expected C1..C7 or patient_overall")
    return test


def choose_method(config: ExperimentConfig, run_root: Path) -> str:
    """Return "stacker" or "aggregate": the configured one, or for "auto" the better by CV."""
    summary_path = run_root / "stack" / "summary.json"
    if config.predict.method == "aggregate":
        return "aggregate"
    if not summary_path.is_file():
        if config.predict.method == "stacker":
            raise FileNotFoundError(f"predict.method is stacker but {summary_path} is missing; run `make stack` first")
        logger.warning("No stacker found at %s; using the plain aggregation", summary_path.parent)
        return "aggregate"
    if config.predict.method == "stacker":
        return "stacker"
    best = json.loads(summary_path.read_text()).get("better_method", "aggregate")
    logger.info("Using %s, the better method by out-of-fold CV (%s)", best, summary_path)
    return best


class StudyPrefetcher:
    """Decodes studies with load_study in one background thread, up to `depth` studies ahead.

    Each study is decoded once, for every fold and both models. depth 0 decodes in the
    caller's thread. Folders that are None (no images) are never decoded.

    NOTE: decoding runs in this process. dicomsdl 0.109 still crashes the process on an
    uncompressed slice cut short inside its pixel data, which would end the kernel. Prepare
    isolates such crashes (csfd.prepare_runner), but prediction does not.
    """

    def __init__(self, folders: list[Path | None], prepare_config: PrepareConfig, depth: int) -> None:
        self.folders = folders
        self.prepare_config = prepare_config
        self.depth = depth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csfd-decode") if depth > 0 else None
        self._futures: dict[int, Future] = {}

    def _submit_ahead(self, first: int, count: int) -> None:
        """Queue the decode of the first `count` studies with images from index `first` on."""
        from csfd.prepare import load_study

        index, queued = first, 0
        while index < len(self.folders) and queued < count:
            if self.folders[index] is not None:
                if index not in self._futures:
                    self._futures[index] = self._executor.submit(load_study, self.folders[index], self.prepare_config)
                queued += 1
            index += 1

    def load(self, index: int):
        """Return study `index` as a PreparedStudy; raises what load_study raised for it."""
        from csfd.prepare import load_study

        if self._executor is None:
            return load_study(self.folders[index], self.prepare_config)
        self._submit_ahead(index, 1)
        future = self._futures.pop(index)
        # Queue the next studies before waiting, so that they decode while the models run on this one.
        self._submit_ahead(index + 1, self.depth)
        return future.result()

    def stop(self) -> None:
        """Cancel the decodes not yet started and decode nothing more."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self._futures.clear()

    close = stop


def _log_progress(done: int, total: int, guard: DeadlineGuard, remaining_slices: int) -> None:
    eta = guard.eta(remaining_slices)
    budget = format_duration(guard.budget_s) if guard.enabled else "none"
    if eta is None:
        logger.info("Studies %d/%d done after %s (budget %s)", done, total, format_duration(guard.elapsed()), budget)
        return
    logger.info(
        "Studies %d/%d done after %s; %.3f s/slice with %d fold(s); ETA %s for %d slices, ends at %s (budget %s)",
        done,
        total,
        format_duration(guard.elapsed()),
        guard.throughput.seconds_per_slice(max(guard.n_folds, 1)),
        guard.n_folds,
        format_duration(eta),
        remaining_slices,
        format_duration(guard.elapsed() + eta),
        budget,
    )


def predict_slices(
    config: ExperimentConfig,
    study_uids: list[str],
    images_dir: Path,
    fold_models,
    device,
    guard: DeadlineGuard | None = None,
):
    """Return (slices, study_info, paths): slice predictions and per-study info of the studies
    that ran a model, and each study's path (csfd.deadline.PATHS)."""
    predict_config = config.predict
    guard = guard or DeadlineGuard(predict_config.time_budget_s, len(fold_models), predict_config.fallback_folds)
    folders: list[Path | None] = [images_dir / uid if (images_dir / uid).is_dir() else None for uid in study_uids]
    slice_counts = [count_slice_files(folder) if folder is not None else 0 for folder in folders]
    remaining_slices = sum(slice_counts)
    prefetcher = StudyPrefetcher(folders, fold_models[0].config.prepare, predict_config.prefetch)
    frames, infos, paths = [], [], {}
    last_log: float | None = None
    try:
        with logging_redirect_tqdm():
            # disable=None: no bar without a terminal (a Kaggle log); the progress lines carry the ETA there.
            for index, uid in enumerate(tqdm(study_uids, desc="predict studies", disable=None)):
                if folders[index] is None:
                    logger.warning("Study %s has no folder in %s; it gets the prior", uid, images_dir)
                    paths[uid] = PATH_PRIOR_NO_IMAGES
                    continue
                n_folds = guard.choose(slice_counts[index], remaining_slices)
                remaining_slices -= slice_counts[index]
                if n_folds == 0:
                    paths[uid] = PATH_PRIOR_DEADLINE
                    prefetcher.stop()
                    continue

                started = guard.clock()
                try:
                    study = prefetcher.load(index)
                    model_started = guard.clock()
                    visibility, fracture = predict_volume(
                        study.volume, fold_models[:n_folds], predict_config.batch_size, device, predict_config.slice_stride
                    )
                    model_seconds = guard.clock() - model_started
                except STUDY_ERRORS as error:
                    logger.warning("Study %s failed (%s: %s); it gets the prior", uid, type(error).__name__, error)
                    paths[uid] = PATH_PRIOR_FAILED
                    continue
                guard.record(study.n_slices, n_folds, guard.clock() - started, model_seconds)
                frames.append(slice_predictions_frame(uid, study.slice_numbers, visibility, fracture))
                infos.append({"StudyInstanceUID": uid, "n_slices": study.n_slices, "slice_spacing": study.slice_spacing})
                paths[uid] = path_of(n_folds, len(fold_models))

                if last_log is None or guard.clock() - last_log >= predict_config.log_interval_s:
                    _log_progress(index + 1, len(study_uids), guard, remaining_slices)
                    last_log = guard.clock()
    finally:
        prefetcher.close()
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    study_info = pd.DataFrame(infos, columns=["StudyInstanceUID", "n_slices", "slice_spacing"]).set_index("StudyInstanceUID")
    return slices, study_info, paths


def study_predictions(slices: pd.DataFrame, study_info: pd.DataFrame, method: str, run_root: Path) -> pd.DataFrame:
    """Return wide study predictions (StudyInstanceUID, patient_overall, C1..C7)."""
    from csfd.features import aggregate_predictions, build_features

    if slices.empty:
        return pd.DataFrame(columns=["StudyInstanceUID", *TARGETS])
    if method == "stacker":
        from csfd.stack import predict_stacker

        try:
            return predict_stacker(build_features(slices, study_info), run_root / "stack", method="stacker")
        except (ValueError, FileNotFoundError, lgb.basic.LightGBMError) as error:
            # The plain aggregation needs no model file, so the submission still uses the slice models.
            logger.warning("The stacker in %s failed (%s: %s); using the plain aggregation", run_root / "stack",
                           type(error).__name__, error)
    return aggregate_predictions(slices)


def build_submission(test: pd.DataFrame, wide: pd.DataFrame, clip: tuple[float, float]) -> pd.DataFrame:
    """Return row_id/fractured in test.csv's order; studies absent from `wide` get the prior."""
    wide = wide.set_index("StudyInstanceUID") if "StudyInstanceUID" in wide.columns else wide
    values = []
    for uid, target in zip(test["StudyInstanceUID"], test["prediction_type"]):
        value = wide.at[uid, target] if uid in wide.index else PREVALENCE[target]
        values.append(float(value))
    fractured = np.clip(np.asarray(values, dtype=float), *clip)
    return pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": fractured})


def run_predict(
    config: ExperimentConfig,
    output: Path,
    start: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> pd.DataFrame:
    """Predict test.csv's studies and write the submission to `output`.

    predict.time_budget_s counts from `start`, a `clock` value (default: now). The Kaggle
    kernel passes its own start time, so that installing and loading count too.
    """
    output = Path(output)
    guard_start = clock() if start is None else start
    data_dir = Path(config.paths.data_dir)
    test = read_test_csv(data_dir / "test.csv")
    device = resolve_device(config.device)
    run_root = config.run_dir()
    fold_models = load_fold_models(run_root, config.predict.folds, device)
    check_same_preparation(fold_models)
    method = choose_method(config, run_root)
    study_uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    logger.info(
        "Predicting %d studies with folds %s (%s) on %s, slice stride %d",
        len(study_uids), [m.fold for m in fold_models], method, device, config.predict.slice_stride,
    )
    guard = DeadlineGuard(
        config.predict.time_budget_s, len(fold_models), config.predict.fallback_folds, clock=clock, start=guard_start
    )
    if guard.enabled:
        logger.info(
            "Deadline guard: budget %s from the start, %s already spent; fallback %d fold(s), then the prior",
            format_duration(guard.budget_s), format_duration(guard.elapsed()), guard.fallback_folds,
        )

    slices, study_info, paths = predict_slices(config, study_uids, data_dir / "test_images", fold_models, device, guard)
    if not slices.empty:
        atomic_write_csv(slices, output.parent / "test_slices.csv", float_format="%.5f")
    atomic_write_csv(
        pd.DataFrame({"StudyInstanceUID": list(paths), "path": list(paths.values())}), output.parent / "study_paths.csv"
    )
    wide = study_predictions(slices, study_info, method, run_root)
    submission = build_submission(test, wide, (config.stack.clip_min, config.stack.clip_max))
    atomic_write_csv(submission, output)
    counts = count_paths(paths.values())
    logger.info(
        "Wrote %s: %d rows after %s; studies per path: %s",
        output, len(submission), format_duration(guard.elapsed()),
        ", ".join(f"{name} {count}" for name, count in counts.items()),
    )
    return submission
