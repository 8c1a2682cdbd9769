"""Tests of the synthetic sample dataset: layout, labels, DICOM storage, segmentations."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from csfd import sample
from csfd.constants import DEFECTIVE_STUDIES, PREVALENCE, TARGETS, VERTEBRAE
from csfd.sample_phantom import LEVEL_LABELS, render_slice, render_volume

N_TRAIN, N_TEST, IMAGE_SIZE, SEED = 12, 2, 64, 5
REAL_CT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"
UID_PATTERN = re.compile(r"^1\.2\.826\.0\.1\.3680043\.(\d+)$")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    summary = sample.build_sample(
        out, n_train=N_TRAIN, n_test=N_TEST, image_size=IMAGE_SIZE, seed=SEED, workers=1
    )
    assert summary["train_studies"] == N_TRAIN
    return out


@pytest.fixture(scope="module")
def plans() -> dict[str, sample.StudyPlan]:
    return {plan.uid: plan for plan in sample.plan_sample(N_TRAIN, N_TEST, IMAGE_SIZE, SEED)}


def _read_study(study_dir: Path) -> dict[int, pydicom.Dataset]:
    return {int(path.stem): pydicom.dcmread(path) for path in study_dir.glob("*.dcm")}


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return apply_rescale(ds.pixel_array, ds)


def test_layout_entries(sample_dir):
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == sorted(
        [
            "train.csv",
            "train_bounding_boxes.csv",
            "test.csv",
            "sample_submission.csv",
            "train_images",
            "test_images",
            "segmentations",
        ]
    )
    assert not list(sample_dir.parent.glob(".sample.*")), "the staging folder was left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert sample_dir.stat().st_mode & 0o777 == 0o777 & ~umask, "the folder kept mkdtemp's 0700 mode"


def test_train_csv_labels(sample_dir):
    train = pd.read_csv(sample_dir / "train.csv")
    assert list(train.columns) == ["StudyInstanceUID", *TARGETS]
    assert len(train) == N_TRAIN
    assert train["StudyInstanceUID"].is_unique
    assert (train["patient_overall"] == train[list(VERTEBRAE)].max(axis=1)).all()
    assert set(np.unique(train[list(TARGETS)].to_numpy())) <= {0, 1}
    assert train["patient_overall"].sum() >= 1
    assert (train["patient_overall"] == 0).sum() >= 1


def test_study_uids(sample_dir):
    train = pd.read_csv(sample_dir / "train.csv")
    test = pd.read_csv(sample_dir / "test.csv")
    folders = sorted(p.name for p in (sample_dir / "train_images").iterdir())
    assert folders == sorted(train["StudyInstanceUID"])
    numbers = []
    for uid in list(train["StudyInstanceUID"]) + list(test["StudyInstanceUID"].unique()):
        match = UID_PATTERN.match(uid)
        assert match, uid
        assert uid not in DEFECTIVE_STUDIES
        numbers.append(int(match.group(1)))
    assert len(numbers) == len(set(numbers))
    for uid in train["StudyInstanceUID"]:
        assert int(uid.rsplit(".", 1)[1]) in sample.TRAIN_NUMBERS
    for uid in test["StudyInstanceUID"].unique():
        assert int(uid.rsplit(".", 1)[1]) in sample.TEST_NUMBERS


def test_test_csv_and_submission(sample_dir):
    test = pd.read_csv(sample_dir / "test.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    assert len(uids) == N_TEST + 1
    targets = (*VERTEBRAE, "patient_overall")
    expected = [f"{uid}_{target}" for uid in uids for target in targets]
    assert list(test["row_id"]) == expected
    assert list(test["prediction_type"]) == list(targets) * len(uids)

    folders = {p.name for p in (sample_dir / "test_images").iterdir()}
    missing = [uid for uid in uids if uid not in folders]
    assert len(missing) == 1
    assert len(folders) == N_TEST

    submission = pd.read_csv(sample_dir / "sample_submission.csv")
    assert list(submission.columns) == ["row_id", "fractured"]
    assert list(submission["row_id"]) == expected
    assert (submission["fractured"] == 0.5).all()


def test_slice_files_numbered_from_one(sample_dir):
    for split in ("train_images", "test_images"):
        for study_dir in (sample_dir / split).iterdir():
            numbers = sorted(int(p.stem) for p in study_dir.glob("*.dcm"))
            assert numbers == list(range(1, len(numbers) + 1)), study_dir
            assert 30 <= len(numbers) <= 70, study_dir


def test_dicom_round_trip_every_variant(sample_dir, plans):
    """Every slice decodes to the rendered HU; every storage variant appears."""
    variants = set()
    for uid, plan in plans.items():
        files = _read_study(sample_dir / f"{plan.split}_images" / uid)
        assert len(files) == plan.n_slices
        for position in range(plan.n_slices):
            ds = files[plan.slice_number(position)]
            rendered = render_slice(plan.phantom, position).hu.astype(np.float64)
            decoded = _hu(ds)
            slope = float(ds.RescaleSlope)
            if slope > 1:
                # A slope of 2 stores HU / 2, so odd HU move to a neighbouring even value.
                assert np.abs(decoded - rendered).max() <= 1, (uid, position)
                assert (decoded % 2 == 0).all()
            else:
                assert np.array_equal(decoded, rendered), (uid, position, ds.file_meta.TransferSyntaxUID)
            assert ds.BitsStored in (12, 16)
            if ds.PixelRepresentation == 0:
                assert ds.pixel_array.min() >= 0
                assert ds.pixel_array.max() < 2**ds.BitsStored
            else:
                assert ds.pixel_array.min() >= -(2 ** (ds.BitsStored - 1))
                assert ds.pixel_array.max() < 2 ** (ds.BitsStored - 1)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        variants.add((syntax, ds.PixelRepresentation, ds.BitsStored, float(ds.RescaleSlope)))

    syntaxes = {v[0] for v in variants}
    assert syntaxes == {ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless}
    assert {v[1] for v in variants} == {0, 1}
    assert {v[2] for v in variants} == {12, 16}
    assert {0.5, 2.0} <= {v[3] for v in variants}
    for representation, intercept in ((0, -1024.0), (1, 0.0)):
        study = next(p for p in plans.values() if p.storage.pixel_representation == representation)
        ds = pydicom.dcmread(next((sample_dir / f"{study.split}_images" / study.uid).glob("*.dcm")))
        assert float(ds.RescaleIntercept) == intercept


def test_dicom_geometry_tags(sample_dir, plans):
    for uid, plan in plans.items():
        files = _read_study(sample_dir / f"{plan.split}_images" / uid)
        ds = files[1]
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.StudyInstanceUID == uid
        assert ds.Modality == "CT"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16
        assert ds.HighBit == ds.BitsStored - 1
        assert ds.Rows == ds.Columns == plan.phantom.image_size
        assert float(ds.PixelSpacing[0]) == pytest.approx(plan.phantom.pixel_spacing)
        assert float(ds.SliceThickness) == plan.phantom.slice_spacing
        assert "WindowCenter" in ds
        assert "WindowWidth" in ds
        sop_uids = {d.SOPInstanceUID for d in files.values()}
        assert len(sop_uids) == len(files)
        assert len({d.SeriesInstanceUID for d in files.values()}) == 1
        z = [float(files[n].ImagePositionPatient[2]) for n in sorted(files)]
        steps = np.diff(z)
        assert np.allclose(np.abs(steps), plan.phantom.slice_spacing, atol=1e-3)
        assert (steps > 0).all() if plan.reversed else (steps < 0).all()


def test_one_large_study(sample_dir):
    sizes = {}
    for study_dir in (sample_dir / "train_images").iterdir():
        ds = pydicom.dcmread(study_dir / "1.dcm", stop_before_pixels=True)
        sizes[study_dir.name] = (ds.Rows, ds.Columns)
    assert sorted(sizes.values()).count((768, 768)) == 1
    assert sum(size == (IMAGE_SIZE, IMAGE_SIZE) for size in sizes.values()) == N_TRAIN - 1


def test_reversed_and_instance_order(sample_dir):
    reversed_studies, normal_studies, against = 0, 0, 0
    for study_dir in (sample_dir / "train_images").iterdir():
        first = pydicom.dcmread(study_dir / "1.dcm", stop_before_pixels=True)
        second = pydicom.dcmread(study_dir / "2.dcm", stop_before_pixels=True)
        if float(second.ImagePositionPatient[2]) > float(first.ImagePositionPatient[2]):
            reversed_studies += 1
        else:
            normal_studies += 1
        if second.InstanceNumber < first.InstanceNumber:
            against += 1
    assert reversed_studies >= 1
    assert normal_studies > reversed_studies
    assert against >= 1


def test_segmentation_competition_layout(sample_dir, plans):
    segmented = [plans[p.name[: -len(".nii")]] for p in (sample_dir / "segmentations").glob("*.nii")]
    assert len(segmented) >= 4
    assert any(plan.reversed for plan in segmented)
    assert all(plan.split == "train" for plan in segmented)
    for plan in segmented:
        image = nib.load(sample_dir / "segmentations" / f"{plan.uid}.nii")
        data = np.asarray(image.dataobj)
        assert data.dtype == np.uint8
        assert data.shape == (plan.phantom.image_size, plan.phantom.image_size, plan.n_slices)
        _, labels_top_first, _ = render_volume(plan.phantom)
        by_slice_number = labels_top_first[::-1] if plan.reversed else labels_top_first
        # The competition's recipe gives slice_number order for a normal study. The array
        # runs from inferior to superior, so a reversed study comes out in reverse order.
        stack = data[:, ::-1, ::-1].transpose(2, 1, 0)
        if plan.reversed:
            stack = stack[::-1]
        assert np.array_equal(stack, by_slice_number), plan.uid
        present = set(np.unique(data))
        assert set(range(0, 10)) <= present
        assert present <= set(range(0, 11))


def _bone_fraction(sample_dir: Path, uid: str, data: np.ndarray, affine: np.ndarray) -> float:
    """Map labelled voxels through `affine` to DICOM pixels; return the fraction above 150 HU."""
    files = _read_study(sample_dir / "train_images" / uid)
    slices = sorted(files.values(), key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    volume = np.stack([_hu(ds) for ds in slices])
    voxels = np.argwhere(data > 0)
    ras = np.c_[voxels, np.ones(len(voxels))] @ affine.T
    lps = ras[:, :3] * np.array([-1.0, -1.0, 1.0])
    slice_index = np.array([int(np.argmin(np.abs(z - value))) for value in lps[:, 2]])
    assert np.abs(z[slice_index] - lps[:, 2]).max() < 1e-3
    first = slices[0]
    origin = np.array([float(v) for v in first.ImagePositionPatient[:2]])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    columns = np.rint((lps[:, 0] - origin[0]) / column_spacing).astype(int)
    rows = np.rint((lps[:, 1] - origin[1]) / row_spacing).astype(int)
    inside = (rows >= 0) & (rows < first.Rows) & (columns >= 0) & (columns < first.Columns)
    hu = np.full(len(voxels), -1000.0)
    hu[inside] = volume[slice_index[inside], rows[inside], columns[inside]]
    return float(np.mean(hu > 150))


def test_segmentation_affine_lands_on_bone(sample_dir, plans):
    """A reader that uses only the NIfTI affine and DICOM geometry finds bone under labels."""
    for path in (sample_dir / "segmentations").glob("*.nii"):
        uid = path.name[: -len(".nii")]
        image = nib.load(path)
        data = np.asarray(image.dataobj)
        assert np.allclose(image.affine, sample.segmentation_affine(plans[uid]))
        assert int(image.header["sform_code"]) == 1
        assert _bone_fraction(sample_dir, uid, data, image.affine) > 0.95, uid

        # The check can fail: an affine with the slice axis mirrored misplaces the labels.
        mirrored = image.affine.copy()
        mirrored[:3, 3] += mirrored[:3, 2] * (data.shape[2] - 1)
        mirrored[:3, 2] *= -1
        assert _bone_fraction(sample_dir, uid, data, mirrored) < 0.8, uid


def test_bounding_boxes_on_fractured_vertebrae(sample_dir, plans):
    boxes = pd.read_csv(sample_dir / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert len(boxes) >= 1
    train = pd.read_csv(sample_dir / "train.csv").set_index("StudyInstanceUID")
    for uid, study_boxes in boxes.groupby("StudyInstanceUID"):
        plan = plans[uid]
        assert train.loc[uid, "patient_overall"] == 1
        fractured_labels = [LEVEL_LABELS[v] for v in VERTEBRAE if train.loc[uid, v]]
        for box in study_boxes.itertuples():
            assert 1 <= box.slice_number <= plan.n_slices
            assert box.x >= 0
            assert box.y >= 0
            assert box.width > 0
            assert box.height > 0
            assert box.x + box.width <= plan.phantom.image_size
            assert box.y + box.height <= plan.phantom.image_size
            position = plan.n_slices - box.slice_number if plan.reversed else box.slice_number - 1
            assert plan.slice_number(position) == box.slice_number
            rendered = render_slice(plan.phantom, position)
            x0, y0 = int(box.x), int(box.y)
            window = (slice(y0, y0 + int(box.height)), slice(x0, x0 + int(box.width)))
            assert np.isin(rendered.labels[window], fractured_labels).any()
            assert rendered.crack[window].any()


def test_cracks_on_most_fractured_slices(plans):
    for plan in plans.values():
        fractured = [v for v in VERTEBRAE if plan.targets[v]]
        assert {crack.level for crack in plan.phantom.cracks} == set(fractured)
        for level in fractured:
            extent = plan.phantom.extent(level)
            level_cracks = [crack for crack in plan.phantom.cracks if crack.level == level]
            cracked = {p for crack in level_cracks for p in crack.positions}
            assert cracked <= set(extent.positions)
            assert len(cracked) >= 0.6 * extent.count
            position = sorted(cracked)[len(cracked) // 2]
            rendered = render_slice(plan.phantom, position)
            crack_pixels = rendered.crack > 0
            assert crack_pixels.sum() >= 3, (plan.uid, level)
            # Cracks are dark: soft-tissue HU where the vertebra is bone.
            bone = (rendered.labels == LEVEL_LABELS[level]) & ~crack_pixels
            assert rendered.hu[crack_pixels].mean() < 150
            assert rendered.hu[bone].mean() > 400


def test_levels_differ_between_slices(plans):
    """C1 is a ring, hollow in the middle, and C7 spans more rows than C3 (longer process)."""
    plan = next(iter(plans.values()))
    spec = plan.phantom
    _, labels, _ = render_volume(spec)
    extent_of = {level: spec.extent(level) for level in ("C1", "C3", "C7")}
    depth = {}
    for level, extent in extent_of.items():
        rows = np.nonzero((labels[list(extent.positions)] == LEVEL_LABELS[level]).any(axis=(0, 2)))[0]
        depth[level] = rows.max() - rows.min()
    assert depth["C7"] > depth["C3"]
    c1_middle = labels[extent_of["C1"].first + 1]
    c1_rows, c1_columns = np.nonzero(c1_middle == LEVEL_LABELS["C1"])
    centre = (int(c1_rows.mean()), int(c1_columns.mean()))
    assert c1_middle[centre] != LEVEL_LABELS["C1"], "C1 should be a ring, hollow in the middle"


def test_fracture_sampler_matches_prevalence():
    conditional = sample.conditional_fracture_probabilities()
    rng = np.random.default_rng(0)
    draws = pd.DataFrame([sample.draw_targets(rng, conditional) for _ in range(20000)])
    assert (draws["patient_overall"] == draws[list(VERTEBRAE)].max(axis=1)).all()
    for target in TARGETS:
        assert draws[target].mean() == pytest.approx(PREVALENCE[target], abs=0.012), target


def test_build_is_deterministic(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    sample.build_sample(first, n_train=3, n_test=1, image_size=32, seed=11, workers=1)
    sample.build_sample(second, n_train=3, n_test=1, image_size=32, seed=11, workers=2)
    first_files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    second_files = sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert first_files == second_files
    assert len(first_files) > 100
    for relative in first_files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative

    other = tmp_path / "other"
    sample.build_sample(other, n_train=3, n_test=1, image_size=32, seed=12, workers=1)
    assert (other / "train.csv").read_bytes() != (first / "train.csv").read_bytes()


def test_rebuild_replaces_sample_but_not_foreign_folder(tmp_path):
    out = tmp_path / "sample"
    sample.build_sample(out, n_train=2, n_test=0, image_size=32, seed=1, workers=1)
    sample.build_sample(out, n_train=1, n_test=0, image_size=32, seed=2, workers=1)
    assert len(pd.read_csv(out / "train.csv")) == 1
    assert len(list((out / "train_images").iterdir())) == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        sample.build_sample(foreign, n_train=1, n_test=0, image_size=32, seed=1, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".foreign.*"))


def test_real_ct_copied_into_test_images(tmp_path):
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT folder {REAL_CT_DIR} not found; it holds the real DICOM series to copy")
    out = tmp_path / "sample"
    summary = sample.build_sample(
        out, n_train=1, n_test=0, image_size=32, seed=0, real_ct_dir=REAL_CT_DIR, workers=1
    )
    assert summary["real_ct_studies"] == len(sample.REAL_CT_SERIES)

    test = pd.read_csv(out / "test.csv")
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    folders = {p.name: p for p in (out / "test_images").iterdir()}
    assert len(folders) == len(sample.REAL_CT_SERIES)
    assert set(folders) <= set(uids)
    assert len(uids) == len(folders) + 1  # plus the study without images

    counts = sorted(len(list(p.iterdir())) for p in folders.values())
    assert counts == [1, 1, 20, 28]
    for (folder, pattern), uid in zip(sample.REAL_CT_SERIES, sorted(folders)):
        assert int(uid.rsplit(".", 1)[1]) in sample.REAL_CT_NUMBERS
        sources = sorted(p for p in (REAL_CT_DIR / folder).glob(pattern) if p.is_file())
        copies = [folders[uid] / f"{n}.dcm" for n in range(1, len(sources) + 1)]
        assert all(copy.read_bytes() == source.read_bytes() for copy, source in zip(copies, sources))


def test_main_writes_sample(tmp_path, caplog):
    out = tmp_path / "cli"
    with caplog.at_level("INFO", logger="csfd.sample"):
        code = sample.main(
            ["--out", str(out), "--n-train", "2", "--n-test", "1", "--image-size", "32", "--seed", "4",
             "--real-ct", "", "--workers", "1"]
        )
    assert code == 0
    assert len(pd.read_csv(out / "train.csv")) == 2
    assert len(pd.read_csv(out / "test.csv")) == 16
    assert "train_studies: 2" in caplog.text
