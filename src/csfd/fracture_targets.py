"""Slice targets of the fracture model (stage 1c) and the per-epoch negative subsampling.

The competition labels fractures per study and vertebra, not per slice. The weak slice target
of Ck is the study's Ck label times the slice's Ck visibility; fracture boxes mark slices that
surely show the fracture. Visibility comes from the segmentation where a study has one, and
from the vertebra model elsewhere.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from csfd.anatomy import refine_frame
from csfd.config import ExperimentConfig, SliceModelConfig
from csfd.constants import VERTEBRAE

logger = logging.getLogger(__name__)

KEY_COLUMNS = ["StudyInstanceUID", "slice_number", "position_index"]


def target_visibility_labels(config: ExperimentConfig, labels: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """Return the vertebra model's labels as the fracture targets will read them.

    With fracture.anatomy_targets the labels pass through the anatomy step (C1..C7 in spine
    order along z, csfd.anatomy), unless the self-training rounds already applied it.
    `slices` supplies z (mm) for the step's minimum level length.
    """
    already_refined = config.ssl.rounds > 0 and config.ssl.anatomy
    if not config.fracture.anatomy_targets or already_refined or not len(labels):
        return labels
    from csfd.ssl import anatomy_options

    with_z = labels.merge(slices[["StudyInstanceUID", "slice_number", "z"]], on=["StudyInstanceUID", "slice_number"], how="left")
    refined = refine_frame(with_z, list(VERTEBRAE), anatomy_options(config.ssl), min_level_mm=config.ssl.anatomy_min_level_mm)
    logger.info("Fracture targets: vertebra labels of %d studies passed through the anatomy step", refined["StudyInstanceUID"].nunique())
    return refined[KEY_COLUMNS + list(VERTEBRAE)]


def visibility_targets(
    frame: pd.DataFrame, labels: pd.DataFrame, vertebra_labels: pd.DataFrame, segmented: set[str], threshold: float
) -> np.ndarray:
    """Return (n, 7) visibility for the slices of `frame`: the segmentation's for `segmented`
    studies, `labels` (the vertebra model's) for the others.

    With `threshold` >= 0 the model's visibility becomes 1 above it and 0 otherwise; a
    negative threshold keeps it soft. A slice without a label is an error naming its study.
    """
    merged = frame[KEY_COLUMNS].merge(labels[KEY_COLUMNS + list(VERTEBRAE)], on=KEY_COLUMNS, how="left")
    visibility = merged[list(VERTEBRAE)].to_numpy(np.float32)
    is_segmented = frame["StudyInstanceUID"].isin(segmented).to_numpy()
    missing = np.isnan(visibility).any(axis=1) & ~is_segmented
    if missing.any():
        uid = frame["StudyInstanceUID"].to_numpy()[np.flatnonzero(missing)[0]]
        raise ValueError(f"the vertebra labels lack slices of study {uid}; retrain the fold's vertebra stage")
    if threshold >= 0:
        visibility = (visibility > threshold).astype(np.float32)
    if is_segmented.any():
        rows = frame[is_segmented][["StudyInstanceUID", "slice_number"]].merge(vertebra_labels, on=["StudyInstanceUID", "slice_number"], how="left")
        visibility[is_segmented] = rows[list(VERTEBRAE)].to_numpy(np.float32)
    return visibility


def fracture_targets(
    frame: pd.DataFrame, visibility: np.ndarray, labels: pd.DataFrame, boxes: pd.DataFrame, model_config: SliceModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Return (targets, weights) of shape (n, 14): visibility of C1..C7, then fracture of C1..C7.

    The fracture target of Ck on a slice is the study's Ck label times the slice's Ck
    visibility. A slice with a fracture box is a strong positive for the fractured vertebrae
    visible on it.
    """
    study_labels = labels.loc[frame["StudyInstanceUID"], list(VERTEBRAE)].to_numpy(np.float32)
    fracture = study_labels * visibility
    weights_fracture = np.where(fracture > 0.5, model_config.positive_weight, 1.0).astype(np.float32)

    box_keys = set(zip(boxes["StudyInstanceUID"], boxes["slice_number"].astype(int))) if len(boxes) else set()
    is_box = np.array([(u, int(s)) in box_keys for u, s in zip(frame["StudyInstanceUID"], frame["slice_number"])], dtype=bool)
    if is_box.any():
        box_positive = (study_labels[is_box] > 0) & (visibility[is_box] > 0.5)
        fracture[is_box] = np.where(box_positive, 1.0, fracture[is_box])
        weights_fracture[is_box] = np.where(box_positive, model_config.box_weight, weights_fracture[is_box])
    targets = np.concatenate([visibility, fracture], axis=1).astype(np.float32)
    weights = np.concatenate([np.ones_like(visibility), weights_fracture], axis=1).astype(np.float32)
    return targets, weights


def negative_subsampler(targets: np.ndarray, keep: float, seed: int):
    """Return a per-epoch index picker that keeps all fracture-positive slices and a fixed-size
    random share of the negatives, or None when every slice is kept."""
    if keep >= 1.0:
        return None
    positive = np.flatnonzero(targets[:, len(VERTEBRAE) :].max(axis=1) > 0.5)
    negative = np.flatnonzero(targets[:, len(VERTEBRAE) :].max(axis=1) <= 0.5)
    n_keep = max(1, int(round(len(negative) * keep)))

    def pick(epoch: int) -> np.ndarray:
        rng = np.random.default_rng((seed, epoch))
        chosen = rng.choice(negative, size=n_keep, replace=False) if len(negative) else negative
        return np.sort(np.concatenate([positive, chosen]))

    return pick
