"""Predict test_images with a run's fold models and stacker, and write submission.csv.

Every row_id of test.csv gets a value, in test.csv's order. A study with no image folder, or
one that fails to read or predict, gets the prevalence prior and a warning naming it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from csfd.config import ExperimentConfig
from csfd.constants import PREVALENCE, TARGETS
from csfd.dicom_io import DicomReadError
from csfd.inference import check_same_preparation, load_fold_models, predict_volume, slice_predictions_frame
from csfd.io_utils import atomic_write_csv
from csfd.trainer import resolve_device

logger = logging.getLogger(__name__)


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


def predict_slices(config: ExperimentConfig, study_uids: list[str], images_dir: Path, fold_models, device):
    """Return slice predictions and per-study info of the studies that could be read, and
    the path each study took (model or prior)."""
    from csfd.prepare import load_study

    prepare_config = fold_models[0].config.prepare
    frames, infos, paths = [], [], {}
    for uid in tqdm(study_uids, desc="predict studies"):
        folder = images_dir / uid
        if not folder.is_dir():
            logger.warning("Study %s has no folder in %s; it gets the prior", uid, images_dir)
            paths[uid] = "prior (no images)"
            continue
        try:
            study = load_study(folder, prepare_config)
            visibility, fracture = predict_volume(study.volume, fold_models, config.predict.batch_size, device)
        except (DicomReadError, ValueError, OSError, RuntimeError) as error:
            logger.warning("Study %s failed (%s: %s); it gets the prior", uid, type(error).__name__, error)
            paths[uid] = "prior (failed)"
            continue
        frames.append(slice_predictions_frame(uid, study.slice_numbers, visibility, fracture))
        infos.append({"StudyInstanceUID": uid, "n_slices": study.n_slices, "slice_spacing": study.slice_spacing})
        paths[uid] = "model"
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

        return predict_stacker(build_features(slices, study_info), run_root / "stack", method="stacker")
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


def run_predict(config: ExperimentConfig, output: Path) -> pd.DataFrame:
    data_dir = Path(config.paths.data_dir)
    test = read_test_csv(data_dir / "test.csv")
    device = resolve_device(config.device)
    run_root = config.run_dir()
    fold_models = load_fold_models(run_root, config.predict.folds, device)
    check_same_preparation(fold_models)
    method = choose_method(config, run_root)
    logger.info("Predicting %d studies with folds %s (%s)", test["StudyInstanceUID"].nunique(), [m.fold for m in fold_models], method)

    study_uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    slices, study_info, paths = predict_slices(config, study_uids, data_dir / "test_images", fold_models, device)
    if not slices.empty:
        atomic_write_csv(slices, run_root / "test_slices.csv", float_format="%.5f")
    wide = study_predictions(slices, study_info, method, run_root)
    submission = build_submission(test, wide, (config.stack.clip_min, config.stack.clip_max))
    atomic_write_csv(submission, output)
    counts = Counter(paths.values())
    logger.info("Wrote %s: %d rows; studies per path: %s", output, len(submission), dict(counts))
    return submission
