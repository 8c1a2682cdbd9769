"""Anatomical consistency of C1..C7 along z on hand-built slice sequences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from csfd.anatomy import (
    STATE_NAMES,
    AnatomyOptions,
    count_order_violations,
    decode_states,
    min_level_slices_for,
    refine_frame,
    refine_visibility,
    smooth_along_z,
)
from csfd.constants import VERTEBRAE

# Two empty slices above, three slices per vertebra C1..C7 (indices 0..6), two empty below.
LEVELS = [None] * 2 + [k for k in range(7) for _ in range(3)] + [None] * 2


def probabilities(levels, high=0.9, low=0.02) -> np.ndarray:
    """Slice probabilities that show level k with `high` and every other vertebra with `low`."""
    p = np.full((len(levels), 7), low)
    for i, level in enumerate(levels):
        if level is not None:
            p[i, level] = high
    return p


def swapped_levels() -> list:
    """LEVELS with the C3 block (slices 8..10) and the C5 block (slices 14..16) exchanged."""
    levels = list(LEVELS)
    levels[8:11] = [4] * 3
    levels[14:17] = [2] * 3
    return levels


TRUTH = probabilities(LEVELS, 1.0, 0.0) > 0.5


def test_clean_sequence_unchanged():
    clean = probabilities(LEVELS)
    refined = refine_visibility(clean, None, AnatomyOptions(min_level_slices=2))
    assert np.array_equal(refined > 0.5, TRUTH)
    assert np.abs(refined - TRUTH).max() < 0.15


@pytest.mark.parametrize("min_level_slices", [2, 3])
def test_swapped_c3_c5_block_corrected(min_level_slices):
    swapped = probabilities(swapped_levels())
    assert count_order_violations(swapped) == 2
    refined = refine_visibility(swapped, None, AnatomyOptions(min_level_slices=min_level_slices))
    assert np.array_equal(refined > 0.5, TRUTH)
    assert count_order_violations(refined) == 0
    # The slices that claimed C5 above C4 now show C3, and the reverse.
    assert refined[8:11, 2].min() > 0.5
    assert refined[8:11, 4].max() < 0.5
    assert refined[14:17, 4].min() > 0.5


def test_swapped_block_decoded_in_order():
    states = decode_states(probabilities(swapped_levels()), None, AnatomyOptions(min_level_slices=3))
    expected = ["above"] * 2 + [VERTEBRAE[k] for k in range(7) for _ in range(3)] + ["below"] * 2
    assert list(states) == expected
    order = [STATE_NAMES.index(s) for s in states]
    assert all(b >= a for a, b in zip(order, order[1:]))


def test_reversed_rows_use_position_index():
    swapped = probabilities(swapped_levels())
    options = AnatomyOptions(min_level_slices=3)
    in_order = refine_visibility(swapped, np.arange(len(swapped)), options)
    # The same slices listed feet first: row i is position n-1-i.
    positions = np.arange(len(swapped))[::-1]
    reversed_rows = refine_visibility(swapped[::-1], positions, options)
    np.testing.assert_allclose(reversed_rows[::-1], in_order, atol=1e-9)
    assert np.array_equal(reversed_rows[::-1] > 0.5, TRUTH)


def test_order_comes_from_position_not_rows():
    # Rows listed feet first but labelled as if head first would read as C7..C1: every step
    # then goes up the spine, so the chain must not keep them.
    clean = probabilities(LEVELS)
    assert count_order_violations(clean[::-1]) == 6
    assert count_order_violations(clean[::-1], np.arange(len(clean))[::-1]) == 0


def test_single_wrong_slice_suppressed():
    levels = list(LEVELS)
    p = probabilities(levels)
    p[6, :] = 0.05
    p[6, 6] = 0.95  # one C7 slice inside the C2 block
    refined = refine_visibility(p, None, AnatomyOptions(min_level_slices=2))
    assert refined[6, 6] < 0.1
    assert refined[6, 1] > 0.5


def test_partial_scan_keeps_its_levels():
    # A scan from C4 down: with edge_penalty 0 the missing C1..C3 cost nothing.
    levels = [3] * 3 + [4] * 3 + [5] * 3 + [6] * 3 + [None] * 2
    p = probabilities(levels)
    refined = refine_visibility(p, None, AnatomyOptions(min_level_slices=2, edge_penalty=0.0))
    assert np.array_equal(refined > 0.5, probabilities(levels, 1.0, 0.0) > 0.5)


def test_edge_penalty_places_every_level():
    # A model that detects vertebrae but names only C2 below C1: the full chain spreads C3..C7
    # over those slices in order instead of calling them all C2.
    levels = [None] * 2 + [0] * 3 + [1] * 15 + [None] * 3
    p = probabilities(levels, high=0.6, low=0.1)
    options = AnatomyOptions(min_level_slices=2, identity_noise=0.1)
    states = decode_states(p, None, options)
    assert set(VERTEBRAE) <= set(states)
    order = [STATE_NAMES.index(s) for s in states]
    assert all(b >= a for a, b in zip(order, order[1:]))
    partial = decode_states(p, None, AnatomyOptions(min_level_slices=2, identity_noise=0.1, edge_penalty=0.0))
    assert "C7" not in set(partial)


def test_dens_slices_keep_both_vertebrae():
    # Slices through the dens show C1 and C2 together; a level state allows its neighbour.
    # The scan ends at C3, so edge_penalty is 0.
    levels = [None, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    p = probabilities(levels)
    p[2:4, 1] = 0.9
    refined = refine_visibility(p, None, AnatomyOptions(min_level_slices=2, edge_penalty=0.0))
    assert refined[2:4, 0].min() > 0.5
    assert refined[2:4, 1].min() > 0.5


def test_refine_frame_per_study_with_spacing():
    swapped = probabilities(swapped_levels())
    clean = probabilities(LEVELS)
    n = len(LEVELS)
    frame = pd.DataFrame(
        {
            "StudyInstanceUID": ["a"] * n + ["b"] * n,
            "position_index": np.concatenate([np.arange(n), np.arange(n)]),
            # 3 mm spacing: 7 mm covers 2 slices.
            "z": np.concatenate([-3.0 * np.arange(n), 100 - 3.0 * np.arange(n)]),
        }
    )
    frame[list(VERTEBRAE)] = np.concatenate([swapped, clean])
    shuffled = frame.sample(frac=1.0, random_state=0)
    refined = refine_frame(shuffled, VERTEBRAE, AnatomyOptions(), min_level_mm=7.0)
    assert list(refined.index) == list(shuffled.index)
    refined = refined.sort_index()
    expected_a = refine_visibility(swapped, None, AnatomyOptions(min_level_slices=2))
    np.testing.assert_allclose(refined.loc[: n - 1, list(VERTEBRAE)].to_numpy(), expected_a, atol=1e-5)
    assert np.array_equal(refined.loc[n:, list(VERTEBRAE)].to_numpy() > 0.5, TRUTH)


def test_min_level_slices_from_spacing():
    assert min_level_slices_for(np.array([0.0, -3.0, -6.0, -9.0]), 7.0) == 2
    assert min_level_slices_for(np.array([0.0, 1.0, 2.0]), 7.0) == 7
    assert min_level_slices_for(np.array([0.0, 2.5, 5.0]), 7.0) == 2
    assert min_level_slices_for(np.array([0.0, 10.0]), 7.0) == 1
    assert min_level_slices_for(np.array([0.0, 1.0]), 0.0) == 1


def test_smoothing_averages_neighbours():
    p = np.zeros((11, 7))
    p[5, 0] = 1.0
    smoothed = smooth_along_z(p, 1.0)
    assert smoothed[5, 0] < 1.0
    assert smoothed[4, 0] == pytest.approx(smoothed[6, 0])
    assert smoothed[4, 0] > 0.0
    # Far from the ends the kernel keeps the total.
    assert smoothed[:, 0].sum() == pytest.approx(1.0)
    assert smooth_along_z(p, 0.0) is p


def test_invalid_input_rejected():
    with pytest.raises(ValueError, match="shape"):
        refine_visibility(np.zeros((4, 6)))
    bad = np.zeros((4, 7))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_visibility(bad)
    with pytest.raises(ValueError, match="repeats"):
        refine_visibility(np.zeros((3, 7)), [0, 1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refine_visibility(np.full((3, 7), 1.5))
    frame = pd.DataFrame({"StudyInstanceUID": ["x"], "position_index": [0]})
    with pytest.raises(ValueError, match="missing column"):
        refine_frame(frame)


def test_empty_study_returns_empty():
    assert refine_visibility(np.zeros((0, 7))).shape == (0, 7)
    assert count_order_violations(np.zeros((0, 7))) == 0
