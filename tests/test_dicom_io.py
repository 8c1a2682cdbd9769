"""Reading one CT slice: sign handling, rescale, padding, reader parity and clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from csfd import dicom_readers
from csfd.dicom_io import (
    DicomReadError,
    check_ct_plausibility,
    check_decoders,
    find_missing_decoders,
    read_slice,
    read_stored_values,
    to_stored_values,
)
from dicom_factory import write_ct

READERS = ("dicomsdl", "pydicom")


# --- stored values and HU on files written here -------------------------------------------


def test_sign_extension_from_bits_stored():
    words = np.array([0x0F38, 0xFF38, 0x0800, 0x07FF, 0xF000], dtype=np.uint16)
    signed = to_stored_values(words, bits_stored=12, pixel_representation=1)
    unsigned = to_stored_values(words, bits_stored=12, pixel_representation=0)
    assert signed.tolist() == [-200, -200, -2048, 2047, 0]
    assert unsigned.tolist() == [3896, 3896, 2048, 2047, 0]
    assert signed.dtype == np.int32


@pytest.mark.parametrize("reader", READERS)
def test_signed_12bit_words_same_in_both_readers(tmp_path, reader):
    # 0x0F38 has bit 11 set: -200 in 12-bit two's complement, whatever the unused high bits hold.
    words = np.array([[0x0F38, 0xFF38, 0x0138, 0xF138]], dtype=np.uint16)
    path = write_ct(tmp_path / "1.dcm", words, bits_stored=12, pixel_representation=1, intercept=0.0)
    assert read_stored_values(path, reader).tolist() == [[-200, -200, 312, 312]]
    dicom_slice = read_slice(path, readers=(reader,))
    assert dicom_slice.reader == reader
    assert dicom_slice.hu.tolist() == [[-200.0, -200.0, 312.0, 312.0]]


@pytest.mark.parametrize("reader", READERS)
def test_rescale_uses_each_slices_own_tags(tmp_path, reader):
    words = np.full((2, 3), 1024, dtype=np.uint16)
    first = write_ct(tmp_path / "1.dcm", words, pixel_representation=0, slope=1.0, intercept=-1024.0)
    second = write_ct(tmp_path / "2.dcm", words, pixel_representation=0, slope=0.5, intercept=-1024.0)
    hu_first = read_slice(first, readers=(reader,)).hu
    hu_second = read_slice(second, readers=(reader,)).hu
    assert hu_first.dtype == np.float32
    assert np.all(hu_first == 0.0)
    assert np.all(hu_second == -512.0)


@pytest.mark.parametrize("reader", READERS)
def test_monochrome1_hu_not_inverted(tmp_path, reader):
    words = np.array([[0, 1024, 2048]], dtype=np.uint16)
    path = write_ct(tmp_path / "1.dcm", words, pixel_representation=0, photometric="MONOCHROME1")
    assert read_slice(path, readers=(reader,)).hu.tolist() == [[-1024.0, 0.0, 1024.0]]


@pytest.mark.parametrize("reader", READERS)
def test_padding_value_becomes_air(tmp_path, reader):
    stored = np.array([[-1500, -1500, 0, 1200]])
    path = write_ct(tmp_path / "1.dcm", stored, intercept=0.0, padding=("SS", -1500))
    assert read_slice(path, readers=(reader,)).hu.tolist() == [[-1000.0, -1000.0, 0.0, 1200.0]]


@pytest.mark.parametrize("reader", READERS)
def test_padding_written_as_us_for_signed_pixels(tmp_path, reader):
    # 63536 is the 16-bit pattern of -2000. Some scanners write the tag as US for signed pixels.
    stored = np.array([[-2000, -1000, 40]])
    path = write_ct(tmp_path / "1.dcm", stored, intercept=-1024.0, padding=("US", 63536))
    assert read_slice(path, readers=(reader,)).hu.tolist() == [[-1000.0, -2024.0, -984.0]]


@pytest.mark.parametrize("reader", READERS)
def test_padding_range_limit(tmp_path, reader):
    stored = np.array([[-2100, -2000, -1750, -1500, -1499, 0]])
    path = write_ct(tmp_path / "1.dcm", stored, intercept=0.0, padding=("SS", -2000), padding_limit=("SS", -1500))
    hu = read_slice(path, readers=(reader,)).hu
    assert hu.tolist() == [[-2100.0, -1000.0, -1000.0, -1000.0, -1499.0, 0.0]]


def test_missing_rescale_raises(tmp_path):
    path = write_ct(tmp_path / "1.dcm", np.zeros((2, 2)), intercept=None)
    with pytest.raises(DicomReadError, match="RescaleIntercept is missing") as caught:
        read_slice(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("reader", READERS)
def test_nan_rescale_raises(tmp_path, reader):
    path = write_ct(tmp_path / "1.dcm", np.zeros((2, 2)), slope=float("nan"))
    with pytest.raises(DicomReadError, match="must be finite numbers") as caught:
        read_slice(path, readers=(reader,))
    assert str(path) in str(caught.value)


def test_decoder_panic_becomes_read_error(tmp_path, monkeypatch):
    class Panic(BaseException):
        """Like pylibjpeg-rle's PanicException, which does not derive from Exception."""

    def panicking_reader(path):
        raise Panic("index out of bounds")

    monkeypatch.setitem(dicom_readers.READERS, "dicomsdl", panicking_reader)
    path = write_ct(tmp_path / "1.dcm", np.zeros((2, 2)))
    assert read_slice(path).reader == "pydicom"
    with pytest.raises(DicomReadError, match="Panic: index out of bounds"):
        read_slice(path, readers=("dicomsdl",))


