"""Align a segmentation NIfTI with a DICOM series, and derive per-slice vertebra visibility.

The reorientation comes from geometry, not from a fixed flip: the centre of each DICOM pixel
(slice s, row r, column c) is at LPS
    ImagePositionPatient[s] + c * column_spacing * row_cosines + r * row_spacing * column_cosines,
NIfTI world coordinates are RAS (LPS with x and y negated), and inv(affine) takes them to voxel
indices, rounded to the nearest voxel. When the grids coincide every index is an integer
and the lookup is exact; otherwise it is a nearest-neighbour resampling, logged as a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from csfd.constants import SEGMENTATION_CERVICAL_LABELS
from csfd.series import Series

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Voxel indices further than this from an integer mean the two grids do not coincide.
GRID_MATCH_TOLERANCE = 0.1
# A pixel centre may fall this far outside the first or last voxel centre (half a voxel is
# the voxel's own edge) before the segmentation counts as not covering the series.
COVERAGE_TOLERANCE = 0.5 + 1e-3


class SegmentationAlignmentError(ValueError):
    """A segmentation that cannot be put on the series' pixel grid. The message names the file and shapes."""


def _load_label_volume(nii_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(nii_path)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SegmentationAlignmentError(f"{nii_path}: expected a 3-D label volume, found shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise SegmentationAlignmentError(f"{nii_path}: labels must be whole numbers, found dtype {data.dtype}")
        data = rounded
    if data.min() < 0 or data.max() > 255:
        raise SegmentationAlignmentError(
            f"{nii_path}: labels must lie in 0..255, found {data.min()}..{data.max()}"
        )
    affine = image.affine
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SegmentationAlignmentError(f"{nii_path}: the affine is singular:\n{affine}")
    return data.astype(np.uint8), affine


def _slice_grid_steps(series: Series, world_to_voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-index change per DICOM row and per DICOM column."""
    row_cosines = series.orientation[:3] / np.linalg.norm(series.orientation[:3])
    column_cosines = series.orientation[3:] / np.linalg.norm(series.orientation[3:])
    row_spacing, column_spacing = series.pixel_spacing
    linear = world_to_voxel[:3, :3] @ LPS_TO_RAS
    per_row = linear @ (row_spacing * column_cosines)
    per_column = linear @ (column_spacing * row_cosines)
    return per_row, per_column


def load_segmentation_aligned(nii_path: str | Path, series: Series) -> np.ndarray:
    """Return uint8 labels (n_slices, rows, cols) in the series' canonical order and pixel grid.

    Raises SegmentationAlignmentError naming the file and both shapes when the series lacks
    geometry or when its pixel centres fall outside the segmentation volume.
    """
    nii_path = Path(nii_path)
    rows, columns = series.image_shape or series.pixels.shape[1:3]
    n_slices = len(series.z)
    geometry_known = np.all(np.isfinite(series.positions)) and np.all(np.isfinite(series.orientation))
    if not geometry_known or not np.all(np.isfinite(series.pixel_spacing)):
        raise SegmentationAlignmentError(
            f"{nii_path}: series {series.study_uid} has no complete position, orientation and pixel "
            "spacing, so the segmentation cannot be aligned"
        )
    data, affine = _load_label_volume(nii_path)
    world_to_voxel = np.linalg.inv(affine)
    per_row, per_column = _slice_grid_steps(series, world_to_voxel)
    origins = (world_to_voxel[:3, :3] @ LPS_TO_RAS @ series.positions.T).T + world_to_voxel[:3, 3]

    row_index = np.arange(rows, dtype=np.float64)[:, None]
    column_index = np.arange(columns, dtype=np.float64)[None, :]
    volume_shape = np.asarray(data.shape)
    labels = np.empty((n_slices, rows, columns), dtype=np.uint8)
    worst_off_grid = 0.0
    for s in range(n_slices):
        indices = []
        for axis in range(3):
            voxel = origins[s, axis] + row_index * per_row[axis] + column_index * per_column[axis]
            lowest, highest = float(voxel.min()), float(voxel.max())
            if lowest < -COVERAGE_TOLERANCE or highest > volume_shape[axis] - 1 + COVERAGE_TOLERANCE:
                raise SegmentationAlignmentError(
                    f"{nii_path}: segmentation of shape {tuple(data.shape)} does not cover series "
                    f"{series.study_uid} of shape {(n_slices, rows, columns)}: slice {s} needs voxel "
                    f"indices {lowest:.1f}..{highest:.1f} along axis {axis}"
                )
            rounded = np.rint(voxel)
            worst_off_grid = max(worst_off_grid, float(np.abs(voxel - rounded).max()))
            indices.append(np.clip(rounded, 0, volume_shape[axis] - 1).astype(np.intp))
        labels[s] = data[indices[0], indices[1], indices[2]]
    if worst_off_grid > GRID_MATCH_TOLERANCE:
        logger.warning(
            "%s: segmentation grid does not coincide with series %s (pixel centres up to %.2f voxel "
            "off the grid); labels were resampled by nearest neighbour",
            nii_path,
            series.study_uid,
            worst_off_grid,
        )
    return labels


def vertebra_visibility(labels: np.ndarray, min_voxels: int = 1) -> np.ndarray:
    """Return (n_slices, 7) uint8: 1 where C1..C7 cover at least `min_voxels` pixels of the slice.

    Only labels 1..7 count. Thoracic and any other labels (8 and above) never become C1..C7.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (n_slices, rows, cols), found shape {labels.shape}")
    if min_voxels < 1:
        raise ValueError(f"min_voxels must be at least 1, found {min_voxels}")
    cervical = np.asarray(SEGMENTATION_CERVICAL_LABELS)
    visibility = np.zeros((labels.shape[0], len(cervical)), dtype=np.uint8)
    for s in range(labels.shape[0]):
        counts = np.bincount(labels[s].ravel(), minlength=256)
        visibility[s] = counts[cervical] >= min_voxels
    return visibility
