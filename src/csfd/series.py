"""Assemble a study folder of single-slice DICOM files into one volume in canonical order.

Canonical order: position_index 0 is the most superior slice, going toward the feet. Slices are
ordered only by their position along the slice normal (ImagePositionPatient projected on
cross(row cosines, column cosines), with the normal turned to point to the head), never by file
name or InstanceNumber. Slices at the same position keep the order of their slice numbers.

Problems that make the folder not a clean volume are reported in Series.warnings and set
Series.irregular: duplicate positions, missing slices or uneven spacing, gantry tilt, mixed
orientations or pixel spacings, a non-axial normal, and slice numbers out of step with the
positions. The pixels are kept as they are, neither resampled nor dropped.

A study whose slices lack ImagePositionPatient raises DicomReadError when it has more than one
slice, because no order derived from file names or InstanceNumber can be trusted to match the
anatomy. A single slice without position is accepted at z = 0 with a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from csfd.dicom_io import DicomReadError, Window, read_slice
from csfd.series_geometry import SliceGeometry, check_geometry, order_by_position

logger = logging.getLogger(__name__)

# File suffixes that are never DICOM slices, skipped when a folder has no *.dcm files.
NON_DICOM_SUFFIXES = frozenset({".txt", ".md", ".json", ".csv", ".gz", ".nii", ".png", ".jpg", ".npy"})


@dataclass
class Series:
    """One study's slices in canonical order (most superior first) with their geometry."""

    study_uid: str  # the study folder's name
    pixels: np.ndarray  # (n, ...) per-slice arrays after `transform`, canonical order
    slice_numbers: np.ndarray  # int64, canonical order, from file names <slice_number>.dcm
    z: np.ndarray  # float64 mm along the slice normal (pointing to the head), descending
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm, NaN when the tag is missing
    orientation: np.ndarray  # (6,) ImageOrientationPatient, NaN when the tag is missing
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm, NaN when missing
    slice_spacing: float  # median |dz| in mm, NaN for a single slice
    reversed: bool  # True when slice_number rises with z (the uncommon case)
    readers: list[str]
    transfer_syntaxes: list[str]
    warnings: list[str]
    irregular: bool
    # (rows, cols) of the DICOM slices, which `pixels` may no longer show after a resizing transform.
    image_shape: tuple[int, int] | None = None


