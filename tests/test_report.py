"""Visual report: Grad-CAM on models with a known map, metrics tables, and the report of the tiny run."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from csfd.cache import StudyCache
from csfd.cli import main
from csfd.constants import TARGETS, VERTEBRAE
from csfd.data import stack_indices, to_model_input
from csfd.gradcam import grad_cam, normalise_map
from csfd.inference import load_fold_models
from csfd.report import pick_study, read_oof_slices, run_report, study_predictions, write_index, write_study_report
from csfd.report_metrics import choose_threshold, classification_metrics, vertebra_confusion

SIZE = 32
HALF = SIZE // 2


class QuadrantFeatures(nn.Module):
    """Feature extractor whose channel 0 covers only the top-left quadrant, channel 1 only the bottom-right one."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(2, SIZE, SIZE)
        mask[0, :HALF, :HALF] = 1.0
        mask[1, HALF:, HALF:] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(x * self.mask), 4)  # (N, 2, 8, 8)


class PooledHead(nn.Module):
    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        with torch.no_grad():
            self.linear.weight.copy_(sign * torch.eye(2))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class QuadrantModel(nn.Module):
    """Output k comes only from channel k in its quadrant: a model with a known Grad-CAM."""

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.features = QuadrantFeatures()
        self.head = PooledHead(sign)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x):
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _blob_image() -> torch.Tensor:
    """Two channels, each with the same bright square in every quadrant."""
    image = torch.zeros(1, 2, SIZE, SIZE)
    for top in (4, HALF + 4):
        for left in (4, HALF + 4):
            image[:, :, top : top + 8, left : left + 8] = 1.0
    return image


