"""Tests of the per-study stacker features built from slice predictions."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from csfd.constants import VERTEBRAE
from csfd.features import (
    FEATURE_NAMES,
    aggregate_from_features,
    aggregate_predictions,
    build_features,
    feature_names,
    target_feature_columns,
)

STUDY_A = "1.2.826.0.1.3680043.100"
STUDY_B = "1.2.826.0.1.3680043.200"


def _study_rows(uid: str, n: int, vis: dict[str, list[float]], frac: dict[str, list[float]]) -> pd.DataFrame:
    """Rows of one study; vertebrae not given get vis 0 and frac `frac.get('rest')`."""
    rest = frac.get("rest", [0.0] * n)
    frame = pd.DataFrame(
        {"StudyInstanceUID": uid, "slice_number": np.arange(n, 0, -1), "position_index": np.arange(n)}
    )
    for vertebra in VERTEBRAE:
        frame[f"vis_{vertebra}"] = vis.get(vertebra, [0.0] * n)
        frame[f"frac_{vertebra}"] = frac.get(vertebra, rest)
    return frame


@pytest.fixture
def slices() -> pd.DataFrame:
    study_a = _study_rows(
        STUDY_A,
        4,
        vis={"C1": [0.9, 0.8, 0.2, 0.0], "C2": [0.0, 0.1, 0.6, 0.9], "C3": [0.1, 0.3, 0.4, 0.2]},
        frac={
            "C1": [0.5, 0.7, 0.9, 0.1],
            "C2": [0.2, 0.2, 0.3, 0.1],
            "C3": [0.9, 0.2, 0.6, 0.4],
            "rest": [0.05] * 4,
        },
    )
    study_b = _study_rows(STUDY_B, 3, vis={"C1": [1.0, 1.0, 1.0]}, frac={"C1": [0.1, 0.2, 0.3]})
    return pd.concat([study_a, study_b], ignore_index=True)


def test_features_hand_computed_values(slices):
    features = build_features(slices, top_k=2)
    a = features.loc[STUDY_A]
    b = features.loc[STUDY_B]

    assert a["C1_wmean"] == pytest.approx((0.9 * 0.5 + 0.8 * 0.7 + 0.2 * 0.9) / 1.9, abs=1e-12)
    assert a["C1_max"] == pytest.approx(0.7)
    assert a["C1_topk_mean"] == pytest.approx(0.6)
    assert a["C1_q50"] == pytest.approx(0.6)
    assert a["C1_q90"] == pytest.approx(0.68)
    assert a["C1_n_visible"] == 2
    assert a["C1_vis_sum"] == pytest.approx(1.9)
    assert a["C1_extent"] == pytest.approx(0.5)

    assert a["C2_wmean"] == pytest.approx((0.1 * 0.2 + 0.6 * 0.3 + 0.9 * 0.1) / 1.6, abs=1e-12)
    assert a["C2_max"] == pytest.approx(0.3)
    assert a["C2_topk_mean"] == pytest.approx(0.2)
    assert a["C2_n_visible"] == 2

    assert b["C1_wmean"] == pytest.approx(0.2)
    assert b["C1_max"] == pytest.approx(0.3)
    assert b["C1_topk_mean"] == pytest.approx(0.25)
    assert b["C1_n_visible"] == 3
    assert b["C1_extent"] == pytest.approx(1.0)
    assert b["study_n_slices"] == 3
    assert a["study_n_slices"] == 4


def test_features_no_visible_slice_uses_top_vis_slices(slices):
    features = build_features(slices, top_k=2)
    a = features.loc[STUDY_A]

    # No C3 vis exceeds 0.5: the two slices with the highest vis (0.4 and 0.3) carry frac 0.6 and 0.2.
    assert a["C3_n_visible"] == 0
    assert a["C3_max"] == pytest.approx(0.6)
    assert a["C3_topk_mean"] == pytest.approx(0.4)
    assert a["C3_extent"] == 0.0
    assert a["C3_wmean"] == pytest.approx((0.1 * 0.9 + 0.3 * 0.2 + 0.4 * 0.6 + 0.2 * 0.4) / 1.0)


def test_features_zero_visibility_falls_back_to_mean(slices, caplog):
    with caplog.at_level(logging.WARNING, logger="csfd.features"):
        features = build_features(slices)

    assert features.loc[STUDY_A, "C4_wmean"] == pytest.approx(0.05)
    assert features.loc[STUDY_B, "C7_wmean"] == 0.0
    assert "sum(vis) = 0" in caplog.text


def test_features_neighbour_and_study_columns(slices):
    features = build_features(slices, top_k=2)
    a = features.loc[STUDY_A]

    assert a["C2_prev_wmean"] == a["C1_wmean"]
    assert a["C2_prev_max"] == a["C1_max"]
    assert a["C2_next_topk_mean"] == a["C3_topk_mean"]
    assert a["C1_next_wmean"] == a["C2_wmean"]
    assert np.isnan(a["C1_prev_wmean"])
    assert np.isnan(a["C7_next_max"])
    wmeans = np.array([a[f"{v}_wmean"] for v in VERTEBRAE])
    assert a["study_max_wmean"] == pytest.approx(wmeans.max())
    assert a["study_noisy_or_wmean"] == pytest.approx(1.0 - np.prod(1.0 - wmeans))
    assert a["study_sum_wmean"] == pytest.approx(wmeans.sum())
    assert a["study_argmax_vertebra"] == 1
    assert a["study_n_vertebrae_visible"] == 2
    assert a["study_max_max"] == pytest.approx(0.7)


def test_features_study_info_spacing(slices, caplog):
    info = pd.DataFrame({"StudyInstanceUID": [STUDY_A], "n_slices": [4], "slice_spacing": [2.0]})
    with caplog.at_level(logging.WARNING, logger="csfd.features"):
        features = build_features(slices, info)

    assert features.loc[STUDY_A, "study_slice_spacing"] == 2.0
    assert features.loc[STUDY_A, "C1_extent_mm"] == pytest.approx(4.0)
    assert features.loc[STUDY_A, "C3_extent_mm"] == 0.0
    assert np.isnan(features.loc[STUDY_B, "study_slice_spacing"])
    assert np.isnan(features.loc[STUDY_B, "C1_extent_mm"])
    assert "study_info has no row for 1 of 2 studies" in caplog.text


def test_features_without_study_info_have_nan_spacing(slices):
    features = build_features(slices)

    assert features["study_slice_spacing"].isna().all()
    assert features["C1_extent_mm"].isna().all()


def test_feature_names_stable(slices):
    features = build_features(slices)

    assert list(features.columns) == list(FEATURE_NAMES)
    assert feature_names() == list(FEATURE_NAMES)
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 7 * 15 + 9
    assert FEATURE_NAMES[:5] == ("C1_wmean", "C1_max", "C1_topk_mean", "C1_q50", "C1_q90")
    assert FEATURE_NAMES[-1] == "study_argmax_vertebra"
    assert features.index.name == "StudyInstanceUID"
    assert list(features.index) == sorted([STUDY_A, STUDY_B])


def test_features_row_order_irrelevant(slices):
    forward = build_features(slices)
    backward = build_features(slices.iloc[::-1].reset_index(drop=True))

    pd.testing.assert_frame_equal(forward, backward, check_exact=True)


def test_aggregate_predictions_values(slices):
    wide = aggregate_predictions(slices).set_index("StudyInstanceUID")

    assert list(wide.columns) == ["patient_overall", *VERTEBRAE]
    assert wide.loc[STUDY_B, "C1"] == pytest.approx(0.2)
    assert wide.loc[STUDY_B, "C2"] == 0.0
    assert wide.loc[STUDY_B, "patient_overall"] == pytest.approx(0.2)
    expected = 1.0 - np.prod(1.0 - wide.loc[STUDY_A, list(VERTEBRAE)].to_numpy())
    assert wide.loc[STUDY_A, "patient_overall"] == pytest.approx(expected)


def test_aggregate_matches_features(slices):
    from_slices = aggregate_predictions(slices)
    from_features = aggregate_from_features(build_features(slices))

    pd.testing.assert_frame_equal(from_slices, from_features, check_exact=True)


def test_target_columns_local_scope():
    c3 = target_feature_columns("C3", FEATURE_NAMES)
    overall = target_feature_columns("patient_overall", FEATURE_NAMES)

    assert "C3_wmean" in c3
    assert "C3_prev_wmean" in c3
    assert "C3_next_max" in c3
    assert "study_max_wmean" in c3
    assert "C4_wmean" not in c3
    assert "C2_max" not in c3
    assert "C1_wmean" in overall
    assert "C7_q90" in overall
    assert "C2_prev_wmean" not in overall
    assert target_feature_columns("C3", FEATURE_NAMES, scope="all") == list(FEATURE_NAMES)
    assert target_feature_columns("C5", ["noise_0", "C5_max"]) == ["noise_0", "C5_max"]


def test_slices_missing_column_rejected(slices):
    with pytest.raises(ValueError, match="frac_C4"):
        build_features(slices.drop(columns=["frac_C4"]))


def test_slices_out_of_range_probability_rejected(slices):
    bad = slices.copy()
    bad.loc[5, "vis_C2"] = 1.5

    with pytest.raises(ValueError, match=f"vis_C2 is 1.5 for study {STUDY_B}"):
        build_features(bad)


def test_slices_repeated_position_rejected(slices):
    bad = slices.copy()
    bad.loc[1, "position_index"] = 0

    with pytest.raises(ValueError, match=f"study {STUDY_A} has position_index 0 more than once"):
        build_features(bad)


def test_position_beyond_slice_count_rejected(slices):
    info = pd.DataFrame({"StudyInstanceUID": [STUDY_A, STUDY_B], "n_slices": [3, 3]})

    with pytest.raises(ValueError, match=f"study {STUDY_A}: position_index 3 is not below the slice count 3"):
        build_features(slices, info)


def test_invalid_top_k_rejected(slices):
    with pytest.raises(ValueError, match="top_k"):
        build_features(slices, top_k=0)
