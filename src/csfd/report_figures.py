"""Matplotlib figures of the visual report; every function returns a Figure and draws nothing on screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from csfd.constants import TARGETS, VERTEBRAE
from csfd.io_utils import atomic_path
from csfd.report_metrics import calibration_points

GRID_COLUMNS = 4


def save_figure(figure: Figure, path: Path, dpi: int = 100) -> None:
    """Write `figure` as PNG, atomically."""
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def _target_grid(title: str) -> tuple[Figure, list]:
    rows = int(np.ceil(len(TARGETS) / GRID_COLUMNS))
    figure = Figure(figsize=(3.2 * GRID_COLUMNS, 3.0 * rows))
    axes = [figure.add_subplot(rows, GRID_COLUMNS, i + 1) for i in range(len(TARGETS))]
    figure.suptitle(title)
    return figure, axes


def plot_confusion_grid(metrics: pd.DataFrame) -> Figure:
    """Draw the 2x2 confusion matrix of every target at its chosen threshold."""
    figure, axes_list = _target_grid("Confusion matrices at the max-F1 threshold (out-of-fold studies)")
    for axes, row in zip(axes_list, metrics.itertuples(index=False)):
        matrix = np.array([[row.tn, row.fp], [row.fn, row.tp]])
        axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        for (i, j), count in np.ndenumerate(matrix):
            colour = "white" if count > matrix.max() / 2 else "black"
            axes.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=12)
        axes.set_xticks([0, 1], ["pred 0", "pred 1"])
        axes.set_yticks([0, 1], ["true 0", "true 1"])
        axes.set_title(f"{row.target} (t={row.threshold:.3f})", fontsize=10)
    figure.tight_layout()
    return figure


def plot_roc_curves(labels: pd.DataFrame, predictions: pd.DataFrame, metrics: pd.DataFrame) -> Figure:
    """Draw each target's ROC curve; a single-class target gets a note instead of a curve."""
    figure, axes_list = _target_grid("ROC curves (out-of-fold studies)")
    auc = metrics.set_index("target")["roc_auc"]
    for axes, target in zip(axes_list, TARGETS):
        y, p = labels[target].to_numpy(), predictions[target].to_numpy()
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        if np.isnan(auc[target]):
            axes.text(0.5, 0.5, "one class only:\nAUC undefined", ha="center", va="center")
            axes.set_title(target, fontsize=10)
        else:
            fpr, tpr, _ = roc_curve(y, p)
            axes.plot(fpr, tpr)
            axes.set_title(f"{target} (AUC {auc[target]:.3f})", fontsize=10)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("false positive rate", fontsize=8)
        axes.set_ylabel("true positive rate", fontsize=8)
    figure.tight_layout()
    return figure


def plot_calibration(labels: pd.DataFrame, predictions: pd.DataFrame) -> Figure:
    """Draw each target's reliability curve (10 uniform bins) and the histogram of predictions."""
    figure, axes_list = _target_grid("Calibration (out-of-fold studies, 10 uniform bins)")
    for axes, target in zip(axes_list, TARGETS):
        y, p = labels[target].to_numpy(), predictions[target].to_numpy()
        mean_predicted, fraction_positive = calibration_points(y, p)
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.plot(mean_predicted, fraction_positive, marker="o", markersize=4)
        counts, edges = np.histogram(p, bins=10, range=(0, 1))
        axes.bar(
            edges[:-1], counts / max(counts.max(), 1) * 0.25, width=0.1, align="edge", alpha=0.25, color="grey",
            label="predictions (histogram, tallest bar = 0.25)",
        )
        if target == TARGETS[0]:
            axes.legend(fontsize=7, loc="upper left")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_title(f"{target} (prevalence {y.mean():.2f})", fontsize=10)
        axes.set_xlabel("mean predicted probability", fontsize=8)
        axes.set_ylabel("fraction positive", fontsize=8)
    figure.tight_layout()
    return figure


