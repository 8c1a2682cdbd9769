"""Cross-validation tables, baselines and feature importances for the stage-2 stacker."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from csfd.constants import TARGETS
from csfd.io_utils import atomic_path, atomic_write_csv
from csfd.metric import competition_score, per_target_scores, prior_predictions
from csfd.stack_params import target_weight_table

logger = logging.getLogger(__name__)

MEAN_ROW = "mean"
IMPORTANCE_PLOT_FEATURES = 30


def labels_by_study(labels: pd.DataFrame) -> pd.DataFrame:
    """Return labels indexed by StudyInstanceUID with the eight target columns as floats.

    Accepts train.csv's layout (a StudyInstanceUID column) or a frame already indexed by it.
    Raises ValueError for a missing column, a repeated study or a label other than 0 or 1.
    """
    frame = labels.copy()
    if "StudyInstanceUID" in frame.columns:
        frame = frame.set_index("StudyInstanceUID")
    frame.index = frame.index.astype(str)
    frame.index.name = "StudyInstanceUID"
    missing = [t for t in TARGETS if t not in frame.columns]
    if missing:
        raise ValueError(f"labels: missing column(s) {', '.join(missing)}; expected train.csv's columns")
    if frame.index.duplicated().any():
        raise ValueError(f"labels: StudyInstanceUID {frame.index[frame.index.duplicated()][0]} appears twice")
    frame = frame[list(TARGETS)].astype(float)
    invalid = ~frame.isin([0.0, 1.0])
    if invalid.to_numpy().any():
        uid, target = invalid.stack()[invalid.stack()].index[0]
        raise ValueError(f"labels: {target} of study {uid} is {frame.at[uid, target]}; expected 0 or 1")
    return frame


def folds_by_study(folds: pd.DataFrame) -> pd.Series:
    """Return the fold of each study as an int Series indexed by StudyInstanceUID."""
    missing = [c for c in ("StudyInstanceUID", "fold") if c not in folds.columns]
    if missing:
        raise ValueError(f"folds: missing column(s) {', '.join(missing)}; expected StudyInstanceUID, fold")
    series = folds.set_index(folds["StudyInstanceUID"].astype(str))["fold"]
    series.index.name = "StudyInstanceUID"
    if series.index.duplicated().any():
        raise ValueError(f"folds: StudyInstanceUID {series.index[series.index.duplicated()][0]} appears twice")
    numeric = pd.to_numeric(series, errors="coerce")
    invalid = numeric.isna() | (numeric != np.floor(numeric)) | (numeric < 0)
    if invalid.any():
        uid = invalid[invalid].index[0]
        raise ValueError(f"folds: fold {series[uid]} of study {uid} is not an integer >= 0")
    return numeric.astype(int)


def prior_oof(labels: pd.DataFrame, folds: pd.Series) -> pd.DataFrame:
    """Predict each fold's studies with the label prevalence of the other folds (wide frame)."""
    parts = []
    for fold in sorted(folds.unique()):
        valid = folds.index[folds == fold]
        train = folds.index[folds != fold]
        prevalence = {t: float(labels.loc[train, t].mean()) for t in TARGETS}
        parts.append(prior_predictions(labels.loc[valid].reset_index(), prevalence))
    return pd.concat(parts, ignore_index=True)


def best_constant_oof(labels: pd.DataFrame, folds: pd.Series, weighting: str = "per_study") -> pd.DataFrame:
    """Predict each fold's studies with the constants that minimise the metric on the other folds.

    With weighting "per_study" these are the label means weighted as in the competition's
    per-study form: what a booster that learns nothing converges to. Wide frame.
    """
    weights = target_weight_table(labels, weighting)
    parts = []
    for fold in sorted(folds.unique()):
        valid = folds.index[folds == fold]
        train = folds.index[folds != fold]
        w = weights.loc[train]
        constants = {t: float((w[t] * labels.loc[train, t]).sum() / w[t].sum()) for t in TARGETS}
        parts.append(prior_predictions(labels.loc[valid].reset_index(), constants))
    return pd.concat(parts, ignore_index=True)


