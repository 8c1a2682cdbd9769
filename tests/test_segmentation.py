"""Segmentation alignment from the NIfTI affine and DICOM geometry, and vertebra visibility."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from csfd.segmentation import SegmentationAlignmentError, load_segmentation_aligned, vertebra_visibility
from csfd.series import load_series
from dicom_factory import hu_to_words, write_ct

# TotalSegmentator class map: 32 is vertebra T12 and 33 is T11.
T12, T11 = 32, 33


@pytest.fixture(scope="module")
def totalsegmentator_case(real_ct_dir):
    folder = real_ct_dir / "totalsegmentator"
    series = load_series(folder / "example_ct_dicom")
    nii_path = folder / "example_seg_dicom.nii.gz"
    return series, nii_path, load_segmentation_aligned(nii_path, series)


def test_real_vertebrae_land_on_bone(totalsegmentator_case):
    series, _, labels = totalsegmentator_case
    assert labels.shape == series.pixels.shape
    assert labels.dtype == np.uint8
    for label in (T12, T11):
        mask = labels == label
        assert mask.sum() > 1000
        assert float(series.pixels[mask].mean()) > 250.0


def test_wrong_flip_puts_vertebrae_on_soft_tissue(totalsegmentator_case):
    series, _, labels = totalsegmentator_case
    flipped = labels[:, ::-1, :]  # upside down in the slice plane
    for label in (T12, T11):
        aligned_mean = float(series.pixels[labels == label].mean())
        flipped_mean = float(series.pixels[flipped == label].mean())
        assert flipped_mean < 0.0
        assert flipped_mean < aligned_mean - 400.0


def test_agrees_with_fixed_flip_on_normal_study(totalsegmentator_case):
    # Public solutions use nii[:, ::-1, ::-1].transpose(2, 1, 0). On this head-first study it matches.
    _, nii_path, labels = totalsegmentator_case
    volume = np.asanyarray(nib.load(nii_path).dataobj)
    assert np.array_equal(volume[:, ::-1, ::-1].transpose(2, 1, 0), labels)


# --- a small volume written here ----------------------------------------------------------------

ROWS, COLUMNS, N_SLICES = 6, 4, 5
ROW_SPACING, COLUMN_SPACING, SLICE_STEP = 0.8, 0.6, 2.5
X0, Y0, Z_TOP = -30.0, 15.0, 40.0
BRIGHT = (2, ROWS - 1, 0)  # (index from the top slice, row, column): a corner of a non-square slice
LABEL = 5


def _write_small_study(folder: Path, reversed_numbers: bool) -> None:
    """Write five axial 6x4 slices: one pixel is bone (1500 HU), the rest water (0 HU)."""
    folder.mkdir()
    for index_from_top in range(N_SLICES):
        hu = np.zeros((ROWS, COLUMNS))
        if index_from_top == BRIGHT[0]:
            hu[BRIGHT[1], BRIGHT[2]] = 1500
        number = N_SLICES - index_from_top if reversed_numbers else index_from_top + 1
        position = (X0, Y0, Z_TOP - SLICE_STEP * index_from_top)
        write_ct(
            folder / f"{number}.dcm", hu_to_words(hu), position=position, spacing=(ROW_SPACING, COLUMN_SPACING)
        )


def _nifti_columns_first(path: Path) -> None:
    """Write the label in a dcm2niix-like layout: i = column, j = row from the bottom, k = slice from the feet.

    World (RAS) of voxel (i, j, k): x = -(X0 + 0.6 i), y = -(Y0 + 0.8 (5 - j)), z = Z_TOP - 2.5 (4 - k).
    """
    volume = np.zeros((COLUMNS, ROWS, N_SLICES), dtype=np.uint8)
    volume[BRIGHT[2], ROWS - 1 - BRIGHT[1], N_SLICES - 1 - BRIGHT[0]] = LABEL
    affine = np.array(
        [
            [-COLUMN_SPACING, 0.0, 0.0, -X0],
            [0.0, ROW_SPACING, 0.0, -Y0 - ROW_SPACING * (ROWS - 1)],
            [0.0, 0.0, SLICE_STEP, Z_TOP - SLICE_STEP * (N_SLICES - 1)],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(volume, affine), path)


def _nifti_slices_first(path: Path) -> None:
    """Write the label in an array-like layout: i = slice from the top, j = row, k = column.

    World (RAS) of voxel (i, j, k): x = -(X0 + 0.6 k), y = -(Y0 + 0.8 j), z = Z_TOP - 2.5 i.
    """
    volume = np.zeros((N_SLICES, ROWS, COLUMNS), dtype=np.uint8)
    volume[BRIGHT] = LABEL
    affine = np.array(
        [
            [0.0, 0.0, -COLUMN_SPACING, -X0],
            [0.0, -ROW_SPACING, 0.0, -Y0],
            [-SLICE_STEP, 0.0, 0.0, Z_TOP],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(volume, affine), path)


@pytest.mark.parametrize("reversed_numbers", [False, True])
@pytest.mark.parametrize("write_nifti", [_nifti_columns_first, _nifti_slices_first])
def test_label_lands_on_bright_pixel(tmp_path, reversed_numbers, write_nifti):
    study = tmp_path / "study"
    _write_small_study(study, reversed_numbers)
    nii_path = tmp_path / "seg.nii.gz"
    write_nifti(nii_path)
    series = load_series(study)
    assert series.reversed is reversed_numbers

    labels = load_segmentation_aligned(nii_path, series)
    assert labels.shape == (N_SLICES, ROWS, COLUMNS)
    bright = np.unravel_index(int(np.argmax(series.pixels)), series.pixels.shape)
    labelled = np.argwhere(labels == LABEL)
    assert labelled.tolist() == [list(bright)]
    assert tuple(int(i) for i in bright) == BRIGHT
    assert int(labels.sum()) == LABEL


def test_segmentation_not_covering_series_raises(tmp_path):
    study = tmp_path / "study"
    _write_small_study(study, reversed_numbers=False)
    nii_path = tmp_path / "short.nii.gz"
    # The slices-first layout with only the top 3 of the 5 slices.
    affine = np.array(
        [
            [0.0, 0.0, -COLUMN_SPACING, -X0],
            [0.0, -ROW_SPACING, 0.0, -Y0],
            [-SLICE_STEP, 0.0, 0.0, Z_TOP],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    nib.save(nib.Nifti1Image(np.zeros((3, ROWS, COLUMNS), dtype=np.uint8), affine), nii_path)
    with pytest.raises(SegmentationAlignmentError) as caught:
        load_segmentation_aligned(nii_path, load_series(study))
    message = str(caught.value)
    assert "short.nii.gz" in message
    assert "(3, 6, 4)" in message
    assert "(5, 6, 4)" in message


def test_fractional_labels_rejected(tmp_path):
    study = tmp_path / "study"
    _write_small_study(study, reversed_numbers=False)
    nii_path = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.full((COLUMNS, ROWS, N_SLICES), 0.5, dtype=np.float32), np.eye(4)), nii_path)
    with pytest.raises(SegmentationAlignmentError, match="float.nii.gz: labels must be whole numbers"):
        load_segmentation_aligned(nii_path, load_series(study))


# --- visibility ---------------------------------------------------------------------------------


def test_visibility_counts_only_c1_to_c7():
    labels = np.zeros((3, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 1  # C1
    labels[0, 1, 1] = 7  # C7
    labels[1, :2, :2] = 8  # T1 must not count as anything
    labels[1, 3, 3] = 19  # T12
    labels[2, :, :] = 4  # C4 fills the slice
    visibility = vertebra_visibility(labels)
    assert visibility.dtype == np.uint8
    assert visibility.tolist() == [
        [1, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
    ]


def test_visibility_min_voxels():
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, 0, :3] = 2  # 3 voxels of C2
    labels[1, :, :] = 2  # 16 voxels of C2
    assert vertebra_visibility(labels, min_voxels=4)[:, 1].tolist() == [0, 1]
    assert vertebra_visibility(labels, min_voxels=3)[:, 1].tolist() == [1, 1]
