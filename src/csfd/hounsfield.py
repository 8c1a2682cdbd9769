"""From decoded DICOM words to Hounsfield units and to the windowed uint8 of the cache.

Pure numpy, shared by both DICOM readers (csfd.dicom_io runs the steps in order):
1. Stored values: the decoded words are masked to BitsStored bits and, when
   PixelRepresentation is 1, sign-extended.
2. Padding: stored values equal to PixelPaddingValue, or within PixelPaddingValue ..
   PixelPaddingRangeLimit when that tag is present, become air (-1000 HU).
3. HU = stored * RescaleSlope + RescaleIntercept, with each file's own tags, applied once.
4. Plausibility (`check_ct_plausibility`): values that wrap around mean a corrupt codestream
   or a wrong sign.
5. Window: HU to uint8 (`window_to_uint8`).

Steps 1 to 3 and 5 depend on a pixel's 16-bit word alone, so for 16-bit data one lookup
table per header (`window_tables`) gives the same uint8 as the steps in turn, in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from csfd.dicom_readers import DicomReadError, PixelEncoding

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
# The checks read every second row: over 100,000 pixel pairs of a 512 x 512 slice estimate
# shares of a few percent well, at a fraction of the decode time.
PLAUSIBILITY_ROW_STEP = 2


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


def check_rescale(encoding: PixelEncoding, path: Path) -> None:
    """Raise DicomReadError naming `path` when its rescale tags cannot give HU."""
    if encoding.rescale_slope is None or encoding.rescale_intercept is None:
        raise DicomReadError(
            f"{path}: RescaleSlope or RescaleIntercept is missing, so the stored values cannot be "
            "converted to Hounsfield units"
        )
    if encoding.rescale_slope == 0:
        raise DicomReadError(f"{path}: RescaleSlope is 0, so every pixel would have the same HU")
    if not (math.isfinite(encoding.rescale_slope) and math.isfinite(encoding.rescale_intercept)):
        raise DicomReadError(
            f"{path}: RescaleSlope {encoding.rescale_slope} and RescaleIntercept {encoding.rescale_intercept} "
            "must be finite numbers to give HU"
        )


def _padding_mask(stored: np.ndarray, encoding: PixelEncoding) -> np.ndarray | None:
    if encoding.pixel_padding_value is None:
        return None
    # The tag's VR (US or SS) may not match PixelRepresentation (a US 63536 meaning -2000),
    # so it goes through the same masking and sign rule as the pixels.
    bounds = [encoding.pixel_padding_value]
    if encoding.pixel_padding_range_limit is not None:
        bounds.append(encoding.pixel_padding_range_limit)
    bounds = to_stored_values(np.array(bounds), encoding.bits_stored, encoding.pixel_representation)
    return (stored >= bounds.min()) & (stored <= bounds.max())


def stored_to_hu(stored: np.ndarray, encoding: PixelEncoding, path: Path) -> np.ndarray:
    """Return float32 HU of int32 stored values, padding mapped to air; errors name `path`."""
    check_rescale(encoding, path)
    slope, intercept = encoding.rescale_slope, encoding.rescale_intercept
    if float(slope).is_integer() and float(intercept).is_integer() and abs(intercept) < 2**23:
        # Integer rescale (1 and -1024 on nearly every CT): float32 gives the same values as
        # float64 rounded to float32, at half the memory traffic.
        hu = stored.astype(np.float32)
        if slope != 1:
            hu *= np.float32(slope)
        hu += np.float32(intercept)
    else:
        hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    padding = _padding_mask(stored, encoding)
    if padding is not None:
        hu[padding] = AIR_HU
    return hu


def check_ct_plausibility(hu: np.ndarray, row_step: int = PLAUSIBILITY_ROW_STEP) -> str | None:
    """Return why `hu` cannot be a decoded CT slice, or None when it can.

    Two signs of a wrong decode: neighbouring pixels that differ by more than WRAP_JUMP_HU
    (values that wrapped around), and a large share of pixels above HIGH_HU. Only every
    `row_step`-th row is read; pass 1 for rows that were already picked.
    """
    if hu.ndim != 2 or hu.shape[1] < 2:
        return None
    rows = hu[::row_step]
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


def window_to_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map Hounsfield units to uint8: center - width/2 and below is 0, center + width/2 and above 255."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


@dataclass(frozen=True)
class WindowTables:
    """For every 16-bit word: its HU (float32) and its windowed uint8, under one header and window."""

    hu: np.ndarray  # (65536,) float32
    uint8: np.ndarray  # (65536,) uint8
    signed: bool  # PixelRepresentation 1: the words read as int16 are in the order of their HU


@lru_cache(maxsize=32)
def window_tables(encoding: PixelEncoding, center: float, width: float) -> WindowTables:
    """Build the 65,536-entry tables with the same functions as the step-by-step path.

    The rescale tags must have passed `check_rescale`. About 1 ms to build; a study's slices
    nearly always share one header, so a worker builds a handful per study at most.
    """
    words = np.arange(2**16, dtype=np.uint32)
    stored = to_stored_values(words, encoding.bits_stored, encoding.pixel_representation)
    hu = stored_to_hu(stored, encoding, Path("<lookup table>"))
    uint8 = window_to_uint8(hu, center, width)
    hu.setflags(write=False)
    uint8.setflags(write=False)
    return WindowTables(hu=hu, uint8=uint8, signed=encoding.pixel_representation == 1)


def check_word_plausibility(tables: WindowTables, words: np.ndarray) -> str | None:
    """Return `check_ct_plausibility` of the HU of 16-bit `words`, without reading them all when it can.

    Take the HU of every word between the slice's smallest and largest word. When they span at
    most WRAP_JUMP_HU and stay at or below HIGH_HU, no pixel pair and no pixel can fail either
    check, so the range alone proves the slice plausible. That covers nearly every real slice: 12-bit CT
    spans 4,096 HU. Signed data is ranged as int16, where air and padding sit next to zero.
    """
    values = words.view(np.int16) if tables.signed else words
    low, high = int(values.min()), int(values.max())
    span = np.take(tables.hu, np.arange(low, high + 1) & 0xFFFF)
    top = span.max()
    if top <= HIGH_HU and top - span.min() <= WRAP_JUMP_HU:
        return None
    return check_ct_plausibility(np.take(tables.hu, words[::PLAUSIBILITY_ROW_STEP]), row_step=1)


def as_16bit_words(raw: np.ndarray, bits_stored: int) -> np.ndarray | None:
    """Return `raw` viewed as uint16 words when the lookup tables apply to it, else None.

    Masking and sign extension read only the low BitsStored bits, so an int16 array viewed as
    uint16 gives the same stored values as the array itself.
    """
    if raw.dtype.kind not in "iu" or raw.dtype.itemsize != 2 or bits_stored > 16:
        return None
    return raw.view(np.uint16)