def test_gradcam_known_answer():
    model = QuadrantModel()
    image = _blob_image()
    cam = grad_cam(model, image, 0)
    # d(logit0)/dA0 = 1/64 at every one of the 8x8 positions, so the map is ReLU(A0 / 64), upsampled.
    activation = model.forward_features(image)
    expected = F.interpolate(F.relu(activation[:, :1] / 64), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(cam, expected[:, 0].numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("output, quadrant, other", [(0, (0, 0), (1, 1)), (1, (1, 1), (0, 0))])
def test_gradcam_peaks_in_seen_quadrant(output, quadrant, other):
    cam = grad_cam(QuadrantModel(), _blob_image(), output)[0]
    peak_row, peak_col = np.unravel_index(np.argmax(cam), cam.shape)
    assert (peak_row // HALF, peak_col // HALF) == quadrant
    # The image has the same blob in the other quadrant, but the model never looks there.
    rows = slice(other[0] * HALF + 2, (other[0] + 1) * HALF - 2)
    cols = slice(other[1] * HALF + 2, (other[1] + 1) * HALF - 2)
    assert cam[rows, cols].max() == 0.0
    assert cam.max() > 0.0
    assert cam.std() > 0.0


def test_gradcam_layer_hook_matches_default():
    model = QuadrantModel()
    sequential = nn.Sequential(model.features, model.head)
    image = _blob_image()
    by_layer = grad_cam(sequential, image, 1, layer=sequential[0])
    np.testing.assert_allclose(by_layer, grad_cam(model, image, 1), rtol=1e-6)


def test_gradcam_zero_without_evidence():
    cam = grad_cam(QuadrantModel(sign=-1.0), _blob_image(), 0)
    assert cam.max() == 0.0
    assert normalise_map(cam).max() == 0.0


def test_gradcam_output_size_and_mode():
    model = QuadrantModel()
    model.train()
    cam = grad_cam(model, _blob_image().repeat(3, 1, 1, 1), 0, size=(64, 48))
    assert cam.shape == (3, 64, 48)
    assert model.training


def test_gradcam_invalid_inputs():
    model = QuadrantModel()
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, _blob_image(), 5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        grad_cam(model, _blob_image()[0], 0)
    with pytest.raises(ValueError, match="forward_features"):
        grad_cam(nn.Sequential(model.features, model.head), _blob_image(), 0)


def test_choose_threshold_max_f1():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    # At 0.35: predicted positive {0.35, 0.4, 0.8, 0.9}, so precision 3/4, recall 1, F1 6/7 (the best).
    assert choose_threshold(y, p) == pytest.approx(0.35)
    assert choose_threshold(np.zeros(4), p[:4]) == 0.5


def test_metrics_single_class_target():
    uids = [f"s{i}" for i in range(6)]
    labels = pd.DataFrame({"StudyInstanceUID": uids, **{t: [0, 1, 0, 1, 1, 0] for t in TARGETS}})
    labels["C3"] = 0
    predictions = pd.DataFrame({"StudyInstanceUID": uids[::-1], **{t: np.linspace(0.1, 0.9, 6) for t in TARGETS}})
    table = classification_metrics(labels, predictions)
    assert list(table["target"]) == list(TARGETS)
    c3 = table.set_index("target").loc["C3"]
    assert np.isnan(c3["roc_auc"])
    assert "only class 0" in c3["note"]
    assert c3["tp"] + c3["fn"] == 0
    # The predictions come in reverse order, so study s0 has 0.9 and s5 has 0.1 after alignment.
    c1 = table.set_index("target").loc["C1"]
    assert c1["roc_auc"] == pytest.approx(roc_auc_score([0, 1, 0, 1, 1, 0], np.linspace(0.9, 0.1, 6)))
    assert c1["tn"] + c1["fp"] + c1["fn"] + c1["tp"] == 6


def test_vertebra_confusion_single_visible_slices():
    labels = pd.DataFrame(
        {
            "StudyInstanceUID": ["a"] * 4,
            "slice_number": [1, 2, 3, 4],
            "position_index": [0, 1, 2, 3],
            **{v: [0, 0, 0, 0] for v in VERTEBRAE},
        }
    )
    labels.loc[0, "C1"] = 1
    labels.loc[1, ["C1", "C2"]] = 1  # two visible: left out
    labels.loc[2, "C2"] = 1
    oof = labels[["StudyInstanceUID", "slice_number", "position_index"]].copy()
    for v in VERTEBRAE:
        oof[f"vis_{v}"] = 0.1
    oof.loc[0, "vis_C1"] = 0.9
    oof.loc[2, "vis_C3"] = 0.8  # C2 predicted as C3
    matrix, counts = vertebra_confusion(oof, labels)
    assert matrix.loc["C1", "C1"] == 1
    assert matrix.loc["C2", "C3"] == 1
    assert int(matrix.to_numpy().sum()) == 2
    assert counts["multi_vertebra_slices"] == 1
    assert counts["no_vertebra_slices"] == 1
    assert counts["accuracy"] == pytest.approx(0.5)


# ---- the report of the tiny run ---------------------------------------------------------


@pytest.fixture(scope="module")
def report_run(tiny_run, tmp_path_factory):
    """The tiny run copied to its own runs folder (the shared fixture stays untouched) and its report."""
    runs = tmp_path_factory.mktemp("report") / "runs"
    shutil.copytree(tiny_run.run_dir(), runs / tiny_run.name, ignore=shutil.ignore_patterns("report"))
    config = dataclasses.replace(tiny_run, paths=dataclasses.replace(tiny_run.paths, runs_dir=str(runs)))
    config_path = runs / tiny_run.name / "fold0" / "config.yaml"
    assert main(["report", "--config", str(config_path), f"paths.runs_dir={runs}"]) == 0
    return config


def _report_dir(config) -> Path:
    return config.run_dir() / "report"


def _expected_study(config) -> str:
    predictions, _ = study_predictions(config.run_dir(), read_oof_slices(config.run_dir()))
    return pick_study(predictions)


def test_report_files_exist(report_run):
    out = _report_dir(report_run)
    for name in (
        "index.html", "classification_metrics.csv", "confusion_matrices.png", "roc_curves.png", "calibration.png",
        "vertebra_confusion.csv", "vertebra_confusion.png",
    ):
        assert (out / name).is_file(), name
    study_dir = out / "studies" / _expected_study(report_run)
    assert (study_dir / "profile.png").is_file()
    assert (study_dir / "gradcam.csv").is_file()


def test_report_pngs_open(report_run):
    images = sorted(_report_dir(report_run).rglob("*.png"))
    assert len(images) >= 6
    for path in images:
        with Image.open(path) as image:
            assert image.format == "PNG", path
            assert image.width > 100, path
            assert image.height > 100, path


def test_report_metrics_row_per_target(report_run):
    table = pd.read_csv(_report_dir(report_run) / "classification_metrics.csv")
    assert list(table["target"]) == list(TARGETS)
    labels = pd.read_csv(Path(report_run.paths.data_dir) / "train.csv")
    assert (table["n_studies"] == len(labels)).all()
    assert (table[["tn", "fp", "fn", "tp"]].sum(axis=1) == table["n_studies"]).all()
    np.testing.assert_allclose(table["accuracy"], (table["tn"] + table["tp"]) / table["n_studies"], atol=1e-5)
    assert (table["n_positive"] == table["tp"] + table["fn"]).all()
    for row in table.itertuples():
        if row.n_positive in (0, row.n_studies):
            assert np.isnan(row.roc_auc) and isinstance(row.note, str)
        else:
            assert 0.0 <= row.roc_auc <= 1.0


def test_report_threshold_is_max_f1(report_run):
    config = report_run
    predictions, _ = study_predictions(config.run_dir(), read_oof_slices(config.run_dir()))
    labels = pd.read_csv(Path(config.paths.data_dir) / "train.csv", dtype={"StudyInstanceUID": str})
    table = pd.read_csv(_report_dir(config) / "classification_metrics.csv").set_index("target")
    y = labels.set_index("StudyInstanceUID").loc[predictions["StudyInstanceUID"]]
    for target in ("patient_overall", "C2"):
        truth, scores = y[target].to_numpy(), predictions[target].to_numpy()
        best = 0.0
        for threshold in np.unique(scores):
            predicted = scores >= threshold
            tp = int((predicted & (truth == 1)).sum())
            f1 = 2 * tp / (predicted.sum() + truth.sum())
            best = max(best, f1)
        assert table.loc[target, "f1"] == pytest.approx(best, abs=1e-4), target


def test_report_vertebra_confusion_counts(report_run):
    config = report_run
    matrix = pd.read_csv(_report_dir(config) / "vertebra_confusion.csv", index_col=0)
    assert list(matrix.index) == list(VERTEBRAE)
    assert list(matrix.columns) == list(VERTEBRAE)
    truth = StudyCache(config.paths.cache_dir, "train").vertebra_labels()
    oof = read_oof_slices(config.run_dir())
    merged = oof.merge(truth, on=["StudyInstanceUID", "slice_number"])
    single = int((merged[list(VERTEBRAE)].sum(axis=1) == 1).sum())
    assert single > 0
    assert int(matrix.to_numpy().sum()) == single


def test_report_gradcam_table(report_run):
    config = report_run
    study_uid = _expected_study(config)
    study_dir = _report_dir(config) / "studies" / study_uid
    table = pd.read_csv(study_dir / "gradcam.csv")
    size = config.prepare.image_size
    assert len(table) >= 3
    assert set(table["vertebra"]) <= set(VERTEBRAE)
    predictions, _ = study_predictions(config.run_dir(), read_oof_slices(config.run_dir()))
    row = predictions.set_index("StudyInstanceUID").loc[study_uid, list(VERTEBRAE)]
    assert row.idxmax() in set(table["vertebra"])  # at least the top vertebra
    for vertebra, rows in table.groupby("vertebra"):
        assert (study_dir / f"gradcam_{vertebra}.png").is_file()
        assert len(rows) == 3
        assert rows["fracture_probability"].is_monotonic_decreasing
    assert table["peak_row"].between(0, size - 1).all()
    assert table["peak_col"].between(0, size - 1).all()
    nonzero = table[table["cam_max"] > 0]
    assert (nonzero["cam_max"] > nonzero["cam_min"]).all()


def test_gradcam_on_tiny_fracture_model(report_run):
    """The map of an output with positive evidence on the tiny model is not constant and peaks inside the slice."""
    config = report_run
    models = load_fold_models(config.run_dir(), (0,))[0]
    fcfg = models.config.fracture
    cache = StudyCache(config.paths.cache_dir, "train")
    oof = read_oof_slices(config.run_dir())
    study_uid = oof.loc[oof["fold"] == 0, "StudyInstanceUID"].iloc[0]
    volume = np.asarray(cache.volume(study_uid))
    images = torch.from_numpy(
        np.stack([to_model_input(volume[stack_indices(p, len(volume), fcfg.context_slices)], fcfg.image_size) for p in range(len(volume))])
    )
    with torch.no_grad():
        logits = models.fracture(images)
    # With timm's linear head on average-pooled features, a logit above the bias means that
    # some position has positive evidence, so the map cannot be all zero there.
    margin = logits - models.fracture.get_classifier().bias
    position, output = np.unravel_index(int(torch.argmax(margin)), margin.shape)
    assert margin[position, output] > 0
    cam = grad_cam(models.fracture, images[position : position + 1], int(output), size=volume.shape[1:])[0]
    assert cam.shape == volume.shape[1:]
    assert cam.std() > 0
    peak_row, peak_col = np.unravel_index(np.argmax(cam), cam.shape)
    assert 0 <= peak_row < volume.shape[1]
    assert 0 <= peak_col < volume.shape[2]
    assert cam[peak_row, peak_col] > 0


def test_report_index_links_resolve(report_run):
    out = _report_dir(report_run)
    page = (out / "index.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"]+)"', page))
    assert links
    for link in links:
        assert "://" not in link, link
        assert not link.startswith("/"), link
        assert (out / link).is_file(), link
    every_png = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert every_png <= links
    assert "classification_metrics.csv" in links


def test_report_named_test_study(report_run):
    """A study without OOF predictions (test split) is predicted by every fold model."""
    config = report_run
    test_uid = StudyCache(config.paths.cache_dir, "test").study_uids[0]
    out = _report_dir(config)
    oof = read_oof_slices(config.run_dir())
    predictions, source = study_predictions(config.run_dir(), oof)
    labels = pd.read_csv(Path(config.paths.data_dir) / "train.csv", dtype={"StudyInstanceUID": str})
    metrics = classification_metrics(labels, predictions)
    study_dir = write_study_report(config, test_uid, oof, predictions, metrics, labels, out)
    assert study_dir == out / "studies" / test_uid
    index = write_index(out, config.name, source, {})
    assert (study_dir / "profile.png").is_file()
    table = pd.read_csv(study_dir / "gradcam.csv")
    assert len(table) >= 3
    assert f"studies/{test_uid}/profile.png" in index.read_text()


def test_report_unknown_study(report_run):
    with pytest.raises(FileNotFoundError, match="1.2.3.unknown"):
        run_report(report_run, study_uid="1.2.3.unknown")


def test_report_method_aggregate(report_run):
    config = report_run
    predictions, source = study_predictions(config.run_dir(), read_oof_slices(config.run_dir()), "aggregate")
    assert source.startswith("plain aggregation")
    assert len(predictions) == 40
    summary = json.loads((config.run_dir() / "stack" / "summary.json").read_text())
    _, auto_source = study_predictions(config.run_dir(), read_oof_slices(config.run_dir()))
    assert auto_source.startswith("stacker" if summary["better_method"] == "stacker" else "plain aggregation")


def test_top_vertebra_shown_even_below_its_threshold():
    from csfd.report import _flagged_vertebrae

    probabilities = pd.Series([0.01, 0.49, 0.72, 0.33, 0.13, 0.26, 0.28], index=list(VERTEBRAE))
    thresholds = pd.Series([0.1, 0.45, 0.8, 0.3, 0.5, 0.5, 0.5], index=list(VERTEBRAE))
    assert _flagged_vertebrae(probabilities, thresholds) == [
        ("C3", "top vertebra"),
        ("C2", "above threshold"),
        ("C4", "above threshold"),
    ]
    thresholds["C3"] = 0.7
    assert _flagged_vertebrae(probabilities, thresholds)[0] == ("C3", "above threshold")
