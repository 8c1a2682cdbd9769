"""Decoder backends for one DICOM file: dicomsdl and pydicom.

Each backend returns the header fields that HU conversion needs and the first frame's
pixel data as decoded, before any sign handling or rescale. Sign handling, padding and
rescale live in `csfd.dicom_io` so that both backends go through the same code.

pydicom is imported inside the functions that use it. Importing it takes about 0.15 s, which
each spawned prepare worker would otherwise pay at start-up, although dicomsdl reads nearly
every file.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from functools import cache
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from csfd.codestream import END_MARKER, UnsupportedCodestream, check_codestream, check_pixel_data_extent

try:
    import dicomsdl
except ImportError as error:  # the pydicom backend still works without it
    dicomsdl = None
    _DICOMSDL_IMPORT_ERROR = str(error)
else:
    _DICOMSDL_IMPORT_ERROR = ""

try:
    import imagecodecs
except ImportError as error:  # dicomsdl then decodes JPEG Lossless itself
    imagecodecs = None
    _IMAGECODECS_IMPORT_ERROR = str(error)
else:
    _IMAGECODECS_IMPORT_ERROR = ""

if TYPE_CHECKING:
    import pydicom

logger = logging.getLogger(__name__)

# Transfer syntax UIDs (DICOM PS3.6 table A-1), as pydicom.uid names them.
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
JPEG_BASELINE_8BIT = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG2000_ANY = "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# Both readers raise this (a failed read, not HeaderRejected) for a data set without an image.
NO_IMAGE = "no image found (neither Rows nor PixelData): the file is truncated or not a DICOM image"

JPEG2000_SYNTAXES = frozenset({JPEG2000_LOSSLESS, JPEG2000_ANY})

# JPEG Lossless, processes 14 and 14 SV1 (most competition slices are .70). libjpeg-turbo 3,
# through imagecodecs, decodes them to the same words as dicomsdl 0.109 in about 70% of its
# time (BENCHMARKS.md), so read_dicomsdl hands their pixels to it when imagecodecs is installed.
LOSSLESS_JPEG_SYNTAXES = frozenset({JPEG_LOSSLESS, JPEG_LOSSLESS_SV1})
LIBJPEG_TURBO = "libjpeg-turbo"

# The pydicom decoding plugin each compressed transfer syntax needs in this project.
# pydicom decodes RLE itself, and pylibjpeg-rle only makes it faster.
DECODER_PLUGINS: dict[str, str] = {
    JPEG_BASELINE_8BIT: "pylibjpeg-libjpeg",
    JPEG_EXTENDED_12BIT: "pylibjpeg-libjpeg",
    JPEG_LOSSLESS: "pylibjpeg-libjpeg",
    JPEG_LOSSLESS_SV1: "pylibjpeg-libjpeg",
    JPEG_LS_LOSSLESS: "pylibjpeg-libjpeg",
    JPEG_LS_NEAR_LOSSLESS: "pylibjpeg-libjpeg",
    JPEG2000_LOSSLESS: "pylibjpeg-openjpeg",
    JPEG2000_ANY: "pylibjpeg-openjpeg",
    RLE_LOSSLESS: "pylibjpeg-rle",
}


def syntax_name(uid: str) -> str:
    """Return pydicom's name of a transfer syntax UID ("JPEG Lossless, Non-Hierarchical, ...") for messages."""
    from pydicom.uid import UID

    return UID(uid).name


def find_missing_decoders() -> dict[str, str]:
    """Return {transfer syntax UID: plugin to install} for every syntax pydicom cannot decode."""
    from pydicom.pixels import get_decoder

    return {uid: plugin for uid, plugin in DECODER_PLUGINS.items() if not get_decoder(uid).is_available}


@cache
def _warn_missing_decoders() -> None:
    """Log the syntaxes pydicom cannot decode, once per process, when pydicom first reads a file."""
    missing = find_missing_decoders()
    if missing:
        logger.warning(
            "pydicom has no decoder for %s; files in these syntaxes can only be read by dicomsdl",
            ", ".join(f"{syntax_name(uid)} (install {plugin})" for uid, plugin in missing.items()),
        )


if dicomsdl is None:
    logger.warning("dicomsdl is not importable (%s); only pydicom will read DICOM", _DICOMSDL_IMPORT_ERROR)
