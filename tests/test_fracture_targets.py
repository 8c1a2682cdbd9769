"""Slice targets of the fracture model: visibility source, anatomy step, threshold and boxes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from csfd.config import load_config
from csfd.constants import VERTEBRAE
from csfd.fracture_targets import fracture_targets, target_visibility_labels, visibility_targets

UID_MODEL = "1.2.826.0.1.3680043.101"
UID_SEGMENTED = "1.2.826.0.1.3680043.202"
# Two empty slices above, three slices per vertebra C1..C7, two empty slices below.
LEVELS = [None] * 2 + [k for k in range(7) for _ in range(3)] + [None] * 2


def label_frame(uid: str, levels, high=0.9, low=0.02, spacing_mm=3.0) -> pd.DataFrame:
    """Slice labels that show level k with `high` and every other vertebra with `low`."""
    p = np.full((len(levels), 7), low)
    for i, level in enumerate(levels):
        if level is not None:
            p[i, level] = high
    frame = pd.DataFrame(p, columns=list(VERTEBRAE))
    frame.insert(0, "position_index", np.arange(len(levels)))
    frame.insert(0, "slice_number", np.arange(len(levels)) + 1)
    frame.insert(0, "StudyInstanceUID", uid)
    frame["z"] = -spacing_mm * np.arange(len(levels))
    return frame


def slices_of(*frames: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(frames)[["StudyInstanceUID", "slice_number", "position_index", "z"]].reset_index(drop=True)


def test_anatomy_step_removes_a_level_out_of_order():
    # A confident C1 on one slice in the middle of the C6 block cannot follow the spine's order.
    levels = list(LEVELS)
    labels = label_frame(UID_MODEL, levels)
    spike = 2 + 5 * 3 + 1
    labels.loc[spike, "C1"] = 0.95
    config = load_config(None, ["ssl.anatomy_min_level_mm=0"])
    refined = target_visibility_labels(config, labels.drop(columns="z"), slices_of(labels))
    assert refined.loc[spike, "C1"] < 0.1
    assert refined.loc[spike, "C6"] > 0.5
    assert list(refined.columns) == ["StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE]


def test_anatomy_step_skipped():
    labels = label_frame(UID_MODEL, LEVELS)
    labels.loc[10, "C1"] = 0.95
    raw = labels.drop(columns="z")
    for overrides in (["fracture.anatomy_targets=false"], ["ssl.rounds=1", "ssl.anatomy=true"]):
        unchanged = target_visibility_labels(load_config(None, overrides), raw, slices_of(labels))
        pd.testing.assert_frame_equal(unchanged, raw)


def test_threshold_makes_model_visibility_hard_and_keeps_segmentations():
    model = label_frame(UID_MODEL, [0, 0, None]).drop(columns="z")
    model.loc[0, "C1"] = 0.7
    model.loc[1, "C1"] = 0.3
    segmented = label_frame(UID_SEGMENTED, [1, None, None]).drop(columns="z")
    truth = segmented[["StudyInstanceUID", "slice_number", *VERTEBRAE]].copy()
    truth[list(VERTEBRAE)] = 0.0
    truth.loc[0, "C2"] = 1.0
    truth.loc[1, "C2"] = 1.0  # the segmentation, not the model, decides for this study
    frame = pd.concat([model, segmented]).reset_index(drop=True)
    labels = frame.copy()

    hard = visibility_targets(frame, labels, truth, {UID_SEGMENTED}, threshold=0.5)
    assert hard[:3, 0].tolist() == [1.0, 0.0, 0.0]
    assert hard[3:, 1].tolist() == [1.0, 1.0, 0.0]
    assert set(np.unique(hard)) <= {0.0, 1.0}

    soft = visibility_targets(frame, labels, truth, {UID_SEGMENTED}, threshold=-1.0)
    assert soft[:3, 0] == pytest.approx([0.7, 0.3, 0.02])
    assert soft[3:, 1].tolist() == [1.0, 1.0, 0.0]


def test_missing_model_labels_name_the_study():
    frame = label_frame(UID_MODEL, [0, 0]).drop(columns="z")
    with pytest.raises(ValueError, match=UID_MODEL):
        visibility_targets(frame, frame.iloc[:1], frame.iloc[:0], set(), threshold=0.5)


def test_box_slice_weight():
    frame = label_frame(UID_MODEL, [6, 6, 6, None]).drop(columns="z")
    visibility = (frame[list(VERTEBRAE)].to_numpy(np.float32) > 0.5).astype(np.float32)
    labels = pd.DataFrame({"StudyInstanceUID": [UID_MODEL], **{v: [int(v == "C7")] for v in VERTEBRAE}}).set_index("StudyInstanceUID")
    boxes = pd.DataFrame({"StudyInstanceUID": [UID_MODEL], "slice_number": [2]})
    config = load_config(None, ["fracture.positive_weight=1.5", "fracture.box_weight=5"]).fracture
    targets, weights = fracture_targets(frame, visibility, labels, boxes, config)
    assert targets.shape == (4, 14)
    assert targets[:, 13].tolist() == [1.0, 1.0, 1.0, 0.0]  # the C7 fracture target is the C7 visibility
    assert targets[:, 7:13].max() == 0.0
    assert weights[:, 13].tolist() == [1.5, 5.0, 1.5, 1.0]
    assert weights[:, :7].tolist() == np.ones((4, 7)).tolist()
