"""Read one CT slice into Hounsfield units, with dicomsdl first and pydicom as fallback.

Steps, the same for both readers:
1. Stored values: the decoded words are masked to BitsStored bits and, when
   PixelRepresentation is 1, sign-extended. Decoders disagree here (pydicom 3.0 sign-extends
   native data itself, dicomsdl 0.109 returns the raw word), so this step makes both agree.
2. Padding: stored values equal to PixelPaddingValue, or within PixelPaddingValue ..
   PixelPaddingRangeLimit when that tag is present, become air (-1000 HU).
3. HU = stored * RescaleSlope + RescaleIntercept, with each file's own tags, applied once.
   MONOCHROME1 only changes how an image is displayed, so HU are never inverted for it.
4. Plausibility: a decoded CT slice whose values wrap around (see `check_ct_plausibility`)
   counts as that reader's failure, so a corrupt codestream raises instead of returning noise.

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
from pydicom.uid import UID

from csfd.dicom_readers import (
    JPEG2000_SYNTAXES,
    READERS,
    HeaderRejected,
    RawFrame,
    check_decoders,
    find_missing_decoders,
    read_j2k_signedness,
    read_transfer_syntax,
)

__all__ = [
    "DicomReadError",
    "DicomSlice",
    "check_ct_plausibility",
    "check_decoders",
    "find_missing_decoders",
    "read_slice",
    "read_stored_values",
    "to_stored_values",
]

logger = logging.getLogger(__name__)

AIR_HU = -1000.0

# Plausibility limits for a decoded CT slice. The 12-bit CT scale spans -1024..3071 HU and
# out-of-field fill values reach down to -3024 HU, so two neighbouring pixels of a real slice
# differ by at most about 6100 HU. A jump above WRAP_JUMP_HU means the values wrapped around.
# Metal on an extended CT scale can exceed it along its edge, which is far below
# MAX_WRAP_FRACTION of the pixel pairs. Measured on the real test files: no pair above 8000 HU
# in any valid slice, 27% in the corrupt JPEG Lossless file, 15% in a 16-bit slice read with
# the wrong sign.
WRAP_JUMP_HU = 8000.0
MAX_WRAP_FRACTION = 0.01
# More than 5% of a slice above 8000 HU cannot be anatomy, even with metal implants.
HIGH_HU = 8000.0
MAX_HIGH_FRACTION = 0.05
# The checks read every second row (csfd.dicom_io.check_ct_plausibility).
PLAUSIBILITY_ROW_STEP = 2


class DicomReadError(Exception):
    """A DICOM file that cannot be turned into correct HU. The message names the file and the reason."""


class _DecodeRejected(Exception):
    """One reader's decode is unusable, but the next reader may still succeed."""


@dataclass
class DicomSlice:
    """One decoded CT slice in Hounsfield units, with the geometry needed to order a series."""

    path: Path
    hu: np.ndarray  # float32 (rows, cols), Hounsfield units
    position: np.ndarray | None  # ImagePositionPatient (3,), mm, LPS
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), mm
    slice_thickness: float | None
    instance_number: int | None
    transfer_syntax: str  # UID
    reader: str  # "dicomsdl" or "pydicom"
    warnings: list[str] = field(default_factory=list)  # about this file, which `path` names


def _sign_extend(values: np.ndarray, bits: int) -> np.ndarray:
    """Interpret the low `bits` bits of each integer as two's complement, in place."""
    sign_bit = values.dtype.type(1) << (bits - 1)
    np.bitwise_xor(values, sign_bit, out=values)
    np.subtract(values, sign_bit, out=values)
    return values


def to_stored_values(raw: np.ndarray, bits_stored: int, pixel_representation: int) -> np.ndarray:
    """Return int32 stored values: mask `raw` to `bits_stored` bits, then sign-extend if signed.

    Example: the word 0x0F38 with BitsStored 12 is 3896 unsigned and -200 signed.
    """
    raw = np.asarray(raw)
    # int32 fits every CT value (BitsStored 16 or less) and halves the memory traffic of int64;
    # wider words keep int64 so that masking and sign extension stay exact.
    work = np.int32 if bits_stored <= 16 and raw.dtype.itemsize <= 4 else np.int64
    values = raw.astype(work)
    np.bitwise_and(values, (work(1) << bits_stored) - 1, out=values)
    if pixel_representation == 1:
        values = _sign_extend(values, bits_stored)
    return values.astype(np.int32, copy=False)


def _padding_mask(stored: np.ndarray, frame: RawFrame) -> np.ndarray | None:
    if frame.pixel_padding_value is None:
        return None
    # The tag's VR (US or SS) may not match PixelRepresentation (a US 63536 meaning -2000),
    # so it goes through the same masking and sign rule as the pixels.
    bounds = [frame.pixel_padding_value]
    if frame.pixel_padding_range_limit is not None:
        bounds.append(frame.pixel_padding_range_limit)
    bounds = to_stored_values(np.array(bounds), frame.bits_stored, frame.pixel_representation)
    return (stored >= bounds.min()) & (stored <= bounds.max())


