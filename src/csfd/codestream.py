"""Check a file's PixelData against its header before a decoder reads it.

dicomsdl 0.109 trusts Rows, Columns, BitsAllocated and the PixelData length. A file whose
pixel data is shorter than its header says (a truncated download), or whose JPEG codestream is
larger than Rows x Columns, makes it read or write past its buffers: the process crashes or
returns uninitialised memory. These checks read the element's offset and length, and for
JPEG and JPEG 2000 the size in the first fragment's frame header, so that such files raise a
clear error instead. A JPEG codestream cut short within consistent DICOM items decodes without
an error, so its missing end marker becomes a warning in the prepare report.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
JPEG2000_PREFIX = "1.2.840.10008.1.2.4.9"  # .90 to .95: JPEG 2000 and JPIP; .201 to .203 are HTJ2K
HTJ2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
JPEG_SYNTAXES = frozenset(
    {f"1.2.840.10008.1.2.4.{suffix}" for suffix in ("50", "51", "53", "55", "57", "70", "80", "81")}
)
# JPEG start-of-frame markers (ITU-T T.81 B.1.1.3) and JPEG-LS SOF55 (ITU-T T.87): all carry
# the frame header P (1 byte), Y (2), X (2) after their 2-byte length.
SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) in little endian
DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) with length 0
# Bytes read from the first fragment: JPEG tables before the frame header take a few hundred.
HEADER_BYTES = 4096
# Bytes read from the end of the PixelData value, before its delimiter: the end marker sits in
# them with any padding, and with item headers when the last fragments are tiny.
TAIL_BYTES = 32
END_MARKER = b"\xff\xd9"  # JPEG EOI, JPEG-LS EOI and JPEG 2000 EOC share this code


class PixelDataMismatch(ValueError):
    """The PixelData element does not fit the header, so no decoder should read it."""


class CodestreamUnchecked(ValueError):
    """The codestream's size could not be read, so dicomsdl should not decode it, but pydicom may."""


class UnsupportedCodestream(ValueError):
    """A codestream that no reader of this project decodes safely, so none should try."""


class FrameHeader(NamedTuple):
    """The image size that a JPEG frame header or a JPEG 2000 SIZ segment states."""

    rows: int
    columns: int
    precision: int  # bits per sample (of component 0 for JPEG 2000)
    components: int