def test_unknown_reader_raises(tmp_path):
    path = write_ct(tmp_path / "1.dcm", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="unknown DICOM reader 'gdcm'"):
        read_slice(path, readers=("gdcm",))


def test_file_without_preamble_read_with_force(tmp_path):
    source = write_ct(tmp_path / "source.dcm", np.array([[1024, 0]]), pixel_representation=0)
    dataset = pydicom.dcmread(source)
    stripped = tmp_path / "stripped.dcm"
    dataset.save_as(stripped, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = stripped.read_bytes()
    stripped.write_bytes(raw[raw.index(b"\x08\x00"):])  # drop preamble and file meta
    dicom_slice = read_slice(stripped, readers=("pydicom",))
    assert dicom_slice.hu.tolist() == [[0.0, -1024.0]]
    assert any("force=True" in message for message in dicom_slice.warnings)


def test_plausibility_accepts_smooth_slice():
    hu = np.tile(np.linspace(-1000.0, 1500.0, 64), (64, 1))
    assert check_ct_plausibility(hu) is None


def test_plausibility_rejects_wrapped_values():
    hu = np.tile([-20000.0, 20000.0], (64, 32))
    reason = check_ct_plausibility(hu)
    assert reason is not None
    assert "wrap around" in reason


def test_plausibility_rejects_mostly_above_8000_hu():
    hu = np.full((64, 64), 40.0)
    hu[:10] = 64000.0  # 16% of pixels, in one block so that few neighbours jump
    reason = check_ct_plausibility(hu)
    assert reason is not None
    assert "above 8000 HU" in reason


# --- decoder plugins ------------------------------------------------------------------------


def test_all_decoder_plugins_installed():
    assert find_missing_decoders() == {}
    check_decoders()


class _UnavailableDecoder:
    is_available = False


def test_missing_plugin_is_named(monkeypatch, real_ct_dir):
    # dicom_readers imports get_decoder when it is called, so the patch reaches it there.
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _UnavailableDecoder())
    with pytest.raises(RuntimeError, match="install pylibjpeg-libjpeg"):
        check_decoders()
    path = real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm"
    with pytest.raises(DicomReadError, match="install pylibjpeg-libjpeg") as caught:
        read_slice(path, readers=("pydicom",))
    assert "1.2.840.10008.1.2.4.70" in str(caught.value)


# --- real files: transfer syntaxes ------------------------------------------------------------

LOSSLESS_SYNTAXES = [
    "LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1",
    "LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2",
    "BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2",
    "DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99",
    "RLELosslessTransferSyntax_1.2.840.10008.1.2.5",
    "JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57",
    "JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70",
    "JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80",
    "JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90",
]

# Largest mean absolute HU error against the uncompressed slice. Measured with both readers
# (dicomsdl 0.109.4, pydicom 3.0.2 + pylibjpeg): .50 19.8 (8-bit, RescaleSlope 32 HU per
# step), .51 3.8, .81 0.69, .91 0.57.
LOSSY_MAE_LIMITS = {
    "JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50": 25.0,
    "JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51": 6.0,
    "JPEGLSLossyTransferSyntax_1.2.840.10008.1.2.4.81": 1.5,
    "JPEG2000TransferSyntax_1.2.840.10008.1.2.4.91": 1.0,
}

UNSUPPORTED_SYNTAXES = [
    "JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53",
    "JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55",
]