def plot_vertebra_confusion(matrix: pd.DataFrame, counts: dict) -> Figure:
    """Draw the vertebra model's C1..C7 confusion matrix, coloured by row share, annotated with counts."""
    figure = Figure(figsize=(6, 5.4))
    axes = figure.add_subplot(1, 1, 1)
    values = matrix.to_numpy()
    row_sums = values.sum(axis=1, keepdims=True)
    shares = np.divide(values, row_sums, out=np.zeros(values.shape, dtype=float), where=row_sums > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(values):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black", fontsize=9)
    axes.set_xticks(range(len(VERTEBRAE)), list(VERTEBRAE))
    axes.set_yticks(range(len(VERTEBRAE)), list(VERTEBRAE))
    axes.set_xlabel("predicted (argmax of vis_C1..vis_C7)")
    axes.set_ylabel("true (segmentation)")
    axes.set_title(
        f"Vertebra model, OOF slices with one visible vertebra\n"
        f"{counts['single_vertebra_slices']} slices of {counts['segmented_studies']} studies, "
        f"accuracy {counts['accuracy']:.3f}",
        fontsize=10,
    )
    figure.colorbar(image, ax=axes, label="share of the true row")
    figure.tight_layout()
    return figure


def plot_study_profile(
    study_uid: str,
    slices: pd.DataFrame,
    truth_visibility: pd.DataFrame | None,
    study_labels: pd.Series | None,
    box_positions: list[int],
    source: str,
) -> Figure:
    """Draw vertebra and fracture probabilities of C1..C7 along position_index, head to feet.

    slices: position_index, vis_C1..vis_C7, frac_C1..frac_C7. truth_visibility: position_index
    and C1..C7 (0/1) from the segmentation, shaded behind the vertebra curves. study_labels:
    train.csv's row; fractured vertebrae are drawn solid, the others dashed. box_positions:
    slices with a fracture box, marked with red lines.
    """
    slices = slices.sort_values("position_index")
    x = slices["position_index"].to_numpy()
    figure = Figure(figsize=(12, 6.5))
    top = figure.add_subplot(2, 1, 1)
    bottom = figure.add_subplot(2, 1, 2, sharex=top)
    for i, vertebra in enumerate(VERTEBRAE):
        colour = f"C{i}"
        top.plot(x, slices[f"vis_{vertebra}"], color=colour, linewidth=1.2, label=vertebra)
        if truth_visibility is not None:
            truth = truth_visibility.sort_values("position_index")
            top.fill_between(
                truth["position_index"], 0, truth[vertebra].to_numpy(dtype=float), step="mid", color=colour, alpha=0.15, linewidth=0
            )
        fractured = study_labels is not None and int(study_labels[vertebra]) == 1
        bottom.plot(
            x,
            slices[f"frac_{vertebra}"],
            color=colour,
            linewidth=2.0 if fractured else 1.0,
            linestyle="-" if fractured else "--",
            label=f"{vertebra} (fractured)" if fractured else vertebra,
        )
    for position in box_positions:
        bottom.axvline(position, color="red", alpha=0.25, linewidth=1)
    if box_positions:
        bottom.plot([], [], color="red", alpha=0.5, label="fracture box slice")
    shaded = "shaded: segmentation" if truth_visibility is not None else "no segmentation for this study"
    top.set_title(f"Vertebra model: P(Ck visible) per slice ({shaded})", fontsize=10)
    top.set_ylabel("probability")
    top.set_ylim(-0.02, 1.02)
    top.legend(ncol=7, fontsize=8, loc="upper right")
    labels_text = (
        "labels: " + ", ".join(f"{t}={int(study_labels[t])}" for t in TARGETS) if study_labels is not None else "no study labels"
    )
    bottom.set_title(f"Fracture model: P(Ck fractured) per slice; {labels_text}", fontsize=10)
    bottom.set_ylabel("probability")
    bottom.set_xlabel("position_index (0 = most superior slice, toward the feet)")
    bottom.set_ylim(-0.02, 1.02)
    bottom.legend(ncol=4, fontsize=8, loc="upper right")
    figure.suptitle(f"Study {study_uid} ({source})", fontsize=11)
    figure.tight_layout()
    return figure


def plot_gradcam(
    slices: list[np.ndarray], cams: list[np.ndarray], titles: list[str], heading: str
) -> Figure:
    """Draw each windowed slice above its Grad-CAM overlay (jet, alpha 0.45, scaled to the map's max)."""
    columns = len(slices)
    figure = Figure(figsize=(3.2 * columns, 6.6))
    for i, (image, cam, title) in enumerate(zip(slices, cams, titles)):
        plain = figure.add_subplot(2, columns, i + 1)
        plain.imshow(image, cmap="gray", vmin=0, vmax=255)
        plain.set_title(title, fontsize=9)
        plain.axis("off")
        overlay = figure.add_subplot(2, columns, columns + i + 1)
        overlay.imshow(image, cmap="gray", vmin=0, vmax=255)
        peak = float(cam.max())
        overlay.imshow(cam / peak if peak > 0 else cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        overlay.set_title("Grad-CAM" if peak > 0 else "Grad-CAM is zero", fontsize=9)
        overlay.axis("off")
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    return figure
