"""The label-fraction study: paired bootstrap, per-study metric sums, and a tiny study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, tiny_overrides
from csfd.config import load_config
from csfd.constants import TARGETS, VERTEBRAE
from csfd.features import aggregate_predictions
from csfd.metric import competition_score
from csfd.ssl import file_sha256
from csfd.ssl_study import (
    METRICS,
    _resample_counts,
    fracture_study_stats,
    paired_bootstrap,
    run_study,
    study_dir,
    vertebra_study_stats,
)

ACCURACY = next(m for m in METRICS if m.name == "vertebra_accuracy")
PER_STUDY = next(m for m in METRICS if m.name == "competition_per_study")


def _accuracy_stats(rng: np.random.Generator, n_seeds: int, n_studies: int, shift: float, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-study (correct, total) statistics of two arms whose accuracies differ by `shift`."""
    totals = rng.integers(20, 60, size=(1, n_studies, 1)).astype(float).repeat(n_seeds, axis=0)
    base_rate = rng.uniform(0.5, 0.8, size=(n_seeds, n_studies, 1))
    treat_rate = base_rate + shift + noise * rng.standard_normal((n_seeds, n_studies, 1))
    baseline = np.concatenate([base_rate * totals, totals], axis=2)
    treatment = np.concatenate([treat_rate * totals, totals], axis=2)
    return baseline, treatment


def test_bootstrap_exact_paired_difference():
    baseline, treatment = _accuracy_stats(np.random.default_rng(0), n_seeds=3, n_studies=30, shift=0.1)
    estimate = paired_bootstrap(baseline, treatment, ACCURACY.compute, n_resamples=500)
    assert estimate.difference == pytest.approx(0.1)
    # Pairing: every resample moves both arms together, so the interval collapses to 0.1.
    assert estimate.low == pytest.approx(0.1)
    assert estimate.high == pytest.approx(0.1)
    assert estimate.n_seeds == 3
    assert estimate.n_studies == 30
    assert estimate.treatment - estimate.baseline == pytest.approx(0.1)


def test_bootstrap_noisy_difference_covered():
    baseline, treatment = _accuracy_stats(np.random.default_rng(1), n_seeds=3, n_studies=200, shift=0.05, noise=0.05)
    estimate = paired_bootstrap(baseline, treatment, ACCURACY.compute, n_resamples=1000, seed=3)
    assert estimate.low < 0.05 < estimate.high
    assert estimate.low > 0.0  # the difference is clearly positive
    assert estimate.high - estimate.low < 0.03


def test_bootstrap_zero_difference_around_zero():
    baseline, treatment = _accuracy_stats(np.random.default_rng(2), n_seeds=2, n_studies=100, shift=0.0)
    same = paired_bootstrap(baseline, treatment, ACCURACY.compute, n_resamples=300)
    assert same.difference == pytest.approx(0.0)
    assert same.low == pytest.approx(0.0)
    assert same.high == pytest.approx(0.0)

    baseline, treatment = _accuracy_stats(np.random.default_rng(4), n_seeds=2, n_studies=100, shift=0.0, noise=0.05)
    noisy = paired_bootstrap(baseline, treatment, ACCURACY.compute, n_resamples=1000)
    assert noisy.low < 0.0 < noisy.high
    assert abs(noisy.difference) < 0.02


def test_bootstrap_resamples_within_folds():
    strata = np.array([0, 0, 0, 1, 1, 2])
    counts = _resample_counts(strata, 50, np.random.default_rng(0))
    assert counts.shape == (50, 6)
    np.testing.assert_array_equal(counts[:, :3].sum(axis=1), 3)
    np.testing.assert_array_equal(counts[:, 3:5].sum(axis=1), 2)
    np.testing.assert_array_equal(counts[:, 5], 1)


def test_bootstrap_rejects_mismatched_arms():
    with pytest.raises(ValueError, match="seeds, studies, statistics"):
        paired_bootstrap(np.zeros((2, 3, 2)), np.zeros((2, 4, 2)), ACCURACY.compute)


def _oof(rng: np.random.Generator, uids: list[str], n_slices: int = 6) -> pd.DataFrame:
    rows = []
    for uid in uids:
        for position in range(n_slices):
            rows.append({"StudyInstanceUID": uid, "slice_number": position + 1, "position_index": position})
    frame = pd.DataFrame(rows)
    frame[[f"vis_{v}" for v in VERTEBRAE]] = rng.uniform(0, 1, size=(len(frame), 7))
    frame[[f"frac_{v}" for v in VERTEBRAE]] = rng.uniform(0.01, 0.6, size=(len(frame), 7))
    return frame