def list_slice_files(study_dir: Path) -> list[Path]:
    """Return the study's DICOM files: its *.dcm files, or every other plain file if it has none."""
    if not study_dir.is_dir():
        raise DicomReadError(f"study folder {study_dir} does not exist or is not a folder")
    files = [p for p in study_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    dcm_files = [p for p in files if p.suffix.lower() == ".dcm"]
    if not dcm_files:
        dcm_files = [p for p in files if p.suffix.lower() not in NON_DICOM_SUFFIXES]
    if not dcm_files:
        raise DicomReadError(f"study folder {study_dir} contains no DICOM files")
    return sorted(dcm_files)


def _slice_number_from_name(path: Path) -> int | None:
    """Return int(stem) for competition names like "10.dcm", else None."""
    stem = path.name[: -len(path.suffix)] if path.suffix.lower() == ".dcm" else path.name
    return int(stem) if stem.isdecimal() else None


def _summarise_slice_warnings(paths: list[Path], slice_warnings: list[list[str]]) -> list[str]:
    """Collapse per-slice warnings into one line per distinct message, with a count and an example file."""
    counts: Counter[str] = Counter()
    example: dict[str, Path] = {}
    for path, messages in zip(paths, slice_warnings):
        for message in dict.fromkeys(messages):
            counts[message] += 1
            example.setdefault(message, path)
    return [f"{count} of {len(paths)} slices (e.g. {example[message].name}): {message}" for message, count in counts.items()]


def load_series(
    study_dir: str | Path,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    readers: tuple[str, ...] = ("dicomsdl", "pydicom"),
    window: Window | None = None,
) -> Series:
    """Read every slice of `study_dir` and return them in canonical order.

    Each slice is read as float32 HU, or as uint8 through `window`, and `transform` is applied
    to it as soon as it is decoded, so only the transformed slices are kept. Raises DicomReadError when a slice
    cannot be read, when slices differ in size, or when positions are missing (see module doc).
    """
    study_dir = Path(study_dir)
    paths = list_slice_files(study_dir)
    arrays: list[np.ndarray] = []
    geometries: list[SliceGeometry] = []
    readers_used: list[str] = []
    syntaxes: list[str] = []
    slice_warnings: list[list[str]] = []
    image_shape: tuple[int, int] | None = None
    first_path = paths[0]
    for path in paths:
        dicom_slice = read_slice(path, readers, window)
        pixels = dicom_slice.pixels
        if image_shape is None:
            image_shape = pixels.shape
        elif pixels.shape != image_shape:
            raise DicomReadError(
                f"study {study_dir.name}: slices differ in size: {first_path.name} is {image_shape}, "
                f"{path.name} is {pixels.shape}; a volume needs one size"
            )
        arrays.append(pixels if transform is None else transform(pixels))
        geometries.append(
            SliceGeometry(
                path=path,
                position=dicom_slice.position,
                orientation=dicom_slice.orientation,
                pixel_spacing=dicom_slice.pixel_spacing,
                instance_number=dicom_slice.instance_number,
            )
        )
        readers_used.append(dicom_slice.reader)
        syntaxes.append(dicom_slice.transfer_syntax)
        slice_warnings.append(dicom_slice.warnings)
        del dicom_slice

    notes: list[str] = []
    slice_numbers = _slice_numbers(study_dir, geometries, notes)
    ordering = order_by_position(study_dir.name, geometries, slice_numbers)
    check_geometry(ordering)
    order = ordering.order

    pixels = np.stack([arrays[i] for i in order])
    del arrays
    series_warnings = notes + ordering.notes + ordering.problems
    for message in series_warnings:
        logger.warning("study %s: %s", study_dir.name, message)
    series_warnings += _summarise_slice_warnings(paths, slice_warnings)
    return Series(
        study_uid=study_dir.name,
        pixels=pixels,
        slice_numbers=ordering.slice_numbers,
        z=ordering.z,
        positions=ordering.positions,
        orientation=ordering.orientation,
        pixel_spacing=ordering.pixel_spacing,
        slice_spacing=ordering.slice_spacing,
        reversed=ordering.reversed,
        readers=[readers_used[i] for i in order],
        transfer_syntaxes=[syntaxes[i] for i in order],
        warnings=series_warnings,
        irregular=bool(ordering.problems),
        image_shape=image_shape,
    )


def _slice_numbers(study_dir: Path, geometries: list[SliceGeometry], notes: list[str]) -> np.ndarray:
    """Slice numbers from file names "<slice_number>.dcm", or from InstanceNumber when names are not numbers."""
    from_names = [_slice_number_from_name(g.path) for g in geometries]
    if all(number is not None for number in from_names):
        numbers = from_names
    else:
        unnamed = [g.path.name for g, number in zip(geometries, from_names) if number is None]
        missing_instance = [g.path.name for g in geometries if g.instance_number is None]
        if missing_instance:
            raise DicomReadError(
                f"study {study_dir.name}: file {unnamed[0]} is not named <slice_number>.dcm and "
                f"{missing_instance[0]} has no InstanceNumber, so slices cannot be numbered"
            )
        notes.append(
            f"{len(unnamed)} of {len(geometries)} file names are not <slice_number>.dcm (e.g. {unnamed[0]}); "
            "slice numbers taken from InstanceNumber"
        )
        numbers = [g.instance_number for g in geometries]
    repeated = [number for number, count in Counter(numbers).items() if count > 1]
    if repeated:
        raise DicomReadError(
            f"study {study_dir.name}: slice number {repeated[0]} occurs in more than one file; remove or renumber the duplicate"
        )
    return np.asarray(numbers, dtype=np.int64)
