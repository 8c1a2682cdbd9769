"""Visual report of one run: classification metrics, the vertebra model, one study and its Grad-CAM.

Written into <runs_dir>/<experiment>/report/:
```
index.html                       links every figure and table below (relative links, no external assets)
classification_metrics.csv       one row per target: threshold (max F1 on OOF), confusion counts, scores
confusion_matrices.png, roc_curves.png, calibration.png
vertebra_confusion.csv/.png      vertebra model, argmax of vis_C1..vis_C7 against the segmentation
studies/<uid>/profile.png        slice-by-slice vertebra and fracture probabilities along z
studies/<uid>/gradcam_<Ck>.png   Grad-CAM of the fracture model on the top slices of a flagged vertebra
studies/<uid>/gradcam.csv        the slices behind those figures and where each map peaks
```
Study-level predictions are the out-of-fold ones of the method `make predict` would use
(stack/summary.json's better_method), unless another method is requested.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from csfd.cache import StudyCache
from csfd.config import ExperimentConfig
from csfd.constants import TARGETS, VERTEBRAE
from csfd.data import stack_indices, to_model_input
from csfd.features import aggregate_predictions
from csfd.gradcam import grad_cam
from csfd.inference import FoldModels, load_fold_models, predict_volume
from csfd.io_utils import atomic_write_csv, atomic_write_text
from csfd.report_figures import (
    plot_calibration,
    plot_confusion_grid,
    plot_gradcam,
    plot_roc_curves,
    plot_study_profile,
    plot_vertebra_confusion,
    save_figure,
)
from csfd.report_metrics import THRESHOLD_RULE, align_targets, classification_metrics, vertebra_confusion

logger = logging.getLogger(__name__)

METHODS = ("auto", "stacker", "aggregate")
TOP_SLICES = 3
STUDIES_DIR = "studies"


@dataclass
class StudySlices:
    """Slice predictions of one study and where they come from."""

    study_uid: str
    slices: pd.DataFrame  # position_index, slice_number, vis_C1..vis_C7, frac_C1..frac_C7
    fold: int | None  # the fold whose models did not see the study; None for the fold ensemble
    source: str


def read_oof_slices(run_root: Path) -> pd.DataFrame:
    """Concatenate every fold's oof_slices.csv, with a `fold` column added."""
    frames = []
    for folder in sorted(run_root.glob("fold*")):
        suffix = folder.name[len("fold") :]
        path = folder / "oof_slices.csv"
        if not suffix.isdigit() or not path.is_file():
            continue
        frame = pd.read_csv(path, dtype={"StudyInstanceUID": str})
        frame.insert(0, "fold", int(suffix))
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(
            f"no fold<k>/oof_slices.csv under {run_root}; train the folds first (`make train FOLD=k`)"
        )
    return pd.concat(frames, ignore_index=True)


def study_predictions(run_root: Path, oof_slices: pd.DataFrame, method: str = "auto") -> tuple[pd.DataFrame, str]:
    """Return the out-of-fold study predictions (wide) of `method` and a description of their source.

    "auto" takes stack/summary.json's better_method, or the plain aggregation without a stacker.
    """
    if method not in METHODS:
        raise ValueError(f"invalid method {method!r}; expected one of {', '.join(METHODS)}")
    summary = run_root / "stack" / "summary.json"
    if method == "auto":
        if summary.is_file():
            method = json.loads(summary.read_text()).get("better_method", "aggregate")
        else:
            logger.info("%s not found, so the report uses the plain aggregation of the slice predictions", summary)
            method = "aggregate"
    if method == "stacker":
        path = run_root / "stack" / "oof_predictions.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; train the stacker (`make stack`) or use method aggregate")
        return pd.read_csv(path, dtype={"StudyInstanceUID": str}), "stacker, out of fold"
    return aggregate_predictions(oof_slices.drop(columns="fold")), "plain aggregation, out of fold"


def pick_study(predictions: pd.DataFrame) -> str:
    """Return the study with the highest predicted patient_overall (ties: the first by StudyInstanceUID)."""
    ordered = predictions.sort_values(["patient_overall", "StudyInstanceUID"], ascending=[False, True], kind="mergesort")
    return str(ordered["StudyInstanceUID"].iloc[0])


