"""Slice ordering and volume checks from DICOM geometry (LPS patient coordinates, mm)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csfd.dicom_io import DicomReadError

# Two slices closer than this along the normal are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
# A step may differ from the median step by this fraction (plus 0.01 mm for rounding in the
# header values) before the spacing counts as uneven.
SPACING_RELATIVE_TOLERANCE = 0.05
SPACING_ABSOLUTE_TOLERANCE_MM = 0.01
# A step within this fraction of k times the median step (k >= 2) means k - 1 slices are missing.
MISSING_SLICE_TOLERANCE = 0.1
# Angle between the line through the slice positions and the slice normal above which the
# volume is sheared (gantry tilt or an oblique stack).
TILT_TOLERANCE_DEG = 0.5
# Cosines and spacings that differ by more than this between slices make the stack inconsistent.
ORIENTATION_TOLERANCE = 1e-3
SPACING_MATCH_TOLERANCE_MM = 1e-3
# The slice normal must be within 45 degrees of the patient's head-foot axis to call the series axial.
MIN_AXIAL_COSINE = np.cos(np.deg2rad(45.0))


@dataclass
class SliceGeometry:
    """The header geometry of one slice file."""

    path: Path
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None


@dataclass
class Ordering:
    """Slices sorted into canonical order, with the values the volume checks need."""

    order: np.ndarray  # indices into the file list, canonical order
    slice_numbers: np.ndarray
    z: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    normal: np.ndarray | None  # unit slice normal pointing to the head, None without geometry
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    reversed: bool
    geometries: list[SliceGeometry]  # canonical order
    problems: list[str]  # ways the stack is not a clean volume, any of which makes the series irregular
    notes: list[str]  # warnings that leave the volume usable as it is


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Return the unit normal cross(row cosines, column cosines), turned to point to the head (+z in LPS)."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    column = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] < 0 else normal


def order_by_position(study: str, geometries: list[SliceGeometry], slice_numbers: np.ndarray) -> Ordering:
    """Sort slices by position along the normal, most superior first. Ties keep slice-number order."""
    n = len(geometries)
    has_position = [g.position is not None for g in geometries]
    problems: list[str] = []
    spacing = _pixel_spacing(geometries, problems)
    if not any(has_position) and n == 1:
        orientation = geometries[0].orientation
        return Ordering(
            order=np.zeros(1, dtype=np.int64),
            slice_numbers=slice_numbers,
            z=np.zeros(1),
            positions=np.full((1, 3), np.nan),
            orientation=np.full(6, np.nan) if orientation is None else orientation,
            normal=None,
            pixel_spacing=spacing,
            slice_spacing=float("nan"),
            reversed=False,
            geometries=list(geometries),
            problems=problems,
            notes=["ImagePositionPatient is missing; the single slice is placed at z = 0"],
        )
    if not all(has_position):
        missing = [g.path.name for g in geometries if g.position is None]
        raise DicomReadError(
            f"study {study}: {len(missing)} of {n} slices (e.g. {missing[0]}) have no ImagePositionPatient, "
            "so the slices cannot be ordered by position"
        )
    missing_orientation = [g.path.name for g in geometries if g.orientation is None]
    if missing_orientation:
        raise DicomReadError(
            f"study {study}: {len(missing_orientation)} of {n} slices (e.g. {missing_orientation[0]}) have no "
            "ImageOrientationPatient, so the slice normal is unknown"
        )

    orientation = geometries[0].orientation
    normal = slice_normal(orientation)
    positions = np.stack([g.position for g in geometries])
    z = positions @ normal
    order = np.lexsort((slice_numbers, -z))
    z_sorted = z[order]
    numbers_sorted = slice_numbers[order]
    steps = -np.diff(z_sorted)
    return Ordering(
        order=order,
        slice_numbers=numbers_sorted,
        z=z_sorted,
        positions=positions[order],
        orientation=orientation,
        normal=normal,
        pixel_spacing=spacing,
        slice_spacing=float(np.median(steps)) if n > 1 else float("nan"),
        reversed=bool(n > 1 and numbers_sorted[0] > numbers_sorted[-1]),
        geometries=[geometries[i] for i in order],
        problems=problems,
        notes=[],
    )


def _pixel_spacing(geometries: list[SliceGeometry], problems: list[str]) -> tuple[float, float]:
    spacings = [g.pixel_spacing for g in geometries if g.pixel_spacing is not None]
    if len(spacings) < len(geometries):
        problems.append("PixelSpacing is missing on some slices; pixel_spacing is NaN")
        return (float("nan"), float("nan"))
    spread = np.ptp(np.asarray(spacings), axis=0)
    if np.any(spread > SPACING_MATCH_TOLERANCE_MM):
        problems.append(f"PixelSpacing differs between slices (range {spread.tolist()} mm); the first is used")
    return spacings[0]


def check_geometry(ordering: Ordering) -> None:
    """Append to ordering.problems each way the stack is not a clean volume."""
    if ordering.normal is None or len(ordering.order) < 2:
        return
    _check_orientation(ordering, ordering.problems)
    _check_steps(ordering, ordering.problems)
    _check_tilt(ordering, ordering.problems)
    _check_slice_numbers(ordering, ordering.problems)


def _check_orientation(ordering: Ordering, problems: list[str]) -> None:
    orientations = np.stack([g.orientation for g in ordering.geometries])
    deviation = float(np.abs(orientations - ordering.orientation).max())
    if deviation > ORIENTATION_TOLERANCE:
        problems.append(f"ImageOrientationPatient differs between slices (by up to {deviation:.4f})")
    if abs(ordering.normal[2]) < MIN_AXIAL_COSINE:
        tilt = np.degrees(np.arccos(abs(ordering.normal[2])))
        problems.append(f"not an axial series: the slice normal is {tilt:.1f} degrees from the head-foot axis")


def _check_steps(ordering: Ordering, problems: list[str]) -> None:
    steps = -np.diff(ordering.z)
    numbers = ordering.slice_numbers
    duplicates = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if duplicates.size:
        i = duplicates[0]
        problems.append(
            f"{duplicates.size} duplicate slice positions (e.g. slice numbers {numbers[i]} and {numbers[i + 1]} "
            f"both at z = {ordering.z[i]:.3f} mm)"
        )
    distinct_steps = steps[steps >= DUPLICATE_TOLERANCE_MM]
    if distinct_steps.size == 0:
        return
    median = float(np.median(distinct_steps))
    # A missing slice leaves a step of about 2, 3, ... times the median step.
    multiples = steps / median
    gaps = np.flatnonzero((np.rint(multiples) >= 2) & (np.abs(multiples - np.rint(multiples)) < MISSING_SLICE_TOLERANCE))
    if gaps.size:
        i = gaps[0]
        problems.append(
            f"missing slices: {gaps.size} step(s) are a multiple of the median step {median:.3f} mm "
            f"(e.g. {steps[i]:.3f} mm between slice numbers {numbers[i]} and {numbers[i + 1]})"
        )
    tolerance = SPACING_RELATIVE_TOLERANCE * median + SPACING_ABSOLUTE_TOLERANCE_MM
    if float(distinct_steps.max() - distinct_steps.min()) > tolerance:
        problems.append(
            f"uneven slice spacing: steps from {distinct_steps.min():.3f} to {distinct_steps.max():.3f} mm "
            f"(median {median:.3f} mm)"
        )


def _check_tilt(ordering: Ordering, problems: list[str]) -> None:
    span = ordering.positions[0] - ordering.positions[-1]
    length = float(np.linalg.norm(span))
    if length < DUPLICATE_TOLERANCE_MM:
        return
    cosine = min(1.0, abs(float(span @ ordering.normal)) / length)
    angle = float(np.degrees(np.arccos(cosine)))
    if angle > TILT_TOLERANCE_DEG:
        problems.append(
            f"gantry tilt: the slice positions advance {angle:.1f} degrees off the slice normal, "
            "so the volume is sheared"
        )


def _check_slice_numbers(ordering: Ordering, problems: list[str]) -> None:
    steps = np.diff(ordering.slice_numbers)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        problems.append("slice numbers do not rise or fall steadily along the slice positions")
