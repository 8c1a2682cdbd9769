"""Read one CT slice into Hounsfield units, or into the windowed uint8 of the cache.

dicomsdl reads first and pydicom is the fallback. Both go through the same steps
(csfd.hounsfield): stored values, padding to air, rescale with each file's own tags, and a
plausibility check, so that a corrupt codestream raises instead of returning noise. The
stored-value step makes the readers agree: pydicom 3.0 sign-extends native data itself, and
dicomsdl 0.109 returns the raw word. MONOCHROME1 only changes how an image is displayed, so HU
are never inverted for it.

With a window, 16-bit slices go through per-header lookup tables (csfd.hounsfield.window_tables).
The tables give the same uint8 as the steps in turn, and the plausibility check reads their HU.

JPEG 2000 sign conflicts: PixelRepresentation decides the sign, as pydicom 3.0 does by
default (its apply_j2k_sign_correction option). The codestream's sign (from its SIZ marker) is
used, with a warning, only when the PixelRepresentation reading fails the plausibility check
and the codestream states the other sign. Real files need both rules. pydicom's test file
J2K_pixelrep_mismatch.dcm is PixelRepresentation 1 with an unsigned 13-bit codestream, and
PixelRepresentation is right. pylibjpeg-data's TOSHIBA_J2K_SIZ1_PixRep0.dcm is
PixelRepresentation 0 with a signed 16-bit codestream, and the codestream is right: read as
unsigned, its air would be about +64536 HU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csfd.dicom_readers import (
    JPEG2000_SYNTAXES,
    READERS,
    DicomReadError,
    HeaderRejected,
    RawFrame,
    check_decoders,
    find_missing_decoders,
    read_j2k_signedness,
    read_transfer_syntax,
    syntax_name,
)
from csfd.hounsfield import (
    as_16bit_words,
    check_ct_plausibility,
    check_rescale,
    check_word_plausibility,
    stored_to_hu,
    to_stored_values,
    window_tables,
    window_to_uint8,
)

__all__ = [
    "DicomReadError",
    "DicomSlice",
    "Window",
    "check_ct_plausibility",
    "check_decoders",
    "find_missing_decoders",
    "read_slice",
    "read_stored_values",
    "to_stored_values",
]

logger = logging.getLogger(__name__)


class _DecodeRejected(Exception):
    """One reader's decode is unusable, but the next reader may still succeed."""


@dataclass(frozen=True)
class Window:
    """A display window in HU: center - width/2 maps to 0 and center + width/2 to 255."""

    center: float
    width: float


@dataclass
class DicomSlice:
    """One decoded CT slice with the geometry needed to order a series.

    `pixels` contains float32 Hounsfield units, or the windowed uint8 when read with a window.
    """

    path: Path
    pixels: np.ndarray  # (rows, cols): float32 HU, or uint8 when `window` is set
    window: Window | None
    position: np.ndarray | None  # ImagePositionPatient (3,), mm, LPS
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), mm
    slice_thickness: float | None
    instance_number: int | None
    transfer_syntax: str  # UID
    reader: str  # "dicomsdl", "dicomsdl+libjpeg-turbo" (JPEG Lossless pixels) or "pydicom"
    warnings: list[str] = field(default_factory=list)  # about this file, which `path` names

    @property
    def hu(self) -> np.ndarray:
        """The float32 Hounsfield units; an error for a slice read through a window."""
        if self.window is not None:
            raise ValueError(f"{self.path} was read through a window, so its pixels are uint8, not HU")
        return self.pixels


def _hu_from_codestream_sign(frame: RawFrame, path: Path, reason: str) -> tuple[np.ndarray, str] | None:
    """Retry a JPEG 2000 slice with the codestream's own sign when it differs from the header's."""
    if frame.transfer_syntax not in JPEG2000_SYNTAXES:
        return None
    signedness = read_j2k_signedness(path)
    if signedness is None:
        return None
    codestream_signed, precision = signedness
    if int(codestream_signed) == frame.pixel_representation:
        return None
    stored = to_stored_values(frame.pixels, precision, int(codestream_signed))
    hu = stored_to_hu(stored, frame.encoding, path)
    if check_ct_plausibility(hu) is not None:
        return None
    warning = (
        f"PixelRepresentation {frame.pixel_representation} disagrees with the "
        f"{'signed' if codestream_signed else 'unsigned'} {precision}-bit JPEG 2000 codestream; "
        f"read with PixelRepresentation the slice is implausible ({reason}), so the codestream's "
        "sign was used"
    )
    return hu, warning