def _open_cache(config: ExperimentConfig, study_uid: str) -> StudyCache:
    for split in ("train", "test"):
        slices_csv = Path(config.paths.cache_dir) / split / "slices.csv"
        if slices_csv.is_file():
            cache = StudyCache(config.paths.cache_dir, split)
            if study_uid in set(cache.study_uids):
                return cache
    raise FileNotFoundError(
        f"study {study_uid} is in neither the train nor the test cache under {config.paths.cache_dir}; "
        "check the StudyInstanceUID or run `make prepare`"
    )


def _study_slices(
    study_uid: str, oof_slices: pd.DataFrame, cache: StudyCache, fold_models: list[FoldModels], batch_size: int, device
) -> StudySlices:
    rows = oof_slices[oof_slices["StudyInstanceUID"] == study_uid]
    if len(rows):
        fold = int(rows["fold"].iloc[0])
        return StudySlices(study_uid, rows.drop(columns="fold").reset_index(drop=True), fold, f"fold {fold} models, out of fold")
    logger.info("study %s has no out-of-fold predictions, so every fold model predicts it", study_uid)
    volume = np.asarray(cache.volume(study_uid))
    visibility, fracture = predict_volume(volume, fold_models, batch_size, device)
    frame = cache.slices[cache.slices["StudyInstanceUID"] == study_uid].sort_values("position_index")
    slices = pd.DataFrame({"position_index": frame["position_index"].to_numpy(), "slice_number": frame["slice_number"].to_numpy()})
    slices[[f"vis_{v}" for v in VERTEBRAE]] = visibility
    slices[[f"frac_{v}" for v in VERTEBRAE]] = fracture
    return StudySlices(study_uid, slices, None, f"mean of {len(fold_models)} fold models")


def _box_positions(config: ExperimentConfig, cache: StudyCache, study_uid: str) -> list[int]:
    path = Path(config.paths.data_dir) / "train_bounding_boxes.csv"
    if not path.is_file():
        return []
    boxes = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    numbers = set(boxes.loc[boxes["StudyInstanceUID"] == study_uid, "slice_number"].astype(int))
    slices = cache.slices[cache.slices["StudyInstanceUID"] == study_uid]
    return sorted(int(p) for p in slices.loc[slices["slice_number"].isin(numbers), "position_index"])


def _flagged_vertebrae(probabilities: pd.Series, thresholds: pd.Series) -> list[tuple[str, str]]:
    """Return (vertebra, reason), highest probability first: the top vertebra always, then every
    other vertebra at or above its threshold. Thresholds differ by vertebra, so the most likely
    vertebra can be below its own threshold while a less likely one is above its threshold."""
    ordered = sorted(VERTEBRAE, key=lambda v: -float(probabilities[v]))
    return [
        (v, "above threshold" if float(probabilities[v]) >= float(thresholds[v]) else "top vertebra")
        for i, v in enumerate(ordered)
        if i == 0 or float(probabilities[v]) >= float(thresholds[v])
    ]


def _gradcam_maps(models: list[FoldModels], volume: np.ndarray, positions: list[int], output_index: int, device) -> np.ndarray:
    """Return the mean Grad-CAM map over `models` of one output at each position, at the cache's size."""
    size = (volume.shape[1], volume.shape[2])
    total = np.zeros((len(positions), *size), dtype=np.float64)
    for fold_models in models:
        fcfg = fold_models.config.fracture
        batch = [to_model_input(np.asarray(volume[stack_indices(p, len(volume), fcfg.context_slices)]), fcfg.image_size) for p in positions]
        images = torch.from_numpy(np.stack(batch)).to(device)
        total += grad_cam(fold_models.fracture, images, output_index, size=size)
    return total / len(models)


