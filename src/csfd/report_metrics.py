"""Classification metrics of a run's out-of-fold predictions, for the visual report.

The competition scores probabilities with a log loss. A reader of the report also wants the
usual yes/no view, so each target gets a decision threshold chosen on the out-of-fold
predictions themselves: the one that maximises F1. The scores at that threshold are
therefore optimistic, as every threshold tuned and scored on the same studies is.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from csfd.constants import TARGETS, VERTEBRAE

logger = logging.getLogger(__name__)

THRESHOLD_RULE = "max F1 on OOF"
DEFAULT_THRESHOLD = 0.5
CALIBRATION_BINS = 10
METRIC_COLUMNS = (
    "target", "n_studies", "n_positive", "threshold", "threshold_rule", "tn", "fp", "fn", "tp",
    "accuracy", "precision", "recall", "f1", "roc_auc", "note",
)


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Return the threshold t that maximises F1 of the rule `score >= t`.

    Candidates are the distinct scores; ties go to the lowest threshold. With a single class
    in y_true F1 cannot rank thresholds, so DEFAULT_THRESHOLD (0.5) is returned.
    """
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return DEFAULT_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(y_true, y_score)
    # The last precision/recall pair (recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(thresholds[int(np.argmax(f1))])


def _single_target_metrics(target: str, y_true: np.ndarray, y_score: np.ndarray) -> dict:
    classes = np.unique(y_true)
    threshold = choose_threshold(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    note = ""
    if len(classes) < 2:
        only = int(classes[0]) if len(classes) else "none"
        note = f"only class {only} in the labels: ROC AUC undefined, threshold fixed at {DEFAULT_THRESHOLD}"
        logger.warning("%s: %s", target, note)
        roc_auc = np.nan
    else:
        roc_auc = float(roc_auc_score(y_true, y_score))
    return {
        "target": target,
        "n_studies": len(y_true),
        "n_positive": int(y_true.sum()),
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE if len(classes) > 1 else "default 0.5",
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": roc_auc,
        "note": note,
    }


def align_targets(labels: pd.DataFrame, predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (labels, predictions) indexed by StudyInstanceUID, on the predicted studies, in one order."""
    y = labels.set_index(labels["StudyInstanceUID"].astype(str))[list(TARGETS)]
    p = predictions.set_index(predictions["StudyInstanceUID"].astype(str))[list(TARGETS)]
    unlabelled = p.index.difference(y.index)
    if len(unlabelled):
        raise ValueError(
            f"{len(unlabelled)} predicted studies have no labels in train.csv, for example {unlabelled[0]}; "
            "check paths.data_dir"
        )
    y = y.loc[p.index]
    return y.astype(int), p.astype(float)


def classification_metrics(labels: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """Return one row per target (patient_overall, C1..C7) with METRIC_COLUMNS.

    labels: train.csv's layout; predictions: StudyInstanceUID and the eight probabilities.
    Only predicted studies are scored. A target with a single class in the labels gets
    ROC AUC NaN and a note instead of an error.
    """
    y, p = align_targets(labels, predictions)
    rows = [_single_target_metrics(t, y[t].to_numpy(), p[t].to_numpy()) for t in TARGETS]
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def calibration_points(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = CALIBRATION_BINS):
    """Return (mean predicted probability, fraction of positives) of the non-empty uniform bins."""
    fraction_positive, mean_predicted = calibration_curve(y_true, y_score, n_bins=n_bins, strategy="uniform")
    return mean_predicted, fraction_positive


def vertebra_confusion(oof_slices: pd.DataFrame, vertebra_labels: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Compare the vertebra model's argmax over vis_C1..vis_C7 with the segmentation, per slice.

    Uses the out-of-fold slices of segmented studies on which exactly one of C1..C7 is
    visible. vertebra_labels.csv stores visibility as 0/1 without areas, so a slice with two
    or more vertebrae has no dominant one and is left out. Returns the 7x7 count matrix
    (rows true, columns predicted, both C1..C7) and the slice counts behind it.
    """
    vis_columns = [f"vis_{v}" for v in VERTEBRAE]
    merged = oof_slices.merge(
        vertebra_labels[["StudyInstanceUID", "slice_number", *VERTEBRAE]],
        on=["StudyInstanceUID", "slice_number"],
        how="inner",
    )
    visible_count = merged[list(VERTEBRAE)].sum(axis=1).to_numpy()
    single = merged[visible_count == 1]
    truth = single[list(VERTEBRAE)].to_numpy().argmax(axis=1)
    predicted = single[vis_columns].to_numpy().argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, labels=list(range(len(VERTEBRAE))))
    frame = pd.DataFrame(matrix, index=pd.Index(VERTEBRAE, name="true"), columns=list(VERTEBRAE))
    counts = {
        "segmented_slices": int(len(merged)),
        "single_vertebra_slices": int(len(single)),
        "multi_vertebra_slices": int((visible_count > 1).sum()),
        "no_vertebra_slices": int((visible_count == 0).sum()),
        "segmented_studies": int(merged["StudyInstanceUID"].nunique()),
        "accuracy": float(np.trace(matrix) / matrix.sum()) if matrix.sum() else float("nan"),
    }
    return frame, counts
