"""Decode one study into the cache format: HU windowed to uint8 and resized to S x S.

Each slice is windowed and resized while load_series reads it, so a study never sits in
memory as float32. Inference uses load_study directly; the prepare stage writes its output
to the slice cache.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from csfd.area_resize import is_three_quarters, shrink_three_quarters
from csfd.config import PrepareConfig
from csfd.constants import VERTEBRAE
from csfd.dicom_io import DicomReadError, Window
from csfd.series import Series, load_series


def resize_keep_aspect(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image so its longer side is `size`, centred on a (size, size) canvas of zeros.

    Shrinking uses cv2.INTER_AREA, or its exact equal csfd.area_resize for a uint8 image shrunk
    by 3/4 (512 to 384 px), and enlarging cv2.INTER_LINEAR. Window the image first: the zero
    padding is air only in windowed uint8 pixels.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got an array of shape {image.shape}")
    if size < 1:
        raise ValueError(f"image size must be at least 1, got {size}")
    rows, cols = image.shape
    if rows == size and cols == size:
        return np.ascontiguousarray(image)

    scale = size / max(rows, cols)
    new_rows = min(size, max(1, round(rows * scale)))
    new_cols = min(size, max(1, round(cols * scale)))
    if image.dtype == np.uint8 and is_three_quarters((rows, cols), (new_rows, new_cols)):
        resized = shrink_three_quarters(image)
    else:
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_cols, new_rows), interpolation=interpolation)

    canvas = np.zeros((size, size), dtype=image.dtype)
    top = (size - new_rows) // 2
    left = (size - new_cols) // 2
    canvas[top : top + new_rows, left : left + new_cols] = resized
    return canvas


def prepare_window(prepare: PrepareConfig) -> Window:
    """Return the configured window, which read_slice applies as it decodes."""
    return Window(center=prepare.window_center, width=prepare.window_width)


def slice_transform(prepare: PrepareConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Return the per-slice transform for load_series after windowing: resize to S x S."""

    def transform(image: np.ndarray) -> np.ndarray:
        return resize_keep_aspect(image, prepare.image_size)

    return transform


@dataclass
class PreparedStudy:
    """One study decoded into the cache format, with what the report needs about it."""

    study_uid: str
    volume: np.ndarray  # uint8 (n_slices, S, S), index 0 the most superior slice
    slice_numbers: np.ndarray
    z: np.ndarray  # mm along the slice normal, falling with the position index
    reversed: bool
    irregular: bool
    readers: list[str]
    transfer_syntaxes: list[str]
    warnings: list[str]
    original_shape: tuple[int, int]  # rows, cols of the DICOM slices
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    vertebra_visibility: np.ndarray | None = None  # uint8 (n_slices, 7), C1..C7
    segmentation_error: str = ""

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])


def load_study(
    study_dir: str | Path,
    prepare_config: PrepareConfig,
    segmentation_path: str | Path | None = None,
    readers: tuple[str, ...] = ("dicomsdl", "pydicom"),
) -> PreparedStudy:
    """Decode one study folder into a PreparedStudy; raises DicomReadError when it cannot be read.

    With `segmentation_path`, the segmentation is aligned on the original DICOM pixel grid
    (the series keeps its geometry and original shape after resizing) and reduced to vertebra
    visibility per slice. A segmentation that cannot be read or aligned leaves
    `vertebra_visibility` None and sets `segmentation_error`, so the volume stays usable.
    """
    study_dir = Path(study_dir)
    series = load_series(
        study_dir, transform=slice_transform(prepare_config), readers=readers, window=prepare_window(prepare_config)
    )
    warnings = list(series.warnings)
    # load_series rejects a study whose slices differ in size, so one shape describes them all.
    if series.image_shape is None:
        raise DicomReadError(f"{study_dir}: the series reports no slice shape, so its original size is unknown")

    visibility = None
    segmentation_error = ""
    if segmentation_path is not None:
        visibility, segmentation_error = _visibility_from_segmentation(Path(segmentation_path), series)
        if segmentation_error:
            warnings.append(segmentation_error)

    return PreparedStudy(
        study_uid=study_dir.name,
        volume=np.ascontiguousarray(series.pixels, dtype=np.uint8),
        slice_numbers=np.asarray(series.slice_numbers, dtype=np.int64),
        z=np.asarray(series.z, dtype=np.float64),
        reversed=bool(series.reversed),
        irregular=bool(series.irregular),
        readers=sorted(set(series.readers)),
        transfer_syntaxes=sorted(set(series.transfer_syntaxes)),
        warnings=warnings,
        original_shape=(int(series.image_shape[0]), int(series.image_shape[1])),
        pixel_spacing=(float(series.pixel_spacing[0]), float(series.pixel_spacing[1])),
        slice_spacing=float(series.slice_spacing),
        vertebra_visibility=visibility,
        segmentation_error=segmentation_error,
    )


def _visibility_from_segmentation(path: Path, series: Series) -> tuple[np.ndarray | None, str]:
    """Return (n_slices, 7) C1..C7 visibility and "" on success, or None and the error message."""
    # Imported here: nibabel takes about 0.07 s to import, and most studies have no segmentation.
    from nibabel.filebasedimages import ImageFileError

    from csfd.segmentation import load_segmentation_aligned, vertebra_visibility

    try:
        labels = load_segmentation_aligned(path, series)
        visibility = np.asarray(vertebra_visibility(labels), dtype=np.uint8)
    except (ValueError, OSError, EOFError, zlib.error, ImageFileError) as error:
        return None, f"segmentation {path.name} failed: {type(error).__name__}: {error}"
    expected_shape = (len(series.z), len(VERTEBRAE))
    if visibility.shape != expected_shape:
        message = f"visibility has shape {visibility.shape}, expected {expected_shape}"
        return None, f"segmentation {path.name} failed: {message}"
    return visibility, ""