def _syntax_file(real_ct_dir: Path, name: str) -> Path:
    return real_ct_dir / "transfer-syntaxes" / f"CTImage.dcm_{name}.dcm"


@pytest.fixture(scope="module")
def reference_slice(real_ct_dir):
    """The uncompressed slice (Implicit VR Little Endian) read by pydicom alone."""
    path = real_ct_dir / "transfer-syntaxes" / "CTImage.dcm"
    dataset = pydicom.dcmread(path)
    return dataset.pixel_array.astype(np.int32), read_slice(path, readers=("pydicom",)).hu


@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES)
@pytest.mark.parametrize("reader", READERS)
def test_lossless_syntax_identical(real_ct_dir, reference_slice, syntax, reader):
    # dicomsdl 0.109.4 reads all nine lossless syntaxes, Big Endian and Deflated included,
    # so both readers are checked on every one.
    path = _syntax_file(real_ct_dir, syntax)
    reference_stored, reference_hu = reference_slice
    assert np.array_equal(read_stored_values(path, reader), reference_stored)
    dicom_slice = read_slice(path, readers=(reader,))
    jpeg_lossless = syntax.rsplit("_", 1)[1] in dicom_readers.LOSSLESS_JPEG_SYNTAXES
    assert dicom_slice.reader == (f"{reader}+libjpeg-turbo" if reader == "dicomsdl" and jpeg_lossless else reader)
    assert dicom_slice.transfer_syntax == syntax.rsplit("_", 1)[1]
    assert np.array_equal(dicom_slice.hu, reference_hu)


@pytest.mark.parametrize("syntax", sorted(LOSSY_MAE_LIMITS))
def test_lossy_syntax_within_tolerance(real_ct_dir, reference_slice, syntax):
    path = _syntax_file(real_ct_dir, syntax)
    _, reference_hu = reference_slice
    hu_by_reader = {reader: read_slice(path, readers=(reader,)).hu for reader in READERS}
    for hu in hu_by_reader.values():
        assert float(np.abs(hu - reference_hu).mean()) < LOSSY_MAE_LIMITS[syntax]
    # The two JPEG decoders may round the inverse DCT differently: at most one stored step apart.
    slope = float(pydicom.dcmread(path, stop_before_pixels=True).RescaleSlope)
    difference = np.abs(hu_by_reader["dicomsdl"] - hu_by_reader["pydicom"])
    assert float(difference.max()) <= slope + 1e-3


@pytest.mark.parametrize("syntax", UNSUPPORTED_SYNTAXES)
def test_unsupported_syntax_names_file_and_syntax(real_ct_dir, syntax):
    path = _syntax_file(real_ct_dir, syntax)
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    message = str(caught.value)
    assert path.name in message
    assert syntax.rsplit("_", 1)[1] in message
    assert "dicomsdl:" in message
    assert "pydicom:" in message


# --- real files: edge cases -------------------------------------------------------------------

