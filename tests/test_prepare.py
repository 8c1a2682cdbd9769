"""Tests of the prepare stage on tiny competition-layout folders written with pydicom."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import csfd
import csfd.prepare
import csfd.prepare_runner
import csfd.prepare_worker
from csfd.cache import StudyCache
from csfd.config import ExperimentConfig
from csfd.constants import DEFECTIVE_STUDIES, VERTEBRAE
from csfd.prepare import (
    REPORT_COLUMNS,
    load_study,
    prepare_split,
    resize_keep_aspect,
    run_prepare,
    window_to_uint8,
)

SIZE = 32
NORMAL = "1.2.826.0.1.3680043.1001"
REVERSED = "1.2.826.0.1.3680043.1002"
NONSQUARE = "1.2.826.0.1.3680043.1003"
BROKEN = "1.2.826.0.1.3680043.1004"
DUPLICATE = "1.2.826.0.1.3680043.1005"
EXCLUDED = DEFECTIVE_STUDIES[0]
TEST_STUDY = "1.2.826.0.1.3680043.2001"
TOP_Z = 100.0
SPACING_MM = 2.0
PIXEL_MM = 0.5
ORIGIN_XY = (-8.0, -8.0)

# Segmentation labels by canonical position index (0 = most superior): 1..7 are C1..C7, 8 is T1.
NORMAL_LABELS = {0: [1], 1: [1, 2], 2: [2], 3: [3], 4: [], 5: [8]}
REVERSED_LABELS = {0: [], 1: [6], 2: [6, 7], 3: [7], 4: [8]}


def hu_for_z(z: float) -> float:
    """Slice HU as a function of height, so the cached order can be read back from pixels."""
    return -300.0 + 50.0 * (z - (TOP_Z - 10 * SPACING_MM))


def write_slice(path: Path, study_uid: str, instance: int, z: float, hu: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [ORIGIN_XY[0], ORIGIN_XY[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    ds.SliceThickness = SPACING_MM
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def slice_z(n: int, reversed_order: bool) -> list[float]:
    """z of slice_number 1..n: falling with slice_number, or rising for a reversed study."""
    if reversed_order:
        return [TOP_Z - SPACING_MM * (n - k) for k in range(1, n + 1)]
    return [TOP_Z - SPACING_MM * (k - 1) for k in range(1, n + 1)]


def write_study(
    images: Path, study_uid: str, n: int, rows: int = SIZE, cols: int = SIZE, reversed_order: bool = False
) -> list[float]:
    folder = images / study_uid
    folder.mkdir(parents=True)
    zs = slice_z(n, reversed_order)
    for number, z in enumerate(zs, start=1):
        hu = np.full((rows, cols), hu_for_z(z), dtype=np.float32)
        hu[: rows // 4, : cols // 4] = 1300.0  # a bright block in the top-left corner
        write_slice(folder / f"{number}.dcm", study_uid, number, z, hu)
    return zs


def write_segmentation(path: Path, n: int, labels_by_position: dict[int, list[int]]) -> None:
    """Write a NIfTI whose affine maps (column, row, slice) voxels to RAS, slices from inferior up."""
    data = np.zeros((SIZE, SIZE, n), dtype=np.uint8)
    for position, labels in labels_by_position.items():
        k = n - 1 - position  # position 0 is the top slice, the last along the NIfTI slice axis
        for offset, label in enumerate(labels):
            data[8 + 8 * offset : 14 + 8 * offset, 10:20, k] = label
    bottom_z = TOP_Z - SPACING_MM * (n - 1)
    affine = np.array(
        [
            [-PIXEL_MM, 0, 0, -ORIGIN_XY[0]],
            [0, -PIXEL_MM, 0, -ORIGIN_XY[1]],
            [0, 0, SPACING_MM, bottom_z],
            [0, 0, 0, 1],
        ]
    )
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("competition")
    train = root / "train_images"
    write_study(train, NORMAL, 6)
    write_study(train, REVERSED, 5, reversed_order=True)
    write_study(train, NONSQUARE, 4, rows=48, cols=32)
    write_study(train, BROKEN, 4)
    (train / BROKEN / "3.dcm").write_bytes(b"this is not a DICOM file")
    write_study(train, EXCLUDED, 3)
    write_study(train, DUPLICATE, 4)
    duplicate = train / DUPLICATE
    zs = slice_z(4, False)
    write_slice(duplicate / "3.dcm", DUPLICATE, 3, zs[1], np.full((SIZE, SIZE), hu_for_z(zs[1]), np.float32))

    segmentations = root / "segmentations"
    segmentations.mkdir()
    write_segmentation(segmentations / f"{NORMAL}.nii", 6, NORMAL_LABELS)
    write_segmentation(segmentations / f"{REVERSED}.nii.gz", 5, REVERSED_LABELS)

    write_study(root / "test_images", TEST_STUDY, 3)
    return root


def make_config(tmp_path: Path, data_dir: Path, **prepare) -> ExperimentConfig:
    base = ExperimentConfig()
    settings = {"image_size": SIZE, "workers": 1, **prepare}
    paths = replace(base.paths, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    return replace(base, paths=paths, prepare=replace(base.prepare, **settings))


def statuses(report: pd.DataFrame) -> dict[str, str]:
    return dict(zip(report["StudyInstanceUID"], report["status"]))


def cached_volume(config: ExperimentConfig, uid: str, split: str = "train") -> np.ndarray:
    return np.load(Path(config.paths.cache_dir) / split / "studies" / f"{uid}.npy")


# --- windowing and resizing ---------------------------------------------------------------


def test_window_maps_edges_and_clips():
    hu = np.array([-2000.0, -500.0, 400.0, 1300.0, 3000.0], dtype=np.float32)
    out = window_to_uint8(hu, center=400.0, width=1800.0)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_window_rejects_zero_width():
    with pytest.raises(ValueError, match="width"):
        window_to_uint8(np.zeros(3), center=0.0, width=0.0)


def test_resize_tall_slice_keeps_aspect():
    image = np.full((716, 512), 200, dtype=np.uint8)
    out = resize_keep_aspect(image, 64)
    content_cols = round(512 * 64 / 716)  # 46
    left = (64 - content_cols) // 2
    assert out.shape == (64, 64)
    assert out.dtype == np.uint8
    assert np.all(out[:, :left] == 0)
    assert np.all(out[:, left + content_cols :] == 0)
    assert np.all(out[:, left : left + content_cols] == 200)
    assert left == 64 - content_cols - left  # centred: equal padding on both sides


def test_resize_wide_slice_pads_rows():
    image = np.full((568, 652), 90, dtype=np.uint8)
    out = resize_keep_aspect(image, 64)
    content_rows = round(568 * 64 / 652)  # 56
    top = (64 - content_rows) // 2
    assert out.shape == (64, 64)
    assert np.all(out[:top] == 0)
    assert np.all(out[top + content_rows :] == 0)
    assert np.all(out[top : top + content_rows] == 90)
    assert top == 4


def test_resize_keeps_image_orientation():
    image = np.zeros((716, 512), dtype=np.uint8)
    image[:100, :100] = 255  # top-left marker
    out = resize_keep_aspect(image, 64)
    left = (64 - round(512 * 64 / 716)) // 2
    assert out[2, left + 2] == 255
    assert out[-3, -left - 3] == 0


def test_resize_interpolation_by_direction():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(768, 768), dtype=np.uint8)
    shrunk = resize_keep_aspect(image, 300)
    area = cv2.resize(image, (300, 300), interpolation=cv2.INTER_AREA)
    linear = cv2.resize(image, (300, 300), interpolation=cv2.INTER_LINEAR)
    assert not np.array_equal(area, linear)  # the two methods differ at this scale
    np.testing.assert_array_equal(shrunk, area)
    small = image[:32, :32].copy()
    enlarged = resize_keep_aspect(small, 64)
    np.testing.assert_array_equal(enlarged, cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR))


def test_resize_same_size_is_identity():
    image = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE).astype(np.uint8)
    np.testing.assert_array_equal(resize_keep_aspect(image, SIZE), image)


def test_resize_real_tall_slice(real_ct_dir):
    from csfd.dicom_io import read_slice

    path = real_ct_dir / "edge-cases" / "pylibjpeg-data" / "MAROTECH_CT_JP2Lossy.dcm"
    if not path.is_file():
        pytest.skip(f"real 716x512 CT slice not found at {path}")
    hu = read_slice(path).hu
    assert hu.shape == (716, 512)
    out = resize_keep_aspect(window_to_uint8(hu, 400.0, 1800.0), 384)
    left = (384 - round(512 * 384 / 716)) // 2
    assert np.all(out[:, :left] == 0)
    assert np.all(out[:, -left:] == 0)
    assert out[:, left:-left].mean() > 0


# --- load_study --------------------------------------------------------------------------


def test_load_study_canonical_order(data_dir):
    prepare = make_config(Path("/unused"), data_dir).prepare
    for uid, n, reversed_order in ((NORMAL, 6, False), (REVERSED, 5, True)):
        study = load_study(data_dir / "train_images" / uid, prepare)
        expected_z = sorted(slice_z(n, reversed_order), reverse=True)
        centre_values = study.volume[:, SIZE // 2, SIZE // 2].astype(int)
        assert study.volume.shape == (n, SIZE, SIZE)
        assert study.volume.dtype == np.uint8
        assert study.reversed is reversed_order
        np.testing.assert_allclose(study.z, expected_z)
        assert np.all(np.diff(centre_values) < 0), centre_values
        expected_numbers = list(range(n, 0, -1)) if reversed_order else list(range(1, n + 1))
        assert study.slice_numbers.tolist() == expected_numbers
        assert study.original_shape == (SIZE, SIZE)


def test_load_study_window_values(data_dir):
    prepare = make_config(Path("/unused"), data_dir).prepare
    study = load_study(data_dir / "train_images" / NORMAL, prepare)
    expected = window_to_uint8(np.array([hu_for_z(TOP_Z)], np.float32), prepare.window_center, prepare.window_width)
    assert study.volume[0, SIZE // 2, SIZE // 2] == expected[0]
    assert study.volume[0, 0, 0] == 255  # the 1300 HU block stays top-left


def test_load_study_nonsquare_padded(data_dir):
    prepare = make_config(Path("/unused"), data_dir).prepare
    study = load_study(data_dir / "train_images" / NONSQUARE, prepare)
    content_cols = round(32 * SIZE / 48)  # 21
    left = (SIZE - content_cols) // 2
    assert study.original_shape == (48, 32)
    assert study.volume.shape == (4, SIZE, SIZE)
    assert np.all(study.volume[:, :, :left] == 0)
    assert np.all(study.volume[:, :, left + content_cols :] == 0)
    assert np.all(study.volume[:, SIZE // 2, left + 2 : left + content_cols - 2] > 0)


# --- prepare_split -----------------------------------------------------------------------


def test_prepare_reports_each_case(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    status = statuses(report)
    assert list(report.columns) == list(REPORT_COLUMNS)
    assert status[NORMAL] == "done"
    assert status[REVERSED] == "done"
    assert status[NONSQUARE] == "done"
    assert status[DUPLICATE] == "done"
    assert status[BROKEN] == "failed"
    assert status[EXCLUDED] == "excluded"

    rows = report.set_index("StudyInstanceUID")
    assert "3.dcm" in rows.at[BROKEN, "error"]
    assert bool(rows.at[DUPLICATE, "irregular"]) is True
    assert rows.at[DUPLICATE, "warnings"] != ""
    assert bool(rows.at[REVERSED, "reversed"]) is True
    assert bool(rows.at[NORMAL, "reversed"]) is False
    assert (rows.at[NONSQUARE, "rows"], rows.at[NONSQUARE, "cols"]) == (48, 32)
    assert rows.at[NORMAL, "n_slices"] == 6
    assert rows.at[NORMAL, "transfer_syntaxes"] == ExplicitVRLittleEndian
    assert rows.at[NORMAL, "reader"] != ""

    on_disk = pd.read_csv(Path(config.paths.cache_dir) / "train" / "report.csv", dtype={"StudyInstanceUID": str})
    assert statuses(on_disk) == status


def test_prepare_cache_files(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    studies = Path(config.paths.cache_dir) / "train" / "studies"
    for uid, n in ((NORMAL, 6), (REVERSED, 5), (NONSQUARE, 4), (DUPLICATE, 4)):
        volume = cached_volume(config, uid)
        record = json.loads((studies / f"{uid}.json").read_text())
        assert volume.shape == (n, SIZE, SIZE)
        assert volume.dtype == np.uint8
        assert record["shape"] == [n, SIZE, SIZE]
        assert np.all(np.diff(volume[:, SIZE // 2, SIZE // 2].astype(int)) <= 0)
    for uid in (BROKEN, EXCLUDED):
        assert not (studies / f"{uid}.npy").exists()
        assert not (studies / f"{uid}.json").exists()


def test_prepare_slices_csv(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    slices = pd.read_csv(Path(config.paths.cache_dir) / "train" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert list(slices.columns) == ["StudyInstanceUID", "slice_number", "position_index", "z"]
    assert sorted(slices["StudyInstanceUID"].unique()) == sorted([NORMAL, REVERSED, NONSQUARE, DUPLICATE])
    assert len(slices) == 6 + 5 + 4 + 4

    normal = slices[slices["StudyInstanceUID"] == NORMAL]
    assert normal["position_index"].tolist() == list(range(6))
    assert normal["slice_number"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(normal["z"], sorted(slice_z(6, False), reverse=True))

    reversed_study = slices[slices["StudyInstanceUID"] == REVERSED]
    assert reversed_study["slice_number"].tolist() == [5, 4, 3, 2, 1]
    np.testing.assert_allclose(reversed_study["z"], sorted(slice_z(5, True), reverse=True))


def test_prepare_vertebra_labels(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    labels_csv = Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv"
    labels = pd.read_csv(labels_csv, dtype={"StudyInstanceUID": str})
    assert list(labels.columns) == ["StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE]
    assert sorted(labels["StudyInstanceUID"].unique()) == sorted([NORMAL, REVERSED])

    for uid, expected_labels, n in ((NORMAL, NORMAL_LABELS, 6), (REVERSED, REVERSED_LABELS, 5)):
        study = labels[labels["StudyInstanceUID"] == uid].sort_values("position_index")
        assert study["position_index"].tolist() == list(range(n))
        for position, present in expected_labels.items():
            row = study.iloc[position]
            visible = [v for v in VERTEBRAE if row[v] == 1]
            expected = [VERTEBRAE[label - 1] for label in present if label <= 7]
            assert visible == expected, (uid, position)

    reversed_rows = labels[labels["StudyInstanceUID"] == REVERSED].sort_values("position_index")
    assert reversed_rows["slice_number"].tolist() == [5, 4, 3, 2, 1]


def test_prepare_resume_skips_done(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    npy = Path(config.paths.cache_dir) / "train" / "studies" / f"{NORMAL}.npy"
    mtime = npy.stat().st_mtime_ns

    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    status = statuses(report)
    for uid in (NORMAL, REVERSED, NONSQUARE, DUPLICATE):
        assert status[uid] == "skipped", uid
    assert status[BROKEN] == "failed"
    assert status[EXCLUDED] == "excluded"
    assert npy.stat().st_mtime_ns == mtime
    slices = pd.read_csv(Path(config.paths.cache_dir) / "train" / "slices.csv")
    assert len(slices) == 19
    labels = pd.read_csv(Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv")
    assert len(labels) == 11


def test_prepare_redoes_missing_json(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    studies = Path(config.paths.cache_dir) / "train" / "studies"
    (studies / f"{REVERSED}.json").unlink()

    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    assert statuses(report)[REVERSED] == "done"
    assert statuses(report)[NORMAL] == "skipped"
    assert (studies / f"{REVERSED}.json").is_file()


def test_prepare_ignores_leftover_tmp(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    studies = Path(config.paths.cache_dir) / "train" / "studies"
    # A run killed while saving: the volume exists only as a temporary file, no JSON yet.
    npy = studies / f"{NONSQUARE}.npy"
    leftover = studies / f".{NONSQUARE}.npy.abc123.tmp"
    npy.rename(leftover)
    (studies / f"{NONSQUARE}.json").unlink()

    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    assert statuses(report)[NONSQUARE] == "done"
    assert npy.is_file()
    assert not leftover.exists()


def test_prepare_redoes_wrong_shape(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    npy = Path(config.paths.cache_dir) / "train" / "studies" / f"{NORMAL}.npy"
    np.save(npy, np.zeros((2, SIZE, SIZE), np.uint8))  # truncated volume; the JSON records 6 slices

    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    assert statuses(report)[NORMAL] == "done"
    assert cached_volume(config, NORMAL).shape == (6, SIZE, SIZE)


def test_prepare_redoes_other_image_size(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    larger = make_config(tmp_path, data_dir, image_size=48)

    report = prepare_split(data_dir, larger.paths.cache_dir, "train", larger, study_uids=[NORMAL])
    assert statuses(report)[NORMAL] == "done"
    assert cached_volume(larger, NORMAL).shape == (6, 48, 48)


def test_prepare_subset_keeps_cached_studies(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[NORMAL])
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[REVERSED])
    status = statuses(report)
    assert status == {NORMAL: "skipped", REVERSED: "done"}
    slices = pd.read_csv(Path(config.paths.cache_dir) / "train" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert sorted(slices["StudyInstanceUID"].unique()) == [NORMAL, REVERSED]


def test_prepare_warns_of_studies_from_elsewhere(tmp_path, data_dir, caplog):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[NORMAL, REVERSED])
    other = tmp_path / "other-data"
    shutil.copytree(data_dir / "train_images" / NORMAL, other / "train_images" / NORMAL)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="csfd.prepare"):
        report = prepare_split(other, config.paths.cache_dir, "train", config)
    assert statuses(report) == {NORMAL: "skipped", REVERSED: "skipped"}
    assert f"1 cached studies in {Path(config.paths.cache_dir) / 'train' / 'studies'} are not in {other / 'train_images'}" in caplog.text
    assert REVERSED in caplog.text


def test_prepare_stale_record_not_kept(tmp_path, data_dir, monkeypatch):
    # A run with another window killed after its .npy and before its JSON must not leave the
    # old JSON next to the new volume, where the next run would take it as done.
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[NORMAL])
    expected = cached_volume(config, NORMAL)
    other = replace(config, prepare=replace(config.prepare, window_center=40.0, window_width=80.0))

    def killed(path, text):
        raise KeyboardInterrupt("killed before the JSON")

    monkeypatch.setattr(csfd.prepare_worker, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_split(data_dir, other.paths.cache_dir, "train", other, study_uids=[NORMAL])
    monkeypatch.undo()
    assert not np.array_equal(cached_volume(config, NORMAL), expected)
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[NORMAL])
    assert statuses(report) == {NORMAL: "done"}
    np.testing.assert_array_equal(cached_volume(config, NORMAL), expected)


def test_prepare_names_missing_data_folder(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match=f"data folder {missing} does not exist") as caught:
        prepare_split(missing, config.paths.cache_dir, "train", config)
    assert "--data" in str(caught.value)
    empty = tmp_path / "empty-data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty / 'train_images'} not found"):
        prepare_split(empty, config.paths.cache_dir, "train", config)


def test_prepare_unknown_study_fails(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    missing = "1.2.826.0.1.3680043.9999"
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config, study_uids=[missing])
    assert statuses(report) == {missing: "failed"}
    assert "not found" in report["error"].iloc[0]


def test_prepare_two_workers_match_one(tmp_path, data_dir):
    single = make_config(tmp_path / "one", data_dir, workers=1)
    parallel = make_config(tmp_path / "two", data_dir, workers=2)
    report_single = prepare_split(data_dir, single.paths.cache_dir, "train", single)
    report_parallel = prepare_split(data_dir, parallel.paths.cache_dir, "train", parallel)
    assert statuses(report_single) == statuses(report_parallel)
    for uid in (NORMAL, REVERSED, NONSQUARE, DUPLICATE):
        np.testing.assert_array_equal(cached_volume(single, uid), cached_volume(parallel, uid))
    for name in ("slices.csv", "vertebra_labels.csv"):
        first = pd.read_csv(Path(single.paths.cache_dir) / "train" / name)
        second = pd.read_csv(Path(parallel.paths.cache_dir) / "train" / name)
        pd.testing.assert_frame_equal(first, second)


def test_prepare_in_process_uses_worker_count_threads(tmp_path, data_dir, monkeypatch):
    # prepare.workers bounds the cores in the parent process too: one worker, one OpenCV thread.
    seen = []
    real_prepare_study = csfd.prepare.prepare_study

    def recording_prepare_study(task):
        seen.append(cv2.getNumThreads())
        return real_prepare_study(task)

    monkeypatch.setattr(csfd.prepare_runner, "prepare_study", recording_prepare_study)
    before = cv2.getNumThreads()
    config = make_config(tmp_path, data_dir, workers=1)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    assert seen and set(seen) == {1}
    assert cv2.getNumThreads() == before


def test_prepare_worker_imports_no_pandas():
    # Each spawned worker imports csfd.prepare_worker before its first study; pandas would add
    # about 0.2 s to that for every worker of every run.
    code = "import sys, csfd.prepare_worker; print(sorted({'pandas', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(csfd.__file__).parents[1])})
    assert result.stdout.strip() == "[]"


def test_prepare_worker_logs_with_format():
    code = (
        "import logging; from csfd.prepare_worker import init_worker; init_worker(logging.INFO); "
        "logging.getLogger('csfd.series').warning('uneven slice spacing'); "
        "logging.getLogger('csfd.series').debug('hidden')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(csfd.__file__).parents[1])})
    assert "WARNING csfd.series: uneven slice spacing" in result.stderr
    assert "hidden" not in result.stderr


def test_prepare_custom_exclusion(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir, exclude_studies=(NORMAL,))
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    status = statuses(report)
    assert status[NORMAL] == "excluded"
    assert status[EXCLUDED] == "done"  # no longer on the list
    slices = pd.read_csv(Path(config.paths.cache_dir) / "train" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert NORMAL not in set(slices["StudyInstanceUID"])


def test_default_exclusion_list():
    assert ExperimentConfig().prepare.exclude_studies == (
        "1.2.826.0.1.3680043.20574",
        "1.2.826.0.1.3680043.29952",
    )


def test_prepare_drops_irregular(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir, irregular_series="drop")
    report = prepare_split(data_dir, config.paths.cache_dir, "train", config)
    status = statuses(report)
    assert status[DUPLICATE] == "dropped"
    assert status[NORMAL] == "done"
    assert not (Path(config.paths.cache_dir) / "train" / "studies" / f"{DUPLICATE}.npy").exists()
    slices = pd.read_csv(Path(config.paths.cache_dir) / "train" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert DUPLICATE not in set(slices["StudyInstanceUID"])


def test_prepare_drop_applies_to_cached(tmp_path, data_dir):
    keep = make_config(tmp_path, data_dir, irregular_series="keep")
    prepare_split(data_dir, keep.paths.cache_dir, "train", keep)
    drop = make_config(tmp_path, data_dir, irregular_series="drop")
    report = prepare_split(data_dir, drop.paths.cache_dir, "train", drop)
    assert statuses(report)[DUPLICATE] == "dropped"
    slices = pd.read_csv(Path(drop.paths.cache_dir) / "train" / "slices.csv", dtype={"StudyInstanceUID": str})
    assert DUPLICATE not in set(slices["StudyInstanceUID"])


def test_prepare_bad_segmentation_keeps_volume(tmp_path):
    data = tmp_path / "data"
    write_study(data / "train_images", NORMAL, 6)
    (data / "segmentations").mkdir()
    write_segmentation(data / "segmentations" / f"{NORMAL}.nii", 2, {0: [1]})  # covers 2 of 6 slices
    config = make_config(tmp_path, data)

    report = prepare_split(data, config.paths.cache_dir, "train", config)
    row = report.set_index("StudyInstanceUID").loc[NORMAL]
    assert row["status"] == "done"
    assert "segmentation" in row["error"]
    assert cached_volume(config, NORMAL).shape == (6, SIZE, SIZE)
    labels = pd.read_csv(Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv")
    assert labels.empty

    # Without vertebra labels the study is not complete, so the next run tries the segmentation again.
    report = prepare_split(data, config.paths.cache_dir, "train", config)
    assert statuses(report)[NORMAL] == "done"


def test_prepare_segmentation_added_later(tmp_path):
    data = tmp_path / "data"
    write_study(data / "train_images", NORMAL, 6)
    config = make_config(tmp_path, data)
    prepare_split(data, config.paths.cache_dir, "train", config)

    (data / "segmentations").mkdir()
    write_segmentation(data / "segmentations" / f"{NORMAL}.nii", 6, NORMAL_LABELS)
    report = prepare_split(data, config.paths.cache_dir, "train", config)
    assert statuses(report)[NORMAL] == "done"
    labels = pd.read_csv(Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv")
    assert len(labels) == 6
    assert labels["C1"].tolist() == [1, 1, 0, 0, 0, 0]


def test_prepare_empty_split(tmp_path):
    data = tmp_path / "data"
    (data / "test_images").mkdir(parents=True)
    config = make_config(tmp_path, data)
    report = prepare_split(data, config.paths.cache_dir, "test", config)
    assert report.empty
    assert list(report.columns) == list(REPORT_COLUMNS)
    slices = pd.read_csv(Path(config.paths.cache_dir) / "test" / "slices.csv")
    assert list(slices.columns) == ["StudyInstanceUID", "slice_number", "position_index", "z"]
    assert slices.empty


def test_prepare_missing_images_folder(tmp_path):
    config = make_config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train_images") as error:
        prepare_split(tmp_path / "nowhere", config.paths.cache_dir, "train", config)
    assert "segmentations" in str(error.value)


def test_prepare_rejects_unknown_split(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    with pytest.raises(ValueError, match="valid"):
        prepare_split(data_dir, config.paths.cache_dir, "valid", config)


def test_run_prepare_both_splits(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    reports = run_prepare(config)
    assert set(reports) == {"train", "test"}
    assert statuses(reports["test"]) == {TEST_STUDY: "done"}
    assert cached_volume(config, TEST_STUDY, "test").shape == (3, SIZE, SIZE)
    assert not (Path(config.paths.cache_dir) / "test" / "vertebra_labels.csv").exists()


# --- StudyCache --------------------------------------------------------------------------


def test_study_cache_reads_volumes(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    reader = StudyCache(config.paths.cache_dir, "train")
    assert sorted(reader.study_uids) == sorted([NORMAL, REVERSED, NONSQUARE, DUPLICATE])
    assert len(reader.slices) == 19
    volume = reader.volume(NORMAL)
    assert isinstance(volume, np.memmap)
    assert not volume.flags.writeable
    np.testing.assert_array_equal(volume, load_study(data_dir / "train_images" / NORMAL, config.prepare).volume)
    assert reader.volume(NORMAL) is volume  # the open map is reused
    assert len(reader.vertebra_labels()) == 11


def test_study_cache_pickles_small(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    reader = StudyCache(config.paths.cache_dir, "train")
    reader.volume(NORMAL)
    _ = reader.slices

    copy = pickle.loads(pickle.dumps(reader))
    assert copy._volumes == {}
    assert copy._slices is None
    assert len(pickle.dumps(reader)) < 2000
    np.testing.assert_array_equal(copy.volume(NORMAL), reader.volume(NORMAL))


def test_study_cache_bounds_open_maps(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    reader = StudyCache(config.paths.cache_dir, "train", max_open=2)
    for uid in (NORMAL, REVERSED, NONSQUARE):
        reader.volume(uid)
    assert list(reader._volumes) == [REVERSED, NONSQUARE]


def test_study_cache_missing_study(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "train", config)
    reader = StudyCache(config.paths.cache_dir, "train")
    with pytest.raises(FileNotFoundError, match=BROKEN):
        reader.volume(BROKEN)


def test_study_cache_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="slices.csv"):
        StudyCache(tmp_path / "cache", "train")


def test_study_cache_no_vertebra_labels(tmp_path, data_dir):
    config = make_config(tmp_path, data_dir)
    prepare_split(data_dir, config.paths.cache_dir, "test", config)
    labels = StudyCache(config.paths.cache_dir, "test").vertebra_labels()
    assert labels.empty
    assert list(labels.columns) == ["StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE]


# --- real CT series ----------------------------------------------------------------------

REAL_HEAD = "1.2.826.0.1.3680043.3001"
REAL_ABDOMEN = "1.2.826.0.1.3680043.3002"


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory, real_ct_dir) -> Path:
    """A competition layout whose study folders link to real CT series (nothing is copied)."""
    head = real_ct_dir / "head-series-ge"
    abdomen = real_ct_dir / "totalsegmentator" / "example_ct_dicom"
    segmentation = real_ct_dir / "totalsegmentator" / "example_seg_dicom.nii.gz"
    for path in (head, abdomen, segmentation):
        if not path.exists():
            pytest.skip(f"real CT data not found at {path}")
    root = tmp_path_factory.mktemp("real")
    (root / "train_images").mkdir()
    (root / "segmentations").mkdir()
    (root / "train_images" / REAL_HEAD).symlink_to(head, target_is_directory=True)
    (root / "train_images" / REAL_ABDOMEN).symlink_to(abdomen, target_is_directory=True)
    (root / "segmentations" / f"{REAL_ABDOMEN}.nii.gz").symlink_to(segmentation)
    return root


def test_real_series_prepared(tmp_path, real_data_dir):
    config = make_config(tmp_path, real_data_dir, image_size=64)
    report = prepare_split(real_data_dir, config.paths.cache_dir, "train", config)
    rows = report.set_index("StudyInstanceUID")
    assert statuses(report) == {REAL_HEAD: "done", REAL_ABDOMEN: "done"}
    assert rows.at[REAL_HEAD, "n_slices"] == 28
    assert bool(rows.at[REAL_HEAD, "irregular"]) is True  # gantry tilt and uneven spacing
    assert rows.at[REAL_ABDOMEN, "n_slices"] == 20
    assert (rows.at[REAL_ABDOMEN, "rows"], rows.at[REAL_ABDOMEN, "cols"]) == (512, 512)
    assert rows.at[REAL_ABDOMEN, "error"] == ""
    volume = cached_volume(config, REAL_HEAD)
    assert volume.shape == (28, 64, 64)
    assert volume.max() == 255  # bone reaches the top of the window


def test_real_irregular_series_dropped(tmp_path, real_data_dir):
    config = make_config(tmp_path, real_data_dir, image_size=64, irregular_series="drop")
    report = prepare_split(real_data_dir, config.paths.cache_dir, "train", config, study_uids=[REAL_HEAD])
    assert statuses(report) == {REAL_HEAD: "dropped"}


def test_real_segmentation_matches_native_grid(tmp_path, real_data_dir):
    from csfd.segmentation import load_segmentation_aligned, vertebra_visibility
    from csfd.series import load_series

    config = make_config(tmp_path, real_data_dir, image_size=64)
    prepare_split(real_data_dir, config.paths.cache_dir, "train", config, study_uids=[REAL_ABDOMEN])
    labels_csv = Path(config.paths.cache_dir) / "train" / "vertebra_labels.csv"
    labels = pd.read_csv(labels_csv, dtype={"StudyInstanceUID": str})

    # The same segmentation aligned on the full-size HU series, with no resizing transform.
    native = load_series(real_data_dir / "train_images" / REAL_ABDOMEN)
    segmentation = real_data_dir / "segmentations" / f"{REAL_ABDOMEN}.nii.gz"
    expected = vertebra_visibility(load_segmentation_aligned(segmentation, native))
    assert len(labels) == 20
    assert labels["slice_number"].tolist() == native.slice_numbers.tolist()
    np.testing.assert_array_equal(labels[list(VERTEBRAE)].to_numpy(), expected)
    assert expected.sum() > 0  # the file has labels 1, 5, 6 and 7, so the check is not all zeros


def test_worker_starts_without_pydicom_or_nibabel():
    # Each spawned worker imports csfd.prepare_worker. pydicom (about 0.15 s) and nibabel
    # (0.07 s) load only when a file needs the fallback reader or a study has a segmentation.
    code = "import sys, csfd.prepare_worker; print(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    loaded = set(result.stdout.split())
    assert "csfd.prepare_worker" in loaded
    assert "dicomsdl" in loaded
    assert not {"pydicom", "nibabel", "pandas", "torch"} & loaded