def _hu_from_frame(frame: RawFrame, path: Path) -> tuple[np.ndarray, list[str]]:
    """Convert one backend's frame to HU.

    Raises _DecodeRejected when this decode is implausible and DicomReadError when the header
    makes HU impossible for any reader.
    """
    slice_warnings = list(frame.warnings)
    raw = np.asarray(frame.pixels)
    if raw.shape != (frame.rows, frame.columns):
        raise _DecodeRejected(f"decoded shape {raw.shape} differs from Rows x Columns {(frame.rows, frame.columns)}")
    stored = to_stored_values(raw, frame.bits_stored, frame.pixel_representation)
    hu = stored_to_hu(stored, frame.encoding, path)
    reason = check_ct_plausibility(hu)
    if reason is None:
        return hu, slice_warnings
    retried = _hu_from_codestream_sign(frame, path, reason)
    if retried is None:
        raise _DecodeRejected(f"decoded slice is not plausible CT: {reason}")
    hu, warning = retried
    slice_warnings.append(warning)
    return hu, slice_warnings


def _window_from_frame(frame: RawFrame, path: Path, window: Window) -> tuple[np.ndarray, list[str]]:
    """Convert one backend's frame to windowed uint8, through the lookup tables where they apply."""
    raw = np.asarray(frame.pixels)
    words = as_16bit_words(raw, frame.bits_stored)
    if words is not None and raw.shape == (frame.rows, frame.columns):
        encoding = frame.encoding
        check_rescale(encoding, path)
        tables = window_tables(encoding, float(window.center), float(window.width))
        if check_word_plausibility(tables, words) is None:
            return np.take(tables.uint8, words), list(frame.warnings)
    # Other word sizes, and implausible slices (for their retry and their error message).
    hu, slice_warnings = _hu_from_frame(frame, path)
    return window_to_uint8(hu, window.center, window.width), slice_warnings


def _transfer_syntax_label(uid: str) -> str:
    return f"{syntax_name(uid)} ({uid})" if uid else "unknown transfer syntax"


def _unknown_reader(reader: str) -> ValueError:
    return ValueError(f"unknown DICOM reader {reader!r}; choose from {sorted(READERS)}")


def read_slice(
    path: str | Path,
    readers: tuple[str, ...] = ("dicomsdl", "pydicom"),
    window: Window | None = None,
) -> DicomSlice:
    """Read one single-frame CT file into HU, or into uint8 through `window`, trying `readers` in order.

    Raises DicomReadError naming the file, its transfer syntax and every reader's error when
    no reader gives a plausible slice, and at once when the header rules the file out
    (multi-frame, colour, missing rescale tags).
    """
    path = Path(path)
    for reader in readers:
        if reader not in READERS:
            raise _unknown_reader(reader)
    errors: list[str] = []
    transfer_syntax = ""
    for reader in readers:
        try:
            frame = READERS[reader](path)
        except HeaderRejected as error:
            raise DicomReadError(str(error)) from error
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 -- pylibjpeg-rle's PanicException is a BaseException
            errors.append(f"{reader}: {type(error).__name__}: {error}")
            continue
        transfer_syntax = frame.transfer_syntax
        try:
            if window is None:
                pixels, slice_warnings = _hu_from_frame(frame, path)
            else:
                pixels, slice_warnings = _window_from_frame(frame, path, window)
        except _DecodeRejected as error:
            errors.append(f"{reader}: {error}")
            continue
        if errors:
            message = f"read with {reader} after {'; '.join(errors)}"
            logger.warning("%s: %s", path, message)
            slice_warnings.insert(0, message)
        return DicomSlice(
            path=path,
            pixels=pixels,
            window=window,
            position=frame.position,
            orientation=frame.orientation,
            pixel_spacing=frame.pixel_spacing,
            slice_thickness=frame.slice_thickness,
            instance_number=frame.instance_number,
            transfer_syntax=frame.transfer_syntax,
            reader=f"{reader}+{frame.decoder}" if frame.decoder else reader,
            warnings=slice_warnings,
        )
    transfer_syntax = transfer_syntax or read_transfer_syntax(path)
    raise DicomReadError(
        f"{path}: no reader could decode it ({_transfer_syntax_label(transfer_syntax)}): " + "; ".join(errors)
    )


def read_stored_values(path: str | Path, reader: str) -> np.ndarray:
    """Return the int32 stored values of `path` decoded by `reader`, after sign handling.

    The values follow the header (BitsStored, PixelRepresentation) only: no padding, rescale,
    plausibility check or JPEG 2000 codestream-sign retry. Meant for reader parity tests.
    """
    if reader not in READERS:
        raise _unknown_reader(reader)
    path = Path(path)
    try:
        frame = READERS[reader](path)
    except HeaderRejected as error:
        raise DicomReadError(str(error)) from error
    except Exception as error:  # noqa: BLE001 -- decoders raise many types; re-raised with the file named
        label = _transfer_syntax_label(read_transfer_syntax(path))
        raise DicomReadError(f"{path}: {reader} cannot decode it ({label}): {type(error).__name__}: {error}") from error
    return to_stored_values(frame.pixels, frame.bits_stored, frame.pixel_representation)
