"""The competition metric against known values on the real labels and small hand cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from csfd.constants import PREVALENCE, TARGETS
from csfd.metric import (
    ScoreInputError,
    competition_score,
    overall_from_vertebrae,
    per_target_scores,
    prior_predictions,
)


def _wide(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)[["StudyInstanceUID", *TARGETS]]


def _study(uid: str, value: float = 0.0, **overrides: float) -> dict:
    row = {"StudyInstanceUID": uid, **{t: value for t in TARGETS}}
    row.update(overrides)
    return row


def test_constant_half_on_real_labels(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    predictions = labels.copy()
    predictions[list(TARGETS)] = 0.5
    assert competition_score(labels, predictions)["per_study"] == pytest.approx(0.69315, abs=5e-6)


def test_prevalence_prior_on_real_labels(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    score = competition_score(labels, prior_predictions(labels))
    assert score["per_study"] == pytest.approx(0.56382, abs=5e-6)


def test_rounded_prior_constants_score_the_same(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    score = competition_score(labels, prior_predictions(labels, PREVALENCE))
    assert score["per_study"] == pytest.approx(0.56382, abs=5e-6)


def test_public_solution_predictions(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    predictions = pd.read_csv(competition_dir / "public_solution_predictions.csv")
    assert len(predictions) == 2018
    scored = labels[labels["StudyInstanceUID"].isin(predictions["uid"])]
    assert competition_score(scored, predictions)["per_study"] == pytest.approx(0.48912, abs=5e-6)


def test_clipping_is_our_own():
    labels = _wide([_study("a", 0.0, C1=1.0, patient_overall=1.0)])
    predictions = _wide([_study("a", 0.0)])
    per_target = per_target_scores(labels, predictions)
    assert per_target["C1"] == pytest.approx(-math.log(1e-15), abs=1e-3)
    assert per_target["C1"] == pytest.approx(34.539, abs=1e-3)


def test_single_class_column_is_defined():
    labels = _wide([_study("a"), _study("b")])
    predictions = _wide([_study("a", C1=0.1), _study("b", C1=0.2)])
    assert per_target_scores(labels, predictions)["C1"] == pytest.approx(0.164252, abs=1e-6)


def test_weights_order_one_negative_study():
    labels = _wide([_study("a")])
    predictions = _wide([_study("a", patient_overall=0.5)])
    assert competition_score(labels, predictions)["per_study"] == pytest.approx(0.34657, abs=5e-6)


def test_per_study_and_flat_forms_differ():
    labels = _wide([_study("neg"), _study("pos", patient_overall=1.0, C1=1.0)])
    predictions = _wide([_study("neg"), _study("pos", 0.5)])
    score = competition_score(labels, predictions)
    assert score["per_study"] == pytest.approx(0.34657, abs=5e-6)
    assert score["flat"] == pytest.approx(0.42359, abs=5e-6)


def test_submission_format_matches_wide():
    labels = _wide([_study("1.2.3", C2=1.0, patient_overall=1.0), _study("1.2.4")])
    rng = np.random.default_rng(0)
    wide = _wide([_study("1.2.3"), _study("1.2.4")])
    wide[list(TARGETS)] = rng.uniform(0.05, 0.95, size=(2, len(TARGETS)))
    long = wide.melt(id_vars="StudyInstanceUID", var_name="target", value_name="fractured")
    submission = pd.DataFrame(
        {"row_id": long["StudyInstanceUID"] + "_" + long["target"], "fractured": long["fractured"]}
    )
    assert competition_score(labels, submission) == pytest.approx(competition_score(labels, wide))


def test_missing_study_is_an_error():
    labels = _wide([_study("a"), _study("b")])
    with pytest.raises(ScoreInputError, match="missing"):
        competition_score(labels, _wide([_study("a", 0.1)]))


def test_value_outside_unit_interval_is_an_error():
    labels = _wide([_study("a")])
    with pytest.raises(ScoreInputError, match=r"1\.5 for a C3"):
        competition_score(labels, _wide([_study("a", 0.1, C3=1.5)]))


def test_overall_from_vertebrae():
    wide = _wide([_study("a", 0.5)])
    assert overall_from_vertebrae(wide).iloc[0] == pytest.approx(1 - 0.5**7)