def test_fracture_stats_reproduce_competition_metric():
    rng = np.random.default_rng(0)
    uids = [f"1.2.{i}" for i in range(9)]
    oof = _oof(rng, uids)
    labels = pd.DataFrame({"StudyInstanceUID": uids, **{t: rng.integers(0, 2, size=len(uids)) for t in TARGETS}})
    stats = fracture_study_stats(oof, labels)
    expected = competition_score(labels, aggregate_predictions(oof))
    sums = stats.sum().to_numpy()
    columns = list(stats.columns)
    per_study = sums[columns.index("study_loss")] / sums[columns.index("studies")]
    flat = sums[columns.index("weighted_loss")] / sums[columns.index("weight")]
    assert per_study == pytest.approx(expected["per_study"], rel=1e-9)
    assert flat == pytest.approx(expected["flat"], rel=1e-9)
    assert PER_STUDY.compute(stats[list(PER_STUDY.columns)].to_numpy().sum(axis=0)) == pytest.approx(expected["per_study"])


def test_vertebra_stats_count_slices():
    oof = _oof(np.random.default_rng(0), ["a", "b"], n_slices=2)
    oof[[f"vis_{v}" for v in VERTEBRAE]] = 0.0
    oof.loc[0, "vis_C1"] = 0.9  # right
    oof.loc[1, "vis_C2"] = 0.9  # wrong: truth is C1
    oof.loc[2, "vis_C3"] = 0.9  # right
    # Row 3 predicts nothing, truth shows C3.
    truth = oof[["StudyInstanceUID", "slice_number", "position_index"]].copy()
    truth[list(VERTEBRAE)] = 0
    truth.loc[[0, 1], "C1"] = 1
    truth.loc[[2, 3], "C3"] = 1
    truth = pd.concat([truth, truth.assign(StudyInstanceUID="not-in-oof")])
    stats = vertebra_study_stats(oof, truth)
    assert list(stats.index) == ["a", "b"]
    assert stats.loc["a", "slices"] == 2
    assert stats.loc["a", "exact_slices"] == 1
    assert stats.loc["b", "exact_slices"] == 1
    assert stats.loc["a", "correct_outputs"] == 12  # slice 0: 7, slice 1: 5
    assert stats.loc["a", "tp_C1"] == 1
    assert stats.loc["a", "fn_C1"] == 1
    assert stats.loc["a", "fp_C2"] == 1
    assert stats.loc["b", "fn_C3"] == 1
    assert (stats["exact_slices_anatomy"] == stats["exact_slices"]).all()


# ---------------------------------------------------------------------------------------------
# A tiny study end to end


def _tiny_study_config(tiny_run, runs_dir: Path):
    data_root = Path(tiny_run.paths.data_dir).parent
    return load_config(
        REPO / "configs" / "sample.yaml",
        [
            *tiny_overrides(data_root),
            "name=tiny",
            f"paths.runs_dir={runs_dir}",
            "vertebra.image_size=24",
            "vertebra.epochs=3",  # 3 epochs: the OneCycle schedule never totals exactly 10 steps
            "fracture.image_size=24",
            "fracture.negative_keep=0.2",
            "ssl.study.fracture_epochs=3",  # 3 epochs, for the same reason
            "ssl.study.student_epochs=3",
            "ssl.study.fractions=[0.5, 1.0]",
            "ssl.study.seeds=[0, 1]",
            "ssl.study.bootstrap=200",
        ],
    )


@pytest.fixture(scope="module")
def tiny_study(tiny_run, tmp_path_factory):
    config = _tiny_study_config(tiny_run, tmp_path_factory.mktemp("ssl_study") / "runs")
    summary = run_study(config)
    return config, summary