elif imagecodecs is None:
    logger.warning(
        "imagecodecs is not importable (%s); dicomsdl decodes JPEG Lossless itself, about 1.4 times slower",
        _IMAGECODECS_IMPORT_ERROR,
    )


def check_decoders() -> None:
    """Raise RuntimeError naming each missing plugin, so that a run fails at start-up.

    Without the plugin, pydicom cannot decode that syntax at all. The error names the
    plugin, so the fix is one `pip install`.
    """
    missing = find_missing_decoders()
    if missing:
        listed = "; ".join(f"{syntax_name(uid)} ({uid}): install {plugin}" for uid, plugin in missing.items())
        raise RuntimeError(f"pydicom cannot decode these transfer syntaxes: {listed}")
    if dicomsdl is None:
        raise RuntimeError(f"dicomsdl is not importable ({_DICOMSDL_IMPORT_ERROR}): pip install dicomsdl")


@dataclass(frozen=True)
class PixelEncoding:
    """The header fields that map a decoded word to HU; hashable, so tables can be cached per header."""

    bits_stored: int
    pixel_representation: int
    rescale_slope: float | None
    rescale_intercept: float | None
    pixel_padding_value: int | None = None
    pixel_padding_range_limit: int | None = None


@dataclass
class RawFrame:
    """Header fields and the first frame of one file, as one backend decoded them."""

    pixels: np.ndarray  # (rows, cols) as the decoder returned it, before masking and sign extension
    transfer_syntax: str
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    pixel_representation: int
    samples_per_pixel: int
    photometric_interpretation: str
    number_of_frames: int
    rescale_slope: float | None
    rescale_intercept: float | None
    pixel_padding_value: int | None
    pixel_padding_range_limit: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    instance_number: int | None
    modality: str
    warnings: list[str]
    decoder: str = ""  # the library that decoded the pixels when it is not the reader itself

    @property
    def encoding(self) -> PixelEncoding:
        """The fields that map this frame's words to HU (csfd.hounsfield)."""
        return PixelEncoding(
            bits_stored=self.bits_stored,
            pixel_representation=self.pixel_representation,
            rescale_slope=self.rescale_slope,
            rescale_intercept=self.rescale_intercept,
            pixel_padding_value=self.pixel_padding_value,
            pixel_padding_range_limit=self.pixel_padding_range_limit,
        )


class DicomReadError(Exception):
    """A DICOM file that cannot be turned into correct HU. The message names the file and the reason."""


class HeaderRejected(ValueError):
    """The header itself rules the file out (multi-frame, colour, ...), so no other backend can help."""


def _as_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def _as_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def _as_vector(value: Any, length: int) -> np.ndarray | None:
    if value is None or value == "":
        return None
    vector = np.asarray([float(v) for v in value], dtype=np.float64)
    if vector.shape != (length,):
        raise ValueError(f"expected {length} values, found {list(value)}")
    return vector


def _build_header(get: Callable[[str], Any], transfer_syntax: str, path: Path) -> dict[str, Any]:
    """Read the header fields through `get(keyword)`, which returns None for a missing tag."""
    spacing = _as_vector(get("PixelSpacing"), 2)
    header = {
        "transfer_syntax": transfer_syntax,
        "rows": _as_int(get("Rows")),
        "columns": _as_int(get("Columns")),
        "bits_allocated": _as_int(get("BitsAllocated")),
        "bits_stored": _as_int(get("BitsStored")),
        "high_bit": _as_int(get("HighBit")),
        "pixel_representation": _as_int(get("PixelRepresentation")),
        "samples_per_pixel": _as_int(get("SamplesPerPixel")) or 1,
        "photometric_interpretation": str(get("PhotometricInterpretation") or "").strip(),
        "number_of_frames": _as_int(get("NumberOfFrames")) or 1,
        "rescale_slope": _as_float(get("RescaleSlope")),
        "rescale_intercept": _as_float(get("RescaleIntercept")),
        "pixel_padding_value": _as_int(get("PixelPaddingValue")),
        "pixel_padding_range_limit": _as_int(get("PixelPaddingRangeLimit")),
        "position": _as_vector(get("ImagePositionPatient"), 3),
        "orientation": _as_vector(get("ImageOrientationPatient"), 6),
        "pixel_spacing": None if spacing is None else (float(spacing[0]), float(spacing[1])),
        "slice_thickness": _as_float(get("SliceThickness")),
        "instance_number": _as_int(get("InstanceNumber")),
        "modality": str(get("Modality") or ""),
    }
    for keyword in ("rows", "columns", "bits_allocated", "bits_stored", "high_bit", "pixel_representation"):
        if header[keyword] is None:
            raise HeaderRejected(f"{path}: required pixel tag {keyword} is missing")
    if header["rows"] < 1 or header["columns"] < 1:
        raise HeaderRejected(f"{path}: Rows {header['rows']} and Columns {header['columns']} describe no image")
    if header["number_of_frames"] > 1:
        raise HeaderRejected(
            f"{path}: multi-frame file ({header['number_of_frames']} frames) is not supported; "
            "the pipeline reads one slice per file, so convert it to single-frame files first"
        )
    if header["samples_per_pixel"] != 1 or header["photometric_interpretation"] not in ("MONOCHROME1", "MONOCHROME2"):
        raise HeaderRejected(
            f"{path}: not a greyscale image (SamplesPerPixel {header['samples_per_pixel']}, "
            f"PhotometricInterpretation {header['photometric_interpretation']!r})"
        )
    if header["high_bit"] != header["bits_stored"] - 1:
        raise HeaderRejected(
            f"{path}: HighBit {header['high_bit']} with BitsStored {header['bits_stored']} is not supported "
            "(only HighBit = BitsStored - 1)"
        )
    return header