def _write_gradcam(
    study: StudySlices, cache: StudyCache, models: list[FoldModels], probabilities: pd.Series, thresholds: pd.Series,
    out_dir: Path, device, top_slices: int,
) -> pd.DataFrame:
    volume = np.asarray(cache.volume(study.study_uid))
    rows = []
    flagged = _flagged_vertebrae(probabilities, thresholds)
    for vertebra, reason in tqdm(flagged, desc="Grad-CAM", unit="vertebra", disable=None):
        index = VERTEBRAE.index(vertebra)
        top = study.slices.nlargest(top_slices, f"frac_{vertebra}")
        positions = [int(p) for p in top["position_index"]]
        maps = _gradcam_maps(models, volume, positions, len(VERTEBRAE) + index, device)
        image_name = f"gradcam_{vertebra}.png"
        titles = []
        for position, slice_row, cam in zip(positions, top.itertuples(index=False), maps):
            peak_row, peak_col = np.unravel_index(int(np.argmax(cam)), cam.shape)
            probability = float(getattr(slice_row, f"frac_{vertebra}"))
            titles.append(f"position {position}, P(frac {vertebra}) {probability:.3f}")
            if cam.max() <= 0:
                logger.warning("Grad-CAM of %s at position %d of %s is zero: no position adds to the fracture logit", vertebra, position, study.study_uid)
            rows.append(
                {
                    "vertebra": vertebra,
                    "flagged_by": reason,
                    "study_probability": float(probabilities[vertebra]),
                    "threshold": float(thresholds[vertebra]),
                    "position_index": position,
                    "slice_number": int(slice_row.slice_number),
                    "fracture_probability": probability,
                    "cam_max": float(cam.max()),
                    "cam_min": float(cam.min()),
                    "peak_row": int(peak_row),
                    "peak_col": int(peak_col),
                    "image": image_name,
                }
            )
        heading = (
            f"{study.study_uid}: fracture model, {vertebra} (study P {float(probabilities[vertebra]):.3f}, "
            f"threshold {float(thresholds[vertebra]):.3f}, {reason}; {study.source})"
        )
        figure = plot_gradcam([np.asarray(volume[p]) for p in positions], list(maps), titles, heading)
        save_figure(figure, out_dir / image_name)
    table = pd.DataFrame(rows)
    atomic_write_csv(table, out_dir / "gradcam.csv", float_format="%.6g")
    return table


def write_study_report(
    config: ExperimentConfig,
    study_uid: str,
    oof_slices: pd.DataFrame,
    predictions: pd.DataFrame,
    metrics: pd.DataFrame,
    labels: pd.DataFrame,
    out_dir: Path,
    top_slices: int = TOP_SLICES,
) -> Path:
    """Write the profile and Grad-CAM figures of one study into out_dir/studies/<uid>/; return that folder."""
    from csfd.trainer import resolve_device

    device = resolve_device(config.device)
    cache = _open_cache(config, study_uid)
    study_dir = out_dir / STUDIES_DIR / study_uid
    run_root = config.run_dir()
    in_oof = oof_slices["StudyInstanceUID"] == study_uid
    folds = (int(oof_slices.loc[in_oof, "fold"].iloc[0]),) if in_oof.any() else ()
    models = load_fold_models(run_root, folds, device)
    study = _study_slices(study_uid, oof_slices, cache, models, config.predict.batch_size, device)

    truth = cache.vertebra_labels()
    truth = truth[truth["StudyInstanceUID"] == study_uid]
    label_rows = labels[labels["StudyInstanceUID"] == study_uid]
    study_labels = label_rows.iloc[0] if len(label_rows) else None
    figure = plot_study_profile(
        study_uid,
        study.slices,
        truth if len(truth) else None,
        study_labels,
        _box_positions(config, cache, study_uid),
        study.source,
    )
    save_figure(figure, study_dir / "profile.png")

    known = predictions[predictions["StudyInstanceUID"] == study_uid]
    if len(known):
        probabilities = known.iloc[0]
    else:
        with_uid = study.slices.assign(StudyInstanceUID=study_uid)
        probabilities = aggregate_predictions(with_uid).iloc[0]
    thresholds = metrics.set_index("target")["threshold"]
    _write_gradcam(study, cache, models, probabilities, thresholds, study_dir, device, top_slices)
    logger.info("study report of %s written to %s", study_uid, study_dir)
    return study_dir


