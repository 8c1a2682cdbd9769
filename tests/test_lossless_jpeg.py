"""JPEG Lossless (.57, .70) pixels decoded by libjpeg-turbo through imagecodecs.

read_dicomsdl hands these frames to libjpeg-turbo because it is faster than dicomsdl's own
decoder. These tests check that it gives the same words as dicomsdl on every real file of
these syntaxes, and check the fallbacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from csfd import dicom_readers
from csfd.dicom_io import DicomReadError, read_slice
from csfd.dicom_readers import LIBJPEG_TURBO, LOSSLESS_JPEG_SYNTAXES, read_dicomsdl
from csfd.series import load_series

# Every real file in JPEG Lossless .57 or .70 in the shared test data.
LOSSLESS_JPEG_FILES = [
    "cspine-slice/IM-0001-0001-0001.dcm",
    "neck-slice/bad_sequence.dcm",
    "transfer-syntaxes/CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
    "transfer-syntaxes/CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
    "edge-cases/pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm",
]
CSPINE = LOSSLESS_JPEG_FILES[0]


def save_with_pixel_data(dataset: pydicom.Dataset, pixel_data: bytes, path: Path) -> Path:
    """Write `dataset` to `path` with `pixel_data` as its encapsulated PixelData value."""
    dataset.PixelData = pixel_data
    dataset["PixelData"].is_undefined_length = True
    dataset.save_as(path)
    return path


def words(pixels: np.ndarray) -> np.ndarray:
    """The decoded 16-bit words, whatever signedness the decoder gave them."""
    return np.asarray(pixels).view(np.uint16)


@pytest.mark.parametrize("name", LOSSLESS_JPEG_FILES)
def test_libjpeg_turbo_gives_dicomsdl_words(real_ct_dir, name):
    path = real_ct_dir / name
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) in LOSSLESS_JPEG_SYNTAXES
    turbo = read_dicomsdl(path)
    own = read_dicomsdl(path, lossless_jpeg="dicomsdl")
    assert turbo.decoder == LIBJPEG_TURBO
    assert own.decoder == ""
    assert turbo.pixels.shape == own.pixels.shape == (turbo.rows, turbo.columns)
    assert np.array_equal(words(turbo.pixels), words(own.pixels))


def test_frame_in_several_fragments(real_ct_dir, tmp_path):
    dataset = pydicom.dcmread(real_ct_dir / CSPINE)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    path = save_with_pixel_data(dataset, encapsulate([codestream], fragments_per_frame=5), tmp_path / "1.dcm")
    assert len(list(pydicom.encaps.generate_fragments(dataset.PixelData))) >= 5
    split = read_slice(path)
    whole = read_slice(real_ct_dir / CSPINE)
    assert split.reader == "dicomsdl+libjpeg-turbo"
    assert np.array_equal(split.hu, whole.hu)


def test_without_imagecodecs_dicomsdl_decodes(real_ct_dir, monkeypatch):
    with_turbo = read_slice(real_ct_dir / CSPINE)
    monkeypatch.setattr(dicom_readers, "imagecodecs", None)
    without = read_slice(real_ct_dir / CSPINE)
    assert with_turbo.reader == "dicomsdl+libjpeg-turbo"
    assert without.reader == "dicomsdl"
    assert np.array_equal(with_turbo.hu, without.hu)


def test_undecodable_frame_names_libjpeg_turbo(real_ct_dir, tmp_path):
    # Without its Huffman table (DHT marker segment) the scan cannot be decoded by anyone.
    dataset = pydicom.dcmread(real_ct_dir / CSPINE)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    start = codestream.index(b"\xff\xc4")
    length = int.from_bytes(codestream[start + 2 : start + 4], "big")
    broken = codestream[:start] + codestream[start + 2 + length :]
    path = save_with_pixel_data(dataset, encapsulate([broken + b"\x00" * (len(broken) % 2)]), tmp_path / "1.dcm")
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    message = str(caught.value)
    assert str(path) in message
    assert "dicomsdl: ValueError: libjpeg-turbo cannot decode the JPEG Lossless frame" in message
    assert "pydicom:" in message


def test_offset_table_of_two_frames_rejected(real_ct_dir, tmp_path):
    # NumberOfFrames is 1 but the Basic Offset Table starts a second frame halfway through the
    # codestream. dicomsdl's frame 0 is then the first half, without its end marker, which
    # libjpeg-turbo would decode with the lower rows filled by a constant.
    dataset = pydicom.dcmread(real_ct_dir / CSPINE)
    codestream = next(generate_frames(dataset.PixelData, number_of_frames=1))
    half = len(codestream) // 2 // 2 * 2
    first, second = codestream[:half], codestream[half:] + b"\x00" * (len(codestream[half:]) % 2)
    table = (0).to_bytes(4, "little") + (8 + len(first)).to_bytes(4, "little")
    items = [table, first, second]
    pixel_data = b"".join(b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item for item in items)
    path = save_with_pixel_data(dataset, pixel_data, tmp_path / "1.dcm")
    with pytest.raises(ValueError, match=re.escape("frame has no end marker (FFD9)")):
        read_dicomsdl(path)
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    assert str(path) in str(caught.value)
    assert "no end marker (FFD9)" in str(caught.value)


def test_series_reports_the_decoder(real_ct_dir, tmp_path):
    dataset = pydicom.dcmread(real_ct_dir / CSPINE)
    x, y, z = (float(v) for v in dataset.ImagePositionPatient)
    study = tmp_path / "1.2.3"
    study.mkdir()
    for k in range(3):
        dataset.ImagePositionPatient = [x, y, z - k]
        dataset.InstanceNumber = k + 1
        dataset.save_as(study / f"{k + 1}.dcm")
    series = load_series(study)
    assert series.readers == ["dicomsdl+libjpeg-turbo"] * 3
    assert series.transfer_syntaxes == [str(dataset.file_meta.TransferSyntaxUID)] * 3