def cv_table(
    labels: pd.DataFrame,
    folds: pd.DataFrame | pd.Series,
    predictions: Mapping[str, pd.DataFrame],
    out_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Score every method per fold and as the mean over folds; write out_dir/cv.csv if given.

    predictions: method name -> wide out-of-fold predictions (StudyInstanceUID, patient_overall,
    C1..C7). The studies scored are those of `folds`. Rows: one per method and fold, plus a
    fold "mean" row per method (the unweighted mean of the fold rows). Columns: method, fold,
    n_studies, per_study and flat (the two metric forms), then each target's weighted log loss.
    """
    label_frame = labels_by_study(labels)
    fold_of = folds if isinstance(folds, pd.Series) else folds_by_study(folds)
    unlabelled = fold_of.index.difference(label_frame.index)
    if len(unlabelled):
        raise ValueError(f"cv_table: {len(unlabelled)} studies of folds have no labels, for example {unlabelled[0]}")
    rows = []
    for method, frame in predictions.items():
        method_rows = []
        for fold in sorted(fold_of.unique()):
            studies = fold_of.index[fold_of == fold]
            fold_labels = label_frame.loc[studies].reset_index()
            score = competition_score(fold_labels, frame)
            targets = per_target_scores(fold_labels, frame)
            method_rows.append({"method": method, "fold": str(fold), "n_studies": len(studies), **score, **targets})
        mean = pd.DataFrame(method_rows).drop(columns=["method", "fold", "n_studies"]).mean()
        rows += method_rows
        rows.append({"method": method, "fold": MEAN_ROW, "n_studies": len(fold_of), **mean.to_dict()})
    table = pd.DataFrame(rows, columns=["method", "fold", "n_studies", "per_study", "flat", *TARGETS])
    if out_dir is not None:
        atomic_write_csv(table, Path(out_dir) / "cv.csv")
    return table


def mean_scores(table: pd.DataFrame, form: str = "per_study") -> dict[str, float]:
    """Return {method: mean score over folds} from a cv_table for one metric form."""
    means = table[table["fold"] == MEAN_ROW]
    return {row.method: float(getattr(row, form)) for row in means.itertuples()}


def importance_table(gains: Mapping[tuple[int, str], pd.Series]) -> pd.DataFrame:
    """Average gain importances over folds, per target, and rank the features.

    gains: (fold, target) -> gain per feature of that booster. Returns a frame indexed by
    feature with one column of mean gain per target, NaN where the target's boosters do not
    use the feature. Its column "mean_share" is the mean over targets of the feature's share
    of that target's total gain, and rows are sorted from the largest share.
    """
    by_target: dict[str, list[pd.Series]] = {}
    for (_, target), gain in gains.items():
        by_target.setdefault(target, []).append(gain)
    columns = {t: pd.concat(series, axis=1).mean(axis=1) for t, series in by_target.items()}
    table = pd.DataFrame(columns)
    table = table[[t for t in TARGETS if t in table.columns]]
    totals = table.sum(axis=0).replace(0.0, np.nan)
    # A feature outside a target's column set has share 0 for that target.
    table["mean_share"] = (table / totals).fillna(0.0).mean(axis=1)
    table.index.name = "feature"
    return table.sort_values("mean_share", ascending=False, kind="mergesort")


def write_importance(table: pd.DataFrame, out_dir: str | Path) -> None:
    """Write feature_importance.csv and a bar plot of the top features (feature_importance.png)."""
    out_dir = Path(out_dir)
    atomic_write_csv(table, out_dir / "feature_importance.csv", index=True)
    top = table["mean_share"].head(IMPORTANCE_PLOT_FEATURES)[::-1]
    figure = Figure(figsize=(8, 0.25 * len(top) + 1.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.barh(top.index, top.to_numpy())
    axes.set_xlabel("share of gain, mean over targets and folds")
    axes.set_title("Stacker feature importance")
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    with atomic_path(out_dir / "feature_importance.png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
