"""The competition metric: weighted multi-label log loss over C1..C7 and patient_overall.

Weights per row are 1 (negative) / 2 (positive) for vertebrae and 7 / 14 for patient_overall.
The competition's form ("per_study") normalises each study's eight rows by their weight sum
and averages over studies; some public code normalises once over all rows ("flat"). Both are
computed here with our own clipping, so the result does not depend on scikit-learn's version.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from csfd.constants import TARGET_WEIGHTS, TARGETS, VERTEBRAE

EPSILON = 1e-15


class ScoreInputError(ValueError):
    """Predictions that cannot be scored against the labels."""


def _as_wide(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Return a frame indexed by StudyInstanceUID with the eight target columns."""
    df = df.copy()
    if "Overall" in df.columns and "patient_overall" not in df.columns:
        df = df.rename(columns={"Overall": "patient_overall"})
    if "uid" in df.columns and "StudyInstanceUID" not in df.columns:
        df = df.rename(columns={"uid": "StudyInstanceUID"})
    if {"row_id", "fractured"} <= set(df.columns):
        df = submission_to_wide(df)
    missing = [c for c in ("StudyInstanceUID",) + TARGETS if c not in df.columns]
    if missing:
        raise ScoreInputError(
            f"{what}: missing column(s) {', '.join(missing)}; expected StudyInstanceUID, "
            f"patient_overall (or Overall) and C1..C7, or a submission with row_id and fractured"
        )
    duplicated = df["StudyInstanceUID"].duplicated()
    if duplicated.any():
        raise ScoreInputError(f"{what}: duplicate StudyInstanceUID {df.loc[duplicated, 'StudyInstanceUID'].iloc[0]}")
    return df.set_index("StudyInstanceUID")[list(TARGETS)].astype(float)


def submission_to_wide(submission: pd.DataFrame) -> pd.DataFrame:
    """Convert row_id/fractured rows into one row per StudyInstanceUID with eight columns."""
    row_ids = submission["row_id"].astype(str)
    # patient_overall itself contains "_", so match the known suffixes instead of splitting.
    pattern = r"^(?P<uid>.+)_(?P<target>" + "|".join(TARGETS) + r")$"
    parts = row_ids.str.extract(pattern)
    if parts["uid"].isna().any():
        bad = row_ids[parts["uid"].isna()].iloc[0]
        raise ScoreInputError(
            f"submission: invalid row_id {bad!r}; expected <StudyInstanceUID>_<C1..C7|patient_overall>"
        )
    long = pd.DataFrame(
        {"StudyInstanceUID": parts["uid"], "target": parts["target"], "fractured": submission["fractured"]}
    )
    wide = long.pivot_table(index="StudyInstanceUID", columns="target", values="fractured", aggfunc="first")
    incomplete = wide[list(TARGETS)].isna().any(axis=1) if set(TARGETS) <= set(wide.columns) else None
    if incomplete is None or incomplete.any():
        raise ScoreInputError("submission: every study needs all eight rows (patient_overall and C1..C7)")
    return wide[list(TARGETS)].reset_index()


def _align(labels: pd.DataFrame, predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    y = _as_wide(labels, "labels")
    p = _as_wide(predictions, "predictions")
    missing = y.index.difference(p.index)
    if len(missing):
        raise ScoreInputError(
            f"predictions: {len(missing)} labelled stud{'y is' if len(missing) == 1 else 'ies are'} missing, "
            f"for example {missing[0]}; predict every study or score a subset of the labels"
        )
    p = p.loc[y.index]
    values = p.to_numpy()
    if not np.isfinite(values).all():
        raise ScoreInputError("predictions: contain NaN or infinite values")
    if (values < 0).any() or (values > 1).any():
        bad = p.stack()[(p.stack() < 0) | (p.stack() > 1)]
        uid, target = bad.index[0]
        raise ScoreInputError(f"predictions: value {bad.iloc[0]} for {uid} {target} is outside [0, 1]")
    return y.to_numpy(), values, y.index


def _weighted_losses(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-row weights and binary cross-entropy, both shaped (studies, 8)."""
    p = np.clip(p, EPSILON, 1 - EPSILON)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    neg = np.array([TARGET_WEIGHTS[t][0] for t in TARGETS])
    pos = np.array([TARGET_WEIGHTS[t][1] for t in TARGETS])
    weights = np.where(y > 0.5, pos, neg)
    return weights, bce


def competition_score(labels: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, float]:
    """Return {"per_study": ..., "flat": ...} for wide or submission-format predictions."""
    y, p, _ = _align(labels, predictions)
    weights, bce = _weighted_losses(y, p)
    per_study = (weights * bce).sum(axis=1) / weights.sum(axis=1)
    flat = (weights * bce).sum() / weights.sum()
    return {"per_study": float(per_study.mean()), "flat": float(flat)}


def per_target_scores(labels: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, float]:
    """Return the weighted log loss of each target column on its own."""
    y, p, _ = _align(labels, predictions)
    weights, bce = _weighted_losses(y, p)
    return {t: float((weights[:, j] * bce[:, j]).sum() / weights[:, j].sum()) for j, t in enumerate(TARGETS)}


def prior_predictions(labels: pd.DataFrame, prevalence: dict[str, float] | None = None) -> pd.DataFrame:
    """Return constant predictions, by default each target's mean over `labels`."""
    wide = _as_wide(labels, "labels")
    values = prevalence or {t: float(wide[t].mean()) for t in TARGETS}
    out = pd.DataFrame({t: np.full(len(wide), values[t]) for t in TARGETS}, index=wide.index)
    return out.reset_index()


def overall_from_vertebrae(wide: pd.DataFrame) -> pd.Series:
    """Return 1 - prod(1 - Ck): the probability that any vertebra is fractured, if independent."""
    return 1.0 - (1.0 - wide[list(VERTEBRAE)]).prod(axis=1)
