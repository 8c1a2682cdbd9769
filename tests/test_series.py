"""Series assembly: canonical order by position, volume checks and their warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from csfd.dicom_io import DicomReadError
from csfd.series import load_series
from dicom_factory import hu_to_words, write_ct


def write_series(
    folder: Path,
    z_by_name: dict[str, float],
    *,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    shape=(4, 3),
    step_xy=(0.0, 0.0),
) -> Path:
    """Write one slice per file name. Every pixel of a slice contains round(z) HU to identify it.

    `step_xy` shifts x and y by that much per mm of z, to imitate a gantry tilt.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, z in z_by_name.items():
        position = (10.0 + step_xy[0] * z, 20.0 + step_xy[1] * z, z)
        write_ct(folder / name, hu_to_words(np.full(shape, round(z))), position=position, orientation=orientation)
    return folder


def test_orders_by_position_not_file_name(tmp_path):
    # Text order would be 1, 10, 2 and numeric order 1, 2, 10, but the positions give 2, 10, 1.
    study = write_series(tmp_path / "study", {"1.dcm": -30.0, "10.dcm": 0.0, "2.dcm": 30.0})
    series = load_series(study)
    assert series.slice_numbers.tolist() == [2, 10, 1]
    assert series.z.tolist() == [30.0, 0.0, -30.0]
    assert series.pixels[:, 0, 0].tolist() == [30.0, 0.0, -30.0]
    assert series.positions[:, 2].tolist() == [30.0, 0.0, -30.0]
    assert series.slice_numbers.dtype == np.int64


def test_clean_series_has_no_warnings(tmp_path):
    study = write_series(tmp_path / "study", {f"{i}.dcm": 100.0 - 2.5 * i for i in range(1, 7)})
    series = load_series(study)
    assert series.warnings == []
    assert series.irregular is False
    assert series.reversed is False
    assert series.slice_spacing == pytest.approx(2.5)
    assert series.pixel_spacing == (1.0, 1.0)
    assert series.slice_numbers.tolist() == [1, 2, 3, 4, 5, 6]
    assert series.readers == ["dicomsdl"] * 6
    assert series.transfer_syntaxes == ["1.2.840.10008.1.2.1"] * 6


def test_reversed_when_slice_number_rises_with_z(tmp_path):
    study = write_series(tmp_path / "study", {f"{i}.dcm": 2.5 * i for i in range(1, 6)})
    series = load_series(study)
    assert series.reversed is True
    assert series.slice_numbers.tolist() == [5, 4, 3, 2, 1]
    assert series.z[0] == pytest.approx(12.5)
    assert series.irregular is False


def test_downward_normal_still_puts_head_first(tmp_path):
    # Column cosines (0, -1, 0) make cross(row, column) point to the feet, so the normal is turned.
    study = write_series(
        tmp_path / "study", {"1.dcm": 5.0, "2.dcm": 10.0, "3.dcm": 0.0}, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    )
    series = load_series(study)
    assert series.slice_numbers.tolist() == [2, 1, 3]
    assert series.z.tolist() == [10.0, 5.0, 0.0]


def test_transform_applied_to_each_slice(tmp_path):
    study = write_series(tmp_path / "study", {"1.dcm": 40.0, "2.dcm": -40.0}, shape=(4, 6))
    seen_dtypes = []

    def to_mask(hu: np.ndarray) -> np.ndarray:
        seen_dtypes.append(hu.dtype)
        return (hu[::2, ::2] > 0).astype(np.uint8)

    series = load_series(study, transform=to_mask)
    assert seen_dtypes == [np.float32, np.float32]
    assert series.pixels.dtype == np.uint8
    assert series.pixels.shape == (2, 2, 3)
    assert series.pixels[:, 0, 0].tolist() == [1, 0]
    assert series.image_shape == (4, 6)


def test_slice_size_mismatch_names_study(tmp_path):
    study = write_series(tmp_path / "study-a", {"1.dcm": 0.0}, shape=(4, 3))
    write_series(study, {"2.dcm": 5.0}, shape=(5, 3))
    with pytest.raises(DicomReadError, match=r"study study-a: slices differ in size: .*\(4, 3\).*\(5, 3\)"):
        load_series(study)