def run_report(
    config: ExperimentConfig, study_uid: str | None = None, method: str = "auto", top_slices: int = TOP_SLICES
) -> Path:
    """Write the whole report of config's run into <run folder>/report/ and return index.html's path.

    study_uid: the study shown slice by slice; by default the out-of-fold study with the
    highest predicted patient_overall.
    """
    run_root = config.run_dir()
    out_dir = run_root / "report"
    if study_uid is not None:
        _open_cache(config, study_uid)  # fail before the slow part when the study is unknown
    labels_path = Path(config.paths.data_dir) / "train.csv"
    if not labels_path.is_file():
        raise FileNotFoundError(f"labels {labels_path} not found; set paths.data_dir to the data the run was trained on")
    labels = pd.read_csv(labels_path, dtype={"StudyInstanceUID": str})
    oof_slices = read_oof_slices(run_root)
    predictions, source = study_predictions(run_root, oof_slices, method)

    metrics = classification_metrics(labels, predictions)
    atomic_write_csv(metrics, out_dir / "classification_metrics.csv", float_format="%.5f")
    y, p = align_targets(labels, predictions)
    save_figure(plot_confusion_grid(metrics), out_dir / "confusion_matrices.png")
    save_figure(plot_roc_curves(y, p, metrics), out_dir / "roc_curves.png")
    save_figure(plot_calibration(y, p), out_dir / "calibration.png")

    train_cache = StudyCache(config.paths.cache_dir, "train")
    matrix, counts = vertebra_confusion(oof_slices, train_cache.vertebra_labels())
    if counts["single_vertebra_slices"]:
        atomic_write_csv(matrix, out_dir / "vertebra_confusion.csv", index=True)
        save_figure(plot_vertebra_confusion(matrix, counts), out_dir / "vertebra_confusion.png")
    else:
        logger.warning("no out-of-fold slice of a segmented study shows exactly one vertebra, so the vertebra confusion matrix is skipped")

    study_uid = study_uid or pick_study(predictions)
    write_study_report(config, study_uid, oof_slices, predictions, metrics, labels, out_dir, top_slices)
    index = write_index(out_dir, config.name, source, counts)
    logger.info("report written to %s", index)
    return index


def _figure_html(path: str, caption: str) -> str:
    link = html.escape(path, quote=True)
    return f'<figure><a href="{link}"><img src="{link}" alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>'


def write_index(out_dir: Path, run_name: str, source: str, vertebra_counts: dict) -> Path:
    """Write index.html linking every figure and table present in out_dir (relative links only)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Report: {html.escape(run_name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
        "img{max-width:100%;border:1px solid #ccc}figure{margin:1em 0}</style>",
        "</head><body>",
        f"<h1>Run {html.escape(run_name)}</h1>",
        f"<p>Study-level predictions: {html.escape(source)}. Thresholds: {html.escape(THRESHOLD_RULE)}, chosen and "
        "scored on the same out-of-fold studies, so the scores at the threshold are optimistic.</p>",
        "<h2>Classification per target</h2>",
        '<p><a href="classification_metrics.csv">classification_metrics.csv</a></p>',
    ]
    for name, caption in (
        ("confusion_matrices.png", "Confusion matrices"),
        ("roc_curves.png", "ROC curves"),
        ("calibration.png", "Calibration"),
    ):
        if (out_dir / name).is_file():
            parts.append(_figure_html(name, caption))
    parts.append("<h2>Vertebra model</h2>")
    if (out_dir / "vertebra_confusion.png").is_file():
        parts.append('<p><a href="vertebra_confusion.csv">vertebra_confusion.csv</a>. Slices with two or more visible '
                     f"vertebrae ({vertebra_counts.get('multi_vertebra_slices', 0)}) are left out.</p>")
        parts.append(_figure_html("vertebra_confusion.png", "Vertebra confusion matrix"))
    else:
        parts.append("<p>No out-of-fold slice of a segmented study shows exactly one vertebra.</p>")
    parts.append("<h2>Studies</h2>")
    for study_dir in sorted((out_dir / STUDIES_DIR).glob("*")):
        if not study_dir.is_dir():
            continue
        relative = f"{STUDIES_DIR}/{study_dir.name}"
        parts.append(f"<h3>{html.escape(study_dir.name)}</h3>")
        if (study_dir / "gradcam.csv").is_file():
            parts.append(f'<p><a href="{html.escape(relative)}/gradcam.csv">gradcam.csv</a></p>')
        if (study_dir / "profile.png").is_file():
            parts.append(_figure_html(f"{relative}/profile.png", "Slice-by-slice probabilities"))
        for image in sorted(study_dir.glob("gradcam_*.png")):
            parts.append(_figure_html(f"{relative}/{image.name}", f"Grad-CAM {image.stem.removeprefix('gradcam_')}"))
    parts.append("</body></html>")
    path = out_dir / "index.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
