"""PixelData that does not fit its header is rejected before dicomsdl decodes it.

Each damaged file here crashed dicomsdl 0.109 or made it return uninitialised memory before
these checks existed, so a regression would show as a crash of the test process.
"""

from __future__ import annotations

import os
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from csfd.codestream import (
    PixelDataMismatch,
    check_pixel_data_extent,
    fragment_edges,
    j2k_frame_header,
    jpeg_frame_header,
)
from csfd.dicom_io import DicomReadError, read_slice
from csfd.dicom_readers import read_dicomsdl
from dicom_factory import write_ct

SYNTAXES = "transfer-syntaxes"
JPEG_LOSSLESS = f"{SYNTAXES}/CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm"
JPEG_LS = f"{SYNTAXES}/CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm"
J2K = f"{SYNTAXES}/CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm"


def codestream_of(path: Path) -> bytes:
    import dicomsdl

    element = dicomsdl.open(str(path)).getDataElement("PixelData")
    return fragment_edges(path, element.offset(), element.length())[0]


@pytest.mark.parametrize("name", [JPEG_LOSSLESS, JPEG_LS])
def test_jpeg_frame_header_of_real_file(real_ct_dir, name):
    header = jpeg_frame_header(codestream_of(real_ct_dir / name))
    assert (header.rows, header.columns, header.precision, header.components) == (512, 512, 16, 1)


def test_j2k_frame_header_of_real_file(real_ct_dir):
    header = j2k_frame_header(codestream_of(real_ct_dir / J2K))
    assert (header.rows, header.columns, header.components) == (512, 512, 1)


def test_frame_header_of_other_bytes():
    assert jpeg_frame_header(b"") is None
    assert jpeg_frame_header(b"\xff\xd8\xff") is None
    assert j2k_frame_header(b"\xff\x4f\xff\x51\x00") is None


@pytest.mark.parametrize(("name", "tag", "value"), [
    (JPEG_LOSSLESS, "Rows", 256),
    (JPEG_LOSSLESS, "Columns", 1024),
    (JPEG_LOSSLESS, "BitsAllocated", 8),
    (J2K, "Columns", 256),
])
def test_header_codestream_mismatch_rejected(real_ct_dir, tmp_path, name, tag, value):
    dataset = pydicom.dcmread(real_ct_dir / name)
    setattr(dataset, tag, value)
    if tag == "BitsAllocated":
        dataset.BitsStored, dataset.HighBit = 8, 7
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    with pytest.raises(PixelDataMismatch, match="the header does not match the pixel data"):
        read_dicomsdl(path)
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    assert str(path) in str(caught.value)
    assert "the header does not match the pixel data" in str(caught.value)


def test_truncated_native_file_rejected(tmp_path):
    path = write_ct(tmp_path / "1.dcm", np.zeros((32, 32)))
    path.write_bytes(path.read_bytes()[:-4])
    size = path.stat().st_size  # the 2,048-byte PixelData value now ends 4 bytes past the file
    with pytest.raises(PixelDataMismatch, match="the file is truncated"):
        check_pixel_data_extent(size, "1.2.840.10008.1.2.1", size - 2044, 2048, 32, 32, 16)


@pytest.mark.parametrize(("rows", "columns", "length"), [(32, 16, 2048), (32, 32, 1024), (32, 32, 2046)])
def test_native_length_mismatch_rejected(rows, columns, length):
    with pytest.raises(PixelDataMismatch, match=f"PixelData has {length} bytes"):
        check_pixel_data_extent(4096, "1.2.840.10008.1.2.1", 100, length, rows, columns, 16)
    check_pixel_data_extent(4096, "1.2.840.10008.1.2.1", 100, rows * columns * 2, rows, columns, 16)


def test_short_native_pixel_data_names_file(tmp_path):
    dataset = pydicom.dcmread(write_ct(tmp_path / "full.dcm", np.zeros((32, 32))))
    dataset.PixelData = dataset.PixelData[:1024]
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    assert str(path) in str(caught.value)
    assert "PixelData has 1024 bytes" in str(caught.value)


def test_empty_file_named(tmp_path):
    path = tmp_path / "1.dcm"
    path.write_bytes(b"")
    with pytest.raises(DicomReadError, match="the file is empty") as caught:
        read_slice(path)
    assert str(path) in str(caught.value)