def test_single_slice_without_position(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    write_ct(study / "7.dcm", hu_to_words(np.zeros((2, 2))), position=None, orientation=None)
    series = load_series(study)
    assert series.z.tolist() == [0.0]
    assert series.slice_numbers.tolist() == [7]
    assert np.all(np.isnan(series.positions))
    assert series.irregular is False
    assert any("ImagePositionPatient is missing" in message for message in series.warnings)


def test_several_slices_without_position_raise(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    for number in (1, 2):
        write_ct(study / f"{number}.dcm", hu_to_words(np.zeros((2, 2))), position=None)
    with pytest.raises(DicomReadError, match="2 of 2 slices .* have no ImagePositionPatient"):
        load_series(study)


def test_instance_number_used_when_names_not_numbers(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    for instance, z in ((3, 0.0), (4, -1.0)):
        write_ct(study / f"IM-{instance}.dcm", hu_to_words(np.zeros((2, 2))), position=(0, 0, z), instance_number=instance)
    series = load_series(study)
    assert series.slice_numbers.tolist() == [3, 4]
    assert "slice numbers taken from InstanceNumber" in series.warnings[0]
    assert series.irregular is False


def test_missing_slice_detected(tmp_path):
    study = write_series(tmp_path / "study", {"1.dcm": 10.0, "2.dcm": 9.0, "3.dcm": 8.0, "5.dcm": 6.0})
    series = load_series(study)
    assert series.irregular is True
    assert any(message.startswith("missing slices: 1 step(s)") for message in series.warnings)


def test_uneven_spacing_detected(tmp_path):
    study = write_series(tmp_path / "study", {"1.dcm": 10.0, "2.dcm": 9.0, "3.dcm": 8.0, "4.dcm": 6.5})
    series = load_series(study)
    assert series.irregular is True
    assert series.warnings == ["uneven slice spacing: steps from 1.000 to 1.500 mm (median 1.000 mm)"]


def test_synthetic_tilt_detected(tmp_path):
    # y advances 0.25 mm per mm of z: atan(0.25) = 14.0 degrees off the axial normal.
    study = write_series(tmp_path / "study", {f"{i}.dcm": -2.0 * i for i in range(1, 5)}, step_xy=(0.0, 0.25))
    series = load_series(study)
    assert series.irregular is True
    assert any("gantry tilt" in message and "14.0 degrees" in message for message in series.warnings)


def test_slice_numbers_out_of_step_detected(tmp_path):
    study = write_series(tmp_path / "study", {"1.dcm": 3.0, "3.dcm": 2.0, "2.dcm": 1.0, "4.dcm": 0.0})
    series = load_series(study)
    assert series.irregular is True
    assert "slice numbers do not rise or fall steadily along the slice positions" in series.warnings


def test_empty_folder_raises(tmp_path):
    with pytest.raises(DicomReadError, match="contains no DICOM files"):
        load_series(tmp_path)


# --- real series ------------------------------------------------------------------------------


def test_head_series_ordered_by_position(real_ct_dir):
    folder = real_ct_dir / "head-series-ge"
    series = load_series(folder)
    assert series.pixels.shape == (28, 512, 512)
    assert np.all(np.diff(series.z) < 0)
    # File 28 has the highest ImagePositionPatient z, so it is the most superior slice.
    assert series.slice_numbers[0] == 28
    assert series.slice_numbers[-1] == 1
    assert series.reversed is True
    assert series.irregular is True
    assert any("gantry tilt" in message and "18.5 degrees" in message for message in series.warnings)
    assert any(message.startswith("uneven slice spacing") for message in series.warnings)
    assert not any(message.startswith("missing slices") for message in series.warnings)


def test_head_series_padding_becomes_air(real_ct_dir):
    series = load_series(real_ct_dir / "head-series-ge")
    assert float(series.pixels.min()) >= -1024.0
    assert not np.any(series.pixels == -1500.0)
    # The pixels stored as the padding value -1500 in the first file are air now.
    stored = pydicom.dcmread(real_ct_dir / "head-series-ge" / "01.dcm").pixel_array
    padded = stored == -1500
    assert padded.sum() > 1000
    slice_01 = series.pixels[series.slice_numbers.tolist().index(1)]
    assert np.all(slice_01[padded] == -1000.0)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("notavolume/001", "3 duplicate slice positions"),
        ("sliceincrement/001", "missing slices: 1 step(s)"),
        ("sliceincrement/002", "missing slices: 1 step(s)"),
        ("gantrytilting/001", "gantry tilt: the slice positions advance 14.0 degrees"),
    ],
)
def test_irregular_real_series_detected(real_ct_dir, folder, expected):
    series = load_series(real_ct_dir / "series-assembly" / folder)
    assert series.irregular is True
    assert any(message.startswith(expected) for message in series.warnings)


def test_real_series_without_dcm_suffix(real_ct_dir):
    series = load_series(real_ct_dir / "totalsegmentator" / "example_ct_dicom")
    assert series.pixels.shape == (20, 512, 512)
    assert series.irregular is False
    assert series.slice_spacing == pytest.approx(2.0)
    assert series.z[0] == pytest.approx(-766.5)
    assert series.z[-1] == pytest.approx(-804.5)
    assert series.reversed is False
    assert set(series.transfer_syntaxes) == {"1.2.840.10008.1.2.4.90"}