def check_pixel_data_extent(
    file_size: int, transfer_syntax: str, offset: int, length: int, rows: int, columns: int, bits_allocated: int,
    samples: int = 1,
) -> None:
    """Raise PixelDataMismatch when the element runs past the file end or, for native data, has the wrong length."""
    if transfer_syntax != DEFLATED_SYNTAX and offset + length > file_size:
        # The offsets of a deflated data set count in its inflated stream, not in the file.
        raise PixelDataMismatch(
            f"the file ends at byte {file_size} but its PixelData runs to byte {offset + length}: the file is truncated"
        )
    if transfer_syntax in NATIVE_SYNTAXES or transfer_syntax == DEFLATED_SYNTAX:
        expected = rows * columns * samples * bits_allocated // 8
        # Short data makes dicomsdl read past its buffer. Extra data is read safely, but a whole
        # row or more of it means Rows or Columns is wrong and the image would come out sheared.
        # Less than a row is padding, such as the byte that keeps an odd length even.
        row_bytes = max(columns * samples * bits_allocated // 8, 2)
        if not expected <= length < expected + row_bytes:
            raise PixelDataMismatch(
                f"PixelData has {length} bytes where Rows {rows} x Columns {columns} x BitsAllocated "
                f"{bits_allocated} need {expected}: the header does not match the pixel data"
            )


def fragment_edges(path: Path, offset: int, length: int) -> tuple[bytes, bytes]:
    """Return the first HEADER_BYTES of the first fragment and the last TAIL_BYTES of the last one.

    `offset` and `length` span the encapsulated PixelData value, which ends with the 8-byte
    sequence delimitation item. Either part is empty when the items are not where they should be.
    """
    with path.open("rb") as handle:
        handle.seek(max(offset + length - 8 - TAIL_BYTES, 0))
        tail = handle.read(TAIL_BYTES + 8)
        tail = _join_fragments(tail[:TAIL_BYTES]) if tail[TAIL_BYTES:] == DELIMITER else b""
        handle.seek(offset)
        head = handle.read(8)
        if len(head) < 8 or head[:4] != ITEM_TAG:
            return b"", tail
        table_length = struct.unpack("<I", head[4:])[0]  # the Basic Offset Table item comes first
        handle.seek(offset + 8 + table_length)
        head = handle.read(8)
        if len(head) < 8 or head[:4] != ITEM_TAG:
            return b"", tail
        return handle.read(HEADER_BYTES), tail


def _join_fragments(data: bytes) -> bytes:
    # A frame may end in several small fragments, so that the end marker spans an item header.
    # NOTE: the 4 bytes of the item tag can also occur in compressed data. Removing them there
    # could hide or fake the end marker, which is why this only feeds a warning.
    parts = data.split(ITEM_TAG)
    return parts[0] + b"".join(part[4:] for part in parts[1:])


def jpeg_frame_header(codestream: bytes) -> FrameHeader | None:
    """Return the size in a JPEG or JPEG-LS frame header (P, Y, X, Nf), or None if not found."""
    if codestream[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(codestream):
        if codestream[position] != 0xFF:
            return None
        marker = codestream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        segment_length = struct.unpack(">H", codestream[position + 2 : position + 4])[0]
        if marker in SOF_MARKERS:
            if position + 10 > len(codestream):
                return None
            precision = codestream[position + 4]
            rows, columns = struct.unpack(">HH", codestream[position + 5 : position + 9])
            return FrameHeader(rows, columns, precision, codestream[position + 9])
        position += 2 + segment_length
    return None


def j2k_frame_header(codestream: bytes) -> FrameHeader | None:
    """Return the size in a JPEG 2000 SIZ segment, or None if not found.

    SIZ (ISO/IEC 15444-1 A.5.1): Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz and four tile sizes
    (4 bytes each), Csiz, and Ssiz of component 0, whose low 7 bits are precision - 1. A JP2
    file wraps the codestream in boxes, so the marker pair is searched for.
    """
    start = codestream.find(b"\xff\x4f\xff\x51")
    ssiz_offset = start + 4 + 2 + 2 + 8 * 4 + 2
    if start < 0 or len(codestream) <= ssiz_offset:
        return None
    width, height, x_origin, y_origin = struct.unpack(">IIII", codestream[start + 8 : start + 24])
    components = struct.unpack(">H", codestream[ssiz_offset - 2 : ssiz_offset])[0]
    return FrameHeader(height - y_origin, width - x_origin, (codestream[ssiz_offset] & 0x7F) + 1, components)


def check_codestream(
    path: Path, transfer_syntax: str, offset: int, length: int, rows: int, columns: int, bits_allocated: int,
    samples: int = 1,
) -> list[str]:
    """Raise PixelDataMismatch when the codestream's size disagrees with Rows, Columns, BitsAllocated
    or SamplesPerPixel, and UnsupportedCodestream for a JPEG frame of height 0.

    Return a warning when the codestream lacks its end marker: decoders fill the missing part
    of a truncated JPEG with a constant and raise nothing, and the slice still looks like CT.
    Only JPEG, JPEG-LS and JPEG 2000 (HTJ2K too) state their size and end in the codestream;
    RLE and other syntaxes pass unchecked.
    """
    is_j2k = transfer_syntax.startswith(JPEG2000_PREFIX) or transfer_syntax in HTJ2K_SYNTAXES
    if transfer_syntax not in JPEG_SYNTAXES and not is_j2k:
        return []
    codestream, tail = fragment_edges(path, offset, length)
    warnings = []
    if tail and END_MARKER not in tail:
        warnings.append(
            "the codestream has no end marker (FFD9), so it is likely truncated and part of the slice blank"
        )
    header = j2k_frame_header(codestream) if is_j2k else jpeg_frame_header(codestream)
    if header is None:
        # Large APPn segments or JP2 boxes can push the frame header past the bytes read, and
        # an unchecked size is what crashes dicomsdl, so this file goes to the next reader.
        raise CodestreamUnchecked(
            f"no frame header in the first {HEADER_BYTES} bytes of the codestream, so its size cannot be "
            "checked before dicomsdl decodes it"
        )
    code_rows, code_columns, precision, components = header
    if code_rows == 0:
        # JPEG allows a height of 0 with the real one in a later DNL marker. dicomsdl 0.109 and
        # libjpeg-turbo 3.1 reject it, and pylibjpeg-libjpeg 2.5 grew past 15 GB on such a file.
        raise UnsupportedCodestream(
            "the frame header gives a height of 0 (the height would follow in a DNL marker), which no reader "
            "here decodes safely; convert the file to another transfer syntax"
        )
    if components != samples:
        # dicomsdl 0.109 decodes a 3-component frame into a 1-sample buffer and corrupts its heap.
        raise PixelDataMismatch(
            f"the codestream has {components} components but SamplesPerPixel is {samples}: "
            "the header does not match the pixel data"
        )
    if (code_rows, code_columns) != (rows, columns):
        raise PixelDataMismatch(
            f"the codestream is {code_rows} x {code_columns} pixels but Rows x Columns are {rows} x {columns}: "
            "the header does not match the pixel data"
        )
    if precision > bits_allocated:
        raise PixelDataMismatch(
            f"the codestream has {precision}-bit samples but BitsAllocated is {bits_allocated}: "
            "the header does not match the pixel data"
        )
    return warnings