# (file, expected shape, min HU, max HU, stored padding value or None, reader) for files that read.
# The HU range is what correct decoding gives (air about -1000, bone above 300).
READABLE_EDGE_CASES = [
    ("cspine-slice/IM-0001-0001-0001.dcm", (512, 512), -1024, 1456, None, "dicomsdl+libjpeg-turbo"),
    ("neck-slice/bad_sequence.dcm", (512, 512), -1011, 1243, None, "dicomsdl+libjpeg-turbo"),
    ("edge-cases/cornerstone/CT1_J2KR", (512, 512), -1024, 1254, -2000, "dicomsdl"),
    ("edge-cases/cornerstone/CT2_J2KR", (512, 512), -2048, 1433, None, "dicomsdl"),
    ("edge-cases/fo-dicom/CT-MONO2-16-ankle", (512, 512), -992, 3056, 0, "dicomsdl"),
    ("edge-cases/fo-dicom/CT1_J2KI", (512, 512), -3339, 1385, -2000, "dicomsdl"),
    ("edge-cases/fo-dicom/D_CLUNIE_CT1_RLE_FRAGS.dcm", (512, 512), -1024, 1254, -2000, "dicomsdl"),
    ("edge-cases/fo-dicom/GH1308.dcm", (512, 512), -1000, 1376, -2000, "dicomsdl"),
    ("edge-cases/fo-dicom/GH1728.dcm", (568, 652), -1024, 1530, None, "dicomsdl"),
    ("edge-cases/fo-dicom/GH342.dcm", (512, 512), -1024, 1400, None, "dicomsdl"),
    ("edge-cases/pydicom/693_J2KI.dcm", (512, 512), -3995, 1812, -2000, "dicomsdl"),
    ("edge-cases/pydicom/CT_small.dcm", (128, 128), -896, 1167, -2000, "dicomsdl"),
    ("edge-cases/pydicom/J2K_pixelrep_mismatch.dcm", (512, 512), -2000, 1896, None, "dicomsdl"),
    ("edge-cases/pydicom-data/693_J2KR.dcm", (512, 512), -1024, 1468, -2000, "dicomsdl"),
    ("edge-cases/pydicom-data/693_UNCI.dcm", (512, 512), -3995, 1812, -2000, "dicomsdl"),
    ("edge-cases/pydicom-data/693_UNCR.dcm", (512, 512), -1024, 1468, -2000, "dicomsdl"),
    ("edge-cases/pydicom-data/explicit_VR-UN.dcm", (512, 512), -1024, 1186, None, "pydicom"),
    ("edge-cases/pylibjpeg-data/CT1_JLSN.dcm", (512, 512), -3028, 1254, -2000, "dicomsdl"),
    ("edge-cases/pylibjpeg-data/ELSCINT1_JP2vsJ2K.dcm", (512, 512), -1000, 3095, None, "dicomsdl"),
    ("edge-cases/pylibjpeg-data/MAROTECH_CT_JP2Lossy.dcm", (716, 512), -1024, 2988, None, "dicomsdl"),
    ("edge-cases/pylibjpeg-data/TOSHIBA_J2K_OpenJPEGv2Regression.dcm", (512, 512), -2048, 1969, None, "dicomsdl"),
    ("edge-cases/pylibjpeg-data/TOSHIBA_J2K_SIZ0_PixRep1.dcm", (512, 512), -2048, 1717, None, "dicomsdl"),
]

# (file, text the DicomReadError must contain) for files that must not read.
REJECTED_EDGE_CASES = [
    ("edge-cases/cornerstone/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm", "multi-frame file (2 frames)"),
    ("edge-cases/pydicom-data/eCT_Supplemental.dcm", "multi-frame file (2 frames)"),
    ("edge-cases/pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm", "not plausible CT"),
]


@pytest.mark.parametrize(("name", "shape", "hu_min", "hu_max", "padding", "reader"), READABLE_EDGE_CASES)
def test_edge_case_reads_correct_hu(real_ct_dir, name, shape, hu_min, hu_max, padding, reader):
    path = real_ct_dir / name
    dicom_slice = read_slice(path)
    hu = dicom_slice.hu
    assert dicom_slice.reader == reader
    assert hu.shape == shape
    assert float(hu.min()) == hu_min
    assert float(hu.max()) == hu_max
    assert float(hu.max()) > 300.0  # bone is present
    assert float(np.percentile(hu, 1)) < -800.0  # air or the out-of-field fill is present

    # pydicom's own rescale of its own decode, with padding pixels turned to air.
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array
    expected = apply_rescale(stored.astype(np.float64), dataset)
    if padding is not None:
        expected[stored == padding] = -1000.0
    assert np.array_equal(hu, expected.astype(np.float32))


@pytest.mark.parametrize(("name", "reason"), REJECTED_EDGE_CASES)
def test_edge_case_rejected_with_reason(real_ct_dir, name, reason):
    path = real_ct_dir / name
    with pytest.raises(DicomReadError, match=re.escape(reason)) as caught:
        read_slice(path)
    assert path.name in str(caught.value)


@pytest.mark.parametrize(("name", "shape", "hu_min", "hu_max", "padding", "reader"), READABLE_EDGE_CASES)
def test_edge_case_readers_agree(real_ct_dir, name, shape, hu_min, hu_max, padding, reader):
    path = real_ct_dir / name
    if reader == "pydicom":
        # dicomsdl 0.109.4 fails on this file's VR UN tags, so pydicom is its only reader.
        with pytest.raises(DicomReadError, match="dicomsdl cannot decode it"):
            read_stored_values(path, "dicomsdl")
        return
    assert np.array_equal(read_stored_values(path, "dicomsdl"), read_stored_values(path, "pydicom"))
    assert np.array_equal(read_slice(path, readers=("dicomsdl",)).hu, read_slice(path, readers=("pydicom",)).hu)


def test_corrupt_jpeg_rejected_by_both_readers(real_ct_dir):
    path = real_ct_dir / "edge-cases" / "pylibjpeg-data" / "JPEGLossless_1s_1f_i_16_16_bad.dcm"
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    message = str(caught.value)
    assert "1.2.840.10008.1.2.4.57" in message
    assert message.count("wrap around") == 2
    assert "dicomsdl:" in message
    assert "pydicom:" in message


