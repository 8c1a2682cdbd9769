"""Reading through a window: the lookup-table path gives the HU path's uint8 on every file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from csfd import dicom_io, hounsfield
from csfd.dicom_readers import PixelEncoding, read_dicomsdl
from csfd.dicom_io import DicomReadError, Window, read_slice
from csfd.hounsfield import check_ct_plausibility, check_word_plausibility, window_tables, window_to_uint8
from dicom_factory import write_ct
from test_dicom_io import LOSSLESS_SYNTAXES, LOSSY_MAE_LIMITS, READABLE_EDGE_CASES, READERS, _syntax_file

# The prepare default (bone), a narrow soft-tissue window, and a wide one that separates padding
# mapped to air (-1000 HU) from padding left at its stored value (-2000 and below).
WINDOWS = [Window(400.0, 1800.0), Window(40.0, 350.0), Window(0.0, 6000.0)]


def _windowed_by_steps(path, readers, window: Window) -> np.ndarray:
    return window_to_uint8(read_slice(path, readers).hu, window.center, window.width)


def _real_files(real_ct_dir):
    files = [real_ct_dir / "transfer-syntaxes" / "CTImage.dcm"]
    files += [_syntax_file(real_ct_dir, name) for name in LOSSLESS_SYNTAXES + sorted(LOSSY_MAE_LIMITS)]
    files += [real_ct_dir / case[0] for case in READABLE_EDGE_CASES]
    return files


@pytest.mark.parametrize("window", WINDOWS, ids=["bone", "soft", "wide"])
@pytest.mark.parametrize("reader", READERS)
def test_real_files_windowed_equal(real_ct_dir, reader, window):
    # Padding, signed and 12-bit data, JPEG 2000 sign handling, MONOCHROME1 and an 8-bit lossy
    # file (which takes the step-by-step path) are all among these files.
    compared = 0
    for path in _real_files(real_ct_dir):
        try:
            expected = _windowed_by_steps(path, (reader,), window)
        except DicomReadError:
            continue  # the VR UN file, which only pydicom reads
        windowed = read_slice(path, (reader,), window)
        assert windowed.pixels.dtype == np.uint8
        assert np.array_equal(windowed.pixels, expected), path.name
        compared += 1
    assert compared >= 34


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "options",
    [
        {"bits_stored": 12, "pixel_representation": 1, "intercept": 0.0},
        {"pixel_representation": 0, "slope": 0.5, "intercept": -1024.5},
        {"intercept": -1024.0, "padding": ("US", 63536)},
        {"intercept": 0.0, "padding": ("SS", -2000), "padding_limit": ("SS", -1500)},
        {"pixel_representation": 0, "photometric": "MONOCHROME1"},
    ],
    ids=["signed-12-bit", "fractional-rescale", "padding-as-US", "padding-range", "monochrome1"],
)
def test_header_variants_windowed_equal(tmp_path, reader, options):
    rng = np.random.default_rng(0)
    stored = rng.integers(-2100, 2100, size=(16, 16))
    if options.get("pixel_representation", 1) == 0:
        stored = np.abs(stored)
    if options.get("bits_stored") == 12:
        stored = np.clip(stored, -2048, 2047) & 0xFFF  # raw 12-bit words, high bits clear
    path = write_ct(tmp_path / "1.dcm", stored, **options)
    for window in WINDOWS:
        expected = _windowed_by_steps(path, (reader,), window)
        assert np.array_equal(read_slice(path, (reader,), window).pixels, expected)


def test_16bit_slice_uses_tables(real_ct_dir, monkeypatch):
    def no_step_by_step(*args):
        raise AssertionError("the step-by-step HU path ran for a plausible 16-bit slice")

    monkeypatch.setattr(dicom_io, "_hu_from_frame", no_step_by_step)
    path = real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm"
    assert read_slice(path, ("dicomsdl",), WINDOWS[0]).pixels.shape == (512, 512)


def test_corrupt_jpeg_rejected_windowed(real_ct_dir):
    path = real_ct_dir / "edge-cases" / "pylibjpeg-data" / "JPEGLossless_1s_1f_i_16_16_bad.dcm"
    with pytest.raises(DicomReadError) as caught:
        read_slice(path, window=WINDOWS[0])
    message = str(caught.value)
    assert path.name in message
    assert message.count("wrap around") == 2


def test_j2k_sign_retry_windowed(real_ct_dir):
    folder = real_ct_dir / "edge-cases" / "pylibjpeg-data"
    mismatched = read_slice(folder / "TOSHIBA_J2K_SIZ1_PixRep0.dcm", window=WINDOWS[0])
    consistent = read_slice(folder / "TOSHIBA_J2K_SIZ0_PixRep1.dcm", window=WINDOWS[0])
    assert np.array_equal(mismatched.pixels, consistent.pixels)
    assert "signed 16-bit JPEG 2000 codestream" in mismatched.warnings[-1]


def test_missing_rescale_windowed(tmp_path):
    path = write_ct(tmp_path / "1.dcm", np.zeros((2, 2)), slope=None)
    with pytest.raises(DicomReadError, match=re.escape(f"{path}: RescaleSlope or RescaleIntercept is missing")):
        read_slice(path, window=WINDOWS[0])


def test_windowed_slice_has_no_hu(real_ct_dir):
    windowed = read_slice(real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm", window=WINDOWS[0])
    with pytest.raises(ValueError, match="read through a window"):
        windowed.hu


def _wrapping_words(rng, shape, share, far_words):
    """Words of 12-bit CT with `share` of them swapped for words from the range `far_words`."""
    words = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    far = rng.random(shape) < share
    words[far] = rng.integers(*far_words, size=int(far.sum()), dtype=np.uint16)
    return words


@pytest.mark.parametrize(
    ("encoding", "can_fail"),
    [
        # Masked to 12 bits, every word lies within 4,096 HU of every other: nothing can fail.
        (PixelEncoding(12, 0, 1.0, -1024.0), False),
        (PixelEncoding(16, 1, 1.0, 0.0, pixel_padding_value=-2000), True),
        (PixelEncoding(16, 0, 2.0, -1024.0), True),
        (PixelEncoding(16, 0, 1.0, -1024.0), True),
    ],
    ids=["12-bit", "signed-padding", "slope-2", "16-bit-unsigned"],
)
def test_word_plausibility_matches_full_check(encoding, can_fail):
    # Slices that pass, that wrap on a few pairs, on many pairs, and that are mostly bright:
    # the range shortcut must return what the full check returns.
    tables = window_tables(encoding, 400.0, 1800.0)
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 4096, size=(64, 64), dtype=np.uint16)]
    # 60000 and up is just below zero when signed; 32768 and up is the most negative when signed.
    for far_words in ((60000, 65536), (32768, 40000)):
        cases += [_wrapping_words(rng, (64, 64), share, far_words) for share in (0.0005, 0.005, 0.2)]
    cases += [rng.integers(9000, 12000, size=(64, 64), dtype=np.uint16)]
    answers = []
    for words in cases:
        expected = check_ct_plausibility(np.take(tables.hu, words))
        assert check_word_plausibility(tables, words) == expected
        answers.append(expected is None)
    assert True in answers
    assert (False in answers) == can_fail


def _forbid_full_check(monkeypatch):
    def full_check(*args, **kwargs):
        raise AssertionError("the full plausibility check ran on a slice whose word range rules out failure")

    monkeypatch.setattr(hounsfield, "check_ct_plausibility", full_check)


def test_word_plausibility_skips_full_check_for_12bit_ct(real_ct_dir, monkeypatch):
    frame = read_dicomsdl(real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm")
    tables = window_tables(frame.encoding, 400.0, 1800.0)
    _forbid_full_check(monkeypatch)
    assert check_word_plausibility(tables, frame.pixels.view(np.uint16)) is None


def test_word_plausibility_skips_full_check_for_signed_air(monkeypatch):
    # Signed CT with air at -1024 and padding at -2000: as uint16 these words sit near 65535,
    # far from bone near 0, but as int16 they are within 5,100 HU of it.
    tables = window_tables(PixelEncoding(16, 1, 1.0, 0.0, pixel_padding_value=-2000), 400.0, 1800.0)
    values = np.random.default_rng(0).integers(-1024, 3072, size=(64, 64)).astype(np.int16)
    values[:4] = -2000
    _forbid_full_check(monkeypatch)
    assert check_word_plausibility(tables, values.view(np.uint16)) is None