def read_dicomsdl(path: Path, lossless_jpeg: str = LIBJPEG_TURBO) -> RawFrame:
    """Decode `path` with dicomsdl, letting its errors propagate unchanged.

    JPEG Lossless pixels go to libjpeg-turbo when `lossless_jpeg` names it and imagecodecs is
    installed. With "dicomsdl", dicomsdl decodes them too, which the parity tests compare.
    """
    if dicomsdl is None:
        raise RuntimeError(f"dicomsdl is not importable ({_DICOMSDL_IMPORT_ERROR})")
    file_size = path.stat().st_size
    if file_size == 0:
        raise ValueError("the file is empty (0 bytes)")  # dicomsdl 0.109 corrupts memory on an empty file
    dataset = dicomsdl.open(str(path))
    transfer_syntax = str(dataset.TransferSyntaxUID or "")
    element = dataset.getDataElement("PixelData")
    if element.vr() == dicomsdl.VR.NONE:
        if dataset.getDataElement("Rows").vr() == dicomsdl.VR.NONE:
            # Not HeaderRejected: a partial read is no verdict on the file, so pydicom still tries.
            raise ValueError(NO_IMAGE)
        raise ValueError("no PixelData element: the file is truncated before its pixel data or contains no image")
    header = _build_header(lambda keyword: dataset[keyword], transfer_syntax, path)
    # dicomsdl reads past its buffers when PixelData does not fit the header, so check it first.
    # A file without a meta header has no TransferSyntaxUID, and dicomsdl reads it as Implicit
    # VR Little Endian, as read_pydicom does.
    syntax = transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN
    rows, columns, bits_allocated = header["rows"], header["columns"], header["bits_allocated"]
    offset, length = element.offset(), element.length()
    samples = header["samples_per_pixel"]
    check_pixel_data_extent(file_size, syntax, offset, length, rows, columns, bits_allocated, samples)
    try:
        codestream_warnings = check_codestream(path, syntax, offset, length, rows, columns, bits_allocated, samples)
    except UnsupportedCodestream as error:
        raise HeaderRejected(f"{path}: {error}") from error
    if lossless_jpeg == LIBJPEG_TURBO and imagecodecs is not None and syntax in LOSSLESS_JPEG_SYNTAXES:
        pixels = decode_lossless_jpeg(element)
        return RawFrame(pixels=pixels, warnings=codestream_warnings, decoder=LIBJPEG_TURBO, **header)
    # storedvalue=True skips dicomsdl's own rescale, so that rescale happens once, in dicom_io.
    pixels = dataset.pixelData(index=0, storedvalue=True)
    return RawFrame(pixels=pixels, warnings=codestream_warnings, **header)