def cut_codestream(source: Path, path: Path) -> Path:
    """Write `source` with its codestream cut in half inside consistent DICOM items."""
    from pydicom.encaps import encapsulate, generate_frames

    dataset = pydicom.dcmread(source)
    frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    dataset.PixelData = encapsulate([frame[: len(frame) // 2]])
    dataset.save_as(path)
    return path


def test_cut_jpeg_codestream_warns(real_ct_dir, tmp_path):
    # Decoders fill the missing rows and raise nothing, so only the missing end marker shows the cut.
    assert read_slice(real_ct_dir / JPEG_LOSSLESS).warnings == []
    path = cut_codestream(real_ct_dir / JPEG_LOSSLESS, tmp_path / "1.dcm")
    # dicomsdl's own decoder reads it, with the warning from the PixelData tail.
    own = read_dicomsdl(path, lossless_jpeg="dicomsdl")
    assert any("no end marker (FFD9)" in warning for warning in own.warnings)
    # libjpeg-turbo's path rejects the frame, and pydicom reads it with that reason as a warning.
    with pytest.raises(DicomReadError, match=re.escape("frame has no end marker (FFD9)")):
        read_slice(path, readers=("dicomsdl",))
    fallback = read_slice(path)
    assert fallback.reader == "pydicom"
    assert any("no end marker (FFD9)" in warning for warning in fallback.warnings)


def test_cut_j2k_codestream_raises(real_ct_dir, tmp_path):
    path = cut_codestream(real_ct_dir / J2K, tmp_path / "1.dcm")
    with pytest.raises(DicomReadError) as caught:
        read_slice(path, readers=("dicomsdl",))
    assert str(path) in str(caught.value)


def item(value: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(value)) + value


def test_end_marker_across_fragments_accepted(real_ct_dir, tmp_path):
    # A valid codestream whose last fragment is only b"\xd9\x00": the marker's FF sits in the
    # fragment before, behind an item header.
    from pydicom.encaps import generate_frames

    dataset = pydicom.dcmread(real_ct_dir / J2K)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1)).rstrip(b"\x00")
    assert len(codestream) % 2 == 1
    assert codestream.endswith(b"\xff\xd9")
    codestream += b"\x00"
    dataset.PixelData = item(b"") + item(codestream[:-2]) + item(codestream[-2:])
    dataset["PixelData"].is_undefined_length = True
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    dicom_slice = read_slice(path)
    assert dicom_slice.reader == "dicomsdl"
    assert dicom_slice.warnings == []


def test_frame_header_beyond_window_goes_to_pydicom(real_ct_dir, tmp_path):
    from pydicom.encaps import encapsulate, generate_frames

    dataset = pydicom.dcmread(real_ct_dir / JPEG_LOSSLESS)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    comment = b"\xff\xfe" + struct.pack(">H", 6002) + bytes(6000)  # a 6 kB COM segment after SOI
    dataset.PixelData = encapsulate([codestream[:2] + comment + codestream[2:]])
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    dicom_slice = read_slice(path)
    assert dicom_slice.reader == "pydicom"
    assert "no frame header in the first 4096 bytes" in dicom_slice.warnings[0]
    np.testing.assert_array_equal(dicom_slice.hu, read_slice(real_ct_dir / JPEG_LOSSLESS).hu)


def test_file_without_meta_header_checked(tmp_path):
    dataset = pydicom.dcmread(write_ct(tmp_path / "full.dcm", np.zeros((32, 32))))
    dataset.PixelData = dataset.PixelData[:1024]
    del dataset.file_meta
    path = tmp_path / "1.dcm"
    pydicom.dcmwrite(path, dataset, implicit_vr=True, little_endian=True, enforce_file_format=False)
    with pytest.raises(PixelDataMismatch, match="PixelData has 1024 bytes"):
        read_dicomsdl(path)


def test_padding_under_a_row_accepted():
    check_pixel_data_extent(4096, "1.2.840.10008.1.2.1", 100, 32 * 32 * 2 + 2, 32, 32, 16)
    with pytest.raises(PixelDataMismatch):
        check_pixel_data_extent(4096, "1.2.840.10008.1.2.1", 100, 32 * 33 * 2, 32, 32, 16)


def test_three_components_rejected_before_decoding(real_ct_dir, tmp_path):
    # dicomsdl 0.109 decodes a 3-component frame into a 1-sample buffer and corrupts its heap,
    # so only libjpeg-turbo's path is called here: it would return (512, 512, 3), not crash.
    import imagecodecs
    from pydicom.encaps import encapsulate

    rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    dataset = pydicom.dcmread(real_ct_dir / JPEG_LOSSLESS)
    dataset.PixelData = encapsulate([imagecodecs.jpeg8_encode(rgb, lossless=True)])
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    with pytest.raises(PixelDataMismatch, match="3 components but SamplesPerPixel is 1"):
        read_dicomsdl(path)


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def test_zero_height_frame_rejected_for_every_reader(real_ct_dir, tmp_path):
    # A height of 0 (a DNL marker to follow) made pylibjpeg-libjpeg grow past 15 GB, so the
    # read runs in a child process with 3 GiB of address space.
    from pydicom.encaps import encapsulate, generate_frames

    dataset = pydicom.dcmread(real_ct_dir / JPEG_LOSSLESS)
    frame = bytearray(next(generate_frames(dataset.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xc3")
    frame[sof + 5 : sof + 7] = b"\x00\x00"
    dataset.PixelData = encapsulate([bytes(frame)])
    path = tmp_path / "1.dcm"
    dataset.save_as(path)
    code = (
        "import sys\n"
        "from csfd.dicom_io import DicomReadError, read_slice\n"
        "try:\n"
        "    read_slice(sys.argv[1])\n"
        "except DicomReadError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(path) in result.stdout
    assert "height of 0" in result.stdout
    assert "pydicom:" not in result.stdout