@pytest.mark.parametrize("kept", [0.5, 0.1])
def test_truncated_file_named_with_both_errors(real_ct_dir, tmp_path, kept):
    source = (real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm").read_bytes()
    path = tmp_path / "20.dcm"
    path.write_bytes(source[: int(len(source) * kept)])
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    message = str(caught.value)
    assert str(path) in message
    assert "dicomsdl:" in message
    assert "pydicom:" in message
    assert "truncated or not a DICOM image" in message
    assert "required pixel tag" not in message


def test_text_file_named_dcm_is_not_dicom(tmp_path):
    path = tmp_path / "999.dcm"
    path.write_text("this is not a DICOM file\n")
    with pytest.raises(DicomReadError) as caught:
        read_slice(path)
    message = str(caught.value)
    assert str(path) in message
    assert "truncated or not a DICOM image" in message
    assert "DICM" in message  # pydicom's reason: no DICOM prefix


@pytest.mark.parametrize("readers", [("dicomsdl",), ("pydicom",), READERS])
def test_non_image_dicom_named_as_such(tmp_path, readers):
    path = tmp_path / "report.dcm"
    dataset = pydicom.Dataset()
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.Modality = "SR"
    dataset.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(DicomReadError, match="not a DICOM image") as caught:
        read_slice(path, readers=readers)
    assert str(path) in str(caught.value)


def test_vr_un_file_falls_back_to_pydicom(real_ct_dir):
    dicom_slice = read_slice(real_ct_dir / "edge-cases" / "pydicom-data" / "explicit_VR-UN.dcm")
    assert dicom_slice.reader == "pydicom"
    assert dicom_slice.warnings[0].startswith("read with pydicom after dicomsdl:")
    assert dicom_slice.pixel_spacing is not None


def test_rle_fragments_match_j2k_lossless(real_ct_dir):
    rle = read_slice(real_ct_dir / "edge-cases" / "fo-dicom" / "D_CLUNIE_CT1_RLE_FRAGS.dcm").hu
    j2k = read_slice(real_ct_dir / "edge-cases" / "cornerstone" / "CT1_J2KR").hu
    assert np.array_equal(rle, j2k)


def test_j2k_pixel_representation_decides_sign(real_ct_dir):
    # PixelRepresentation 1, BitsStored 13, unsigned codestream: the header's sign is right.
    path = real_ct_dir / "edge-cases" / "pydicom" / "J2K_pixelrep_mismatch.dcm"
    for reader in READERS:
        stored = read_stored_values(path, reader)
        assert int(stored.min()) == -2000
        assert int(stored.max()) == 1896
    assert read_slice(path).warnings == []


def test_j2k_signed_codestream_overrides_implausible_header(real_ct_dir):
    # PixelRepresentation 0 with a signed codestream: read unsigned, air would be about +64536 HU.
    folder = real_ct_dir / "edge-cases" / "pylibjpeg-data"
    mismatched = folder / "TOSHIBA_J2K_SIZ1_PixRep0.dcm"
    consistent = folder / "TOSHIBA_J2K_SIZ0_PixRep1.dcm"
    assert int(read_stored_values(mismatched, "dicomsdl").max()) == 65535  # the header-only reading
    for reader in READERS:
        dicom_slice = read_slice(mismatched, readers=(reader,))
        assert np.array_equal(dicom_slice.hu, read_slice(consistent, readers=(reader,)).hu)
        assert "signed 16-bit JPEG 2000 codestream" in dicom_slice.warnings[-1]


def test_bad_sequence_matches_pydicom_data_copy(real_ct_dir):
    from pydicom.data import get_testdata_file

    packaged = get_testdata_file("bad_sequence.dcm")
    if packaged is None:
        pytest.skip("pydicom-data does not ship bad_sequence.dcm")
    shared = read_slice(real_ct_dir / "neck-slice" / "bad_sequence.dcm", readers=("pydicom",))
    assert np.array_equal(read_slice(packaged).hu, shared.hu)


def test_plausibility_flags_a_corrupt_block_of_rows():
    # A block of 32 wrapped rows in a 512 x 512 slice: 6% of the pixel pairs jump, far above the
    # 1% limit, whichever rows the check reads.
    hu = np.full((512, 512), 40.0, dtype=np.float32)
    hu[200:232, ::2] = 30000.0
    reason = check_ct_plausibility(hu)
    assert reason is not None and "wrap around" in reason
    hu[200:232] = 40.0
    assert check_ct_plausibility(hu) is None