def decode_lossless_jpeg(element: Any) -> np.ndarray:
    """Decode frame 0 of a dicomsdl PixelData element in JPEG Lossless with libjpeg-turbo.

    Returns the words unscaled, as dicomsdl's storedvalue=True does. Raises ValueError for a
    frame without its end marker and for a frame that libjpeg-turbo cannot decode.
    """
    # encodedFrameData joins the frame's fragments.
    codestream = element.toPixelSequence().encodedFrameData(0)
    # Entropy-coded JPEG data cannot contain FFD9, so a frame without it is cut short, for
    # example by a Basic Offset Table that lists more frames than NumberOfFrames. libjpeg-turbo
    # would fill the rest with a constant and raise nothing.
    if codestream.rfind(END_MARKER) < 0:
        raise ValueError("the JPEG Lossless frame has no end marker (FFD9), so part of the slice is missing")
    try:
        return imagecodecs.jpeg8_decode(codestream)
    except imagecodecs.Jpeg8Error as error:
        raise ValueError(f"{LIBJPEG_TURBO} cannot decode the JPEG Lossless frame: {error}") from error


def _read_pydicom_dataset(path: Path, messages: list[str]) -> pydicom.Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as error:
        messages.append(f"pydicom rejected the file ({error}); read again with force=True")
        return pydicom.dcmread(path, force=True)


def read_pydicom(path: Path) -> RawFrame:
    """Decode `path` with pydicom and its plugins; pydicom's own warnings go into RawFrame.warnings."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    _warn_missing_decoders()
    messages: list[str] = []
    # NOTE: catch_warnings changes process-wide state and is not thread-safe. Run parallel
    # reads in processes, not threads, or the warnings of one read may land in another.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = _read_pydicom_dataset(path, messages)
        if "Rows" not in dataset and "PixelData" not in dataset:
            # pydicom returns what it parsed before an error, often nothing for a truncated file,
            # so this is a failed read (the other reader's error is kept), not a rejected header.
            details = messages + [str(warning.message) for warning in caught]
            raise ValueError(NO_IMAGE + (f" ({'; '.join(details)})" if details else ""))
        file_meta = dataset.file_meta
        transfer_syntax = file_meta.get("TransferSyntaxUID")
        if transfer_syntax is None:
            # A file without a meta header: the encoding pydicom detected while parsing decides.
            implicit, little_endian = dataset.original_encoding
            if not little_endian:
                raise ValueError("no TransferSyntaxUID and the data set is big endian")
            transfer_syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            file_meta.TransferSyntaxUID = transfer_syntax
            messages.append(f"TransferSyntaxUID missing; assumed {transfer_syntax.name}")
        header = _build_header(dataset.get, str(transfer_syntax), path)
        decoder = get_decoder(transfer_syntax)
        if not decoder.is_available:
            plugin = DECODER_PLUGINS.get(str(transfer_syntax), "a decoding plugin")
            raise RuntimeError(f"pydicom has no decoder for {UID(transfer_syntax).name}: install {plugin}")
        pixels = dataset.pixel_array
    messages.extend(f"pydicom: {warning.message}" for warning in caught)
    return RawFrame(pixels=pixels, warnings=messages, **header)


READERS: dict[str, Callable[[Path], RawFrame]] = {"dicomsdl": read_dicomsdl, "pydicom": read_pydicom}


def read_transfer_syntax(path: Path) -> str:
    """Return the file's TransferSyntaxUID for an error message, or "" when it cannot be read."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001 -- only used to word an error that is raised anyway
        logger.debug("%s: cannot read the transfer syntax: %s", path, error)
        return ""
    return str(dataset.file_meta.get("TransferSyntaxUID", ""))


def read_j2k_signedness(path: Path) -> tuple[bool, int] | None:
    """Return (is_signed, precision) of the first component in the first JPEG 2000 frame.

    Parses the SIZ marker segment (ISO/IEC 15444-1 A.5.1). After the SOC and SIZ markers come
    Lsiz, Rsiz, eight 4-byte sizes and Csiz, then Ssiz of component 0. Bit 7 of Ssiz is the
    sign and its low 7 bits are precision - 1. A JP2 file wraps the codestream in boxes, so the
    marker pair is searched for. Returns None when no SIZ marker is found.
    """
    import pydicom
    from pydicom.encaps import generate_frames

    dataset = pydicom.dcmread(path, force=True)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    start = frame.find(b"\xff\x4f\xff\x51")
    ssiz_offset = start + 4 + 2 + 2 + 8 * 4 + 2
    if start < 0 or len(frame) <= ssiz_offset:
        return None
    ssiz = frame[ssiz_offset]
    return bool(ssiz & 0x80), (ssiz & 0x7F) + 1