def test_study_table_rows_and_intervals(tiny_study):
    config, summary = tiny_study
    root = study_dir(config)
    table = pd.read_csv(root / "table.csv")
    assert len(table) == 2 * len(METRICS)
    assert sorted(table["fraction"].unique()) == [0.5, 1.0]
    assert set(table["metric"]) == {m.name for m in METRICS}
    assert (table["n_seeds"] == 2).all()
    finite = table.dropna(subset=["difference_low", "difference_high"])
    assert len(finite) >= len(table) - 2  # macro F1 may be undefined only without any prediction
    assert (finite["difference_low"] <= finite["difference_high"]).all()
    # table.csv rounds to 6 decimals.
    np.testing.assert_allclose(table["difference"], table["semi_supervised"] - table["supervised"], atol=2e-6)
    vertebra = table[table["metric"].str.startswith("vertebra")]
    fracture = table[table["metric"].str.startswith("competition")]
    np.testing.assert_allclose(vertebra["difference_matched"], vertebra["semi_supervised"] - vertebra["supervised_matched"], atol=2e-6)
    assert vertebra["supervised_matched"].notna().all()
    # The compute-matched control trains no fracture model.
    assert fracture["supervised_matched"].isna().all()
    assert fracture["difference_matched"].isna().all()
    assert fracture["difference"].notna().all()

    folds = pd.read_csv(config.paths.folds_csv)
    held_out = set(folds.loc[folds["fold"] == 0, "StudyInstanceUID"])
    segmented = set(pd.read_csv(Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv")["StudyInstanceUID"])
    fracture_rows = table[table["metric"] == "competition_per_study"]
    vertebra_rows = table[table["metric"] == "vertebra_exact_match"]
    assert (fracture_rows["n_studies"] == len(held_out)).all()
    assert (vertebra_rows["n_studies"] == len(held_out & segmented)).all()

    markdown = (root / "table.md").read_text()
    assert "| 0.5 | vertebra_exact_match |" in markdown
    assert "95% interval" in markdown
    png = (root / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5000

    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["kind"] == "ssl_study"
    assert len(metrics["results"]) == len(table)
    assert metrics["wall_seconds"] > 0
    assert summary["config_hash"] == config.hash()


def test_study_cells_and_pairing(tiny_study):
    config, _ = tiny_study
    root = study_dir(config)
    cells = pd.read_csv(root / "cells.csv")
    assert len(cells) == 2 * 3 * 2
    assert set(cells["arm"]) == {"supervised", "semi_supervised", "supervised_matched"}
    half = cells.loc[cells["fraction"] == 0.5, "labelled_studies"]
    full = cells.loc[cells["fraction"] == 1.0, "labelled_studies"]
    assert half.max() < full.min()

    supervised = root / "cells" / "f0.5-supervised-s0" / "fold0"
    semi = root / "cells" / "f0.5-semi_supervised-s0" / "fold0"
    # The semi-supervised cell starts from the supervised cell's model.
    teacher = torch.load(supervised / "vertebra.pt", weights_only=True)["state_dict"]
    round0 = torch.load(semi / "vertebra_round0.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(teacher[k], round0[k]) for k in teacher)

    record0 = json.loads((semi / "pseudo_labels" / "round0.json").read_text())
    record1 = json.loads((semi / "pseudo_labels" / "round1.json").read_text())
    assert record0["round"] == 0
    assert record0["trains_round"] == 1
    assert record0["teacher_weights"] == "vertebra_round0.pt"
    assert record0["teacher_sha256"] == file_sha256(semi / "vertebra_round0.pt")
    assert record1["round"] == 1
    assert record1["trains_round"] is None
    assert record1["teacher_weights"] == "vertebra.pt"
    assert record1["teacher_sha256"] == file_sha256(semi / "vertebra.pt")
    final = pd.read_csv(semi / "pseudo_labels.csv")
    assert set(final.columns) >= {"StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE}
    assert not (supervised / "pseudo_labels" / "round1.json").exists()
    assert json.loads((supervised / "pseudo_labels" / "round0.json").read_text())["teacher_weights"] == "vertebra.pt"

    # The control starts from the same model and takes at least as many optimiser steps as the
    # semi-supervised student, on labelled slices only.
    matched = root / "cells" / "f0.5-supervised_matched-s0" / "fold0"
    control_start = torch.load(matched / "vertebra_round0.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(teacher[k], control_start[k]) for k in teacher)
    semi_rounds = json.loads((semi / "metrics.json").read_text())["vertebra"]["rounds"]
    matched_rounds = json.loads((matched / "metrics.json").read_text())["vertebra"]["rounds"]
    assert matched_rounds[1]["pseudo_slices"] == 0
    assert semi_rounds[1]["pseudo_slices"] > 0
    assert matched_rounds[1]["optimizer_steps"] >= semi_rounds[1]["optimizer_steps"]
    assert (matched / "vertebra_oof.csv").is_file()
    assert not (matched / "fracture.pt").exists()

    # The study's metrics agree with the fold's own metrics.json (same model, same definition).
    fold_metrics = json.loads((supervised / "metrics.json").read_text())
    row = cells[(cells["fraction"] == 0.5) & (cells["arm"] == "supervised") & (cells["seed"] == 0)].iloc[0]
    assert row["competition_per_study"] == pytest.approx(fold_metrics["cv"]["aggregate"]["per_study"], rel=1e-6)
    assert row["competition_flat"] == pytest.approx(fold_metrics["cv"]["aggregate"]["flat"], rel=1e-6)
    assert row["vertebra_accuracy"] == pytest.approx(fold_metrics["vertebra"]["valid_slice_accuracy"], abs=2e-3)


def test_study_resumes_and_updates_leaderboard(tiny_study):
    config, first = tiny_study
    second = run_study(config)
    assert second["cells_reused"] == 12
    assert second["wall_seconds"] < first["wall_seconds"]
    board = pd.read_csv(Path(config.paths.runs_dir).parent / "leaderboard_ssl.csv")
    assert len(board) == 1
    assert board.loc[0, "study"] == study_dir(config).name
    assert "vertebra_exact_match@0.5_difference" in board.columns