def _stored_to_hu(stored: np.ndarray, frame: RawFrame, path: Path) -> np.ndarray:
    if frame.rescale_slope is None or frame.rescale_intercept is None:
        raise DicomReadError(
            f"{path}: RescaleSlope or RescaleIntercept is missing, so the stored values cannot be "
            "converted to Hounsfield units"
        )
    if frame.rescale_slope == 0:
        raise DicomReadError(f"{path}: RescaleSlope is 0, so every pixel would have the same HU")
    slope, intercept = frame.rescale_slope, frame.rescale_intercept
    if float(slope).is_integer() and float(intercept).is_integer() and abs(intercept) < 2**23:
        # Integer rescale (1 and -1024 on nearly every CT): float32 gives the same values as
        # float64 rounded to float32, at half the memory traffic.
        hu = stored.astype(np.float32)
        if slope != 1:
            hu *= np.float32(slope)
        hu += np.float32(intercept)
    else:
        hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    padding = _padding_mask(stored, frame)
    if padding is not None:
        hu[padding] = AIR_HU
    return hu


def check_ct_plausibility(hu: np.ndarray) -> str | None:
    """Return why `hu` cannot be a decoded CT slice, or None when it can.

    Two signs of a wrong decode: neighbouring pixels that differ by more than WRAP_JUMP_HU
    (values that wrapped around), and a large share of pixels above HIGH_HU.
    """
    if hu.ndim != 2 or hu.shape[1] < 2:
        return None
    # Every PLAUSIBILITY_ROW_STEP-th row: over 100,000 pixel pairs of a 512 x 512 slice estimate
    # shares of a few percent well, at a fraction of the decode time.
    rows = hu[::PLAUSIBILITY_ROW_STEP]
    step = rows[:, 1:] - rows[:, :-1]
    wrap_fraction = np.count_nonzero((step > WRAP_JUMP_HU) | (step < -WRAP_JUMP_HU)) / step.size
    if wrap_fraction > MAX_WRAP_FRACTION:
        return (
            f"{wrap_fraction:.1%} of neighbouring pixel pairs differ by more than {WRAP_JUMP_HU:.0f} HU "
            f"(limit {MAX_WRAP_FRACTION:.0%}); the decoded values wrap around, so the codestream "
            "is corrupt or was read with the wrong sign"
        )
    high_fraction = np.count_nonzero(rows > HIGH_HU) / rows.size
    if high_fraction > MAX_HIGH_FRACTION:
        return (
            f"{high_fraction:.1%} of pixels are above {HIGH_HU:.0f} HU (limit {MAX_HIGH_FRACTION:.0%}), "
            "which no anatomy reaches"
        )
    return None


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
    hu = _stored_to_hu(stored, frame, path)
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
    hu = _stored_to_hu(stored, frame, path)
    reason = check_ct_plausibility(hu)
    if reason is None:
        return hu, slice_warnings
    retried = _hu_from_codestream_sign(frame, path, reason)
    if retried is None:
        raise _DecodeRejected(f"decoded slice is not plausible CT: {reason}")
    hu, warning = retried
    slice_warnings.append(warning)
    return hu, slice_warnings


def _transfer_syntax_label(uid: str) -> str:
    return f"{UID(uid).name} ({uid})" if uid else "unknown transfer syntax"


def _unknown_reader(reader: str) -> ValueError:
    return ValueError(f"unknown DICOM reader {reader!r}; choose from {sorted(READERS)}")


def read_slice(path: str | Path, readers: tuple[str, ...] = ("dicomsdl", "pydicom")) -> DicomSlice:
    """Read one single-frame CT file into HU, trying `readers` in order.

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
        except Exception as error:  # noqa: BLE001 -- decoders raise many types; each is reported below
            errors.append(f"{reader}: {type(error).__name__}: {error}")
            continue
        transfer_syntax = frame.transfer_syntax
        try:
            hu, slice_warnings = _hu_from_frame(frame, path)
        except _DecodeRejected as error:
            errors.append(f"{reader}: {error}")
            continue
        if errors:
            message = f"read with {reader} after {'; '.join(errors)}"
            logger.warning("%s: %s", path, message)
            slice_warnings.insert(0, message)
        return DicomSlice(
            path=path,
            hu=hu,
            position=frame.position,
            orientation=frame.orientation,
            pixel_spacing=frame.pixel_spacing,
            slice_thickness=frame.slice_thickness,
            instance_number=frame.instance_number,
            transfer_syntax=frame.transfer_syntax,
            reader=reader,
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
