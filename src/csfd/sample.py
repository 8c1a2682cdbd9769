"""Synthetic sample dataset in the competition's layout, for tests and the demo pipeline.

build_sample writes, under one folder:

    train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv
    train_images/<StudyInstanceUID>/<slice_number>.dcm
    test_images/<StudyInstanceUID>/<slice_number>.dcm
    segmentations/<StudyInstanceUID>.nii

Each study is a neck phantom (csfd.sample_phantom) written as one CT Image Storage file per
slice. Storage varies on purpose, as in the competition. Some studies have reversed slice
order or an InstanceNumber that runs against slice order. Pixels are signed or unsigned, with
12 or 16 stored bits and rescale slopes of 1, 0.5 or 2. Transfer syntaxes are Explicit VR
Little Endian, RLE Lossless and JPEG 2000 Lossless. Every file is read back after writing and
must decode to the HU that were rendered. The output depends only on the arguments, because
UIDs and dates come from the seed, never from the clock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from tqdm import tqdm

from csfd.constants import DEFECTIVE_STUDIES, PREVALENCE, TARGETS, VERTEBRAE
from csfd.io_utils import atomic_write_csv
from csfd.sample_phantom import PhantomSpec, make_phantom_spec, render_volume

logger = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043."
# Study numbers (the last UID component) by kind, so the kinds never collide.
TRAIN_NUMBERS = range(1000, 30000)
TEST_NUMBERS = range(30000, 40000)
REAL_CT_NUMBERS = range(40000, 41000)
LARGE_IMAGE_SIZE = 768
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "real-ct"

# Real CT series copied into test_images, one study each: (folder, file name pattern).
REAL_CT_SERIES = (
    ("head-series-ge", "*.dcm"),
    ("totalsegmentator/example_ct_dicom", "CT.*"),
    ("cspine-slice", "IM-0001-0001-0001.dcm"),
    ("neck-slice", "bad_sequence.dcm"),
)
_OUTPUT_ENTRIES = (
    "train.csv",
    "train_bounding_boxes.csv",
    "test.csv",
    "sample_submission.csv",
    "train_images",
    "test_images",
    "segmentations",
)


@dataclass(frozen=True)
class Storage:
    """Pixel storage of a study, with HU = stored * slope + intercept."""

    transfer_syntax: str
    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    slope: float
    intercept: float
    window_center: float
    window_width: float

    def to_stored(self, hu: np.ndarray) -> np.ndarray:
        """Convert HU to stored values. Raise ValueError if a value does not fit `bits_stored`."""
        stored = np.rint((hu.astype(np.float64) - self.intercept) / self.slope)
        if self.pixel_representation:
            low, high, dtype = -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1, np.int16
        else:
            low, high, dtype = 0, 2**self.bits_stored - 1, np.uint16
        if stored.min() < low or stored.max() > high:
            raise ValueError(
                f"stored values {stored.min():.0f}..{stored.max():.0f} do not fit "
                f"{self.bits_stored} bits (pixel representation {self.pixel_representation}, "
                f"slope {self.slope}, intercept {self.intercept}). "
                f"Use 16 bits stored or a smaller HU range"
            )
        return stored.astype(dtype)

    def to_hu(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float64) * self.slope + self.intercept


@dataclass(frozen=True)
class StudyPlan:
    """One synthetic study: anatomy, labels, storage and DICOM geometry."""

    uid: str
    split: str  # "train" or "test"
    phantom: PhantomSpec
    targets: dict[str, int]  # drawn for test studies too, but written for training studies only
    storage: Storage
    reversed: bool  # slice_number rises with z (slice 1 at the bottom)
    instance_numbers_reversed: bool  # InstanceNumber runs against slice_number
    segmented: bool
    with_boxes: bool
    origin: tuple[float, float]  # ImagePositionPatient x, y (mm) of the first pixel
    z_top: float  # z (mm) of the top slice
    study_date: str
    study_time: str

    @property
    def n_slices(self) -> int:
        return self.phantom.n_slices

    def slice_number(self, position: int) -> int:
        """Return the file's slice_number for a position (0 = top slice)."""
        return self.n_slices - position if self.reversed else position + 1

    def z(self, position: int) -> float:
        return round(self.z_top - position * self.phantom.slice_spacing, 4)


def conditional_fracture_probabilities() -> dict[str, float]:
    """Return P(vertebra drawn | patient positive) so that the marginals equal PREVALENCE.

    A positive patient draws each vertebra independently and, when none was drawn, one
    vertebra in proportion to its prevalence. The fallback adds mass, so the independent
    probabilities are scaled down by the factor c that solves c = 1 - P(none | c) * r, where
    r is the overall prevalence over the sum of the vertebra prevalences.
    """
    overall = PREVALENCE["patient_overall"]
    total = sum(PREVALENCE[v] for v in VERTEBRAE)
    given_positive = {v: PREVALENCE[v] / overall for v in VERTEBRAE}
    factor = 1.0
    for _ in range(200):
        none = math.prod(1.0 - factor * p for p in given_positive.values())
        factor = 1.0 - none * overall / total
    return {v: factor * p for v, p in given_positive.items()}


def draw_targets(rng: np.random.Generator, conditional: dict[str, float]) -> dict[str, int]:
    """Draw patient_overall, then the fractured vertebrae (at least one when positive)."""
    targets = {target: 0 for target in TARGETS}
    if rng.random() >= PREVALENCE["patient_overall"]:
        return targets
    targets["patient_overall"] = 1
    drawn = rng.random(len(VERTEBRAE)) < np.array([conditional[v] for v in VERTEBRAE])
    if not drawn.any():
        weights = np.array([PREVALENCE[v] for v in VERTEBRAE])
        drawn[rng.choice(len(VERTEBRAE), p=weights / weights.sum())] = True
    for vertebra, fractured in zip(VERTEBRAE, drawn):
        targets[vertebra] = int(fractured)
    return targets


def _ensure_positives(targets: list[dict[str, int]], rng: np.random.Generator, minimum: int) -> None:
    """Give each vertebra at least `minimum` fractured training studies, in place.

    A small sample can draw no C3 or C4 fracture at all, which leaves the stacker nothing to
    learn for that target; extra fractures go to studies that are already positive.
    """
    positive = [i for i, t in enumerate(targets) if t["patient_overall"]]
    for vertebra in VERTEBRAE:
        have = [i for i in positive if targets[i][vertebra]]
        candidates = [i for i in positive if not targets[i][vertebra]]
        missing = max(minimum - len(have), 0)
        for index in rng.permutation(candidates)[:missing]:
            targets[int(index)][vertebra] = 1


def _draw_storage(rng: np.random.Generator) -> dict:
    transfer = rng.choice([ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless], p=[0.76, 0.12, 0.12])
    slope = float(rng.choice([1.0, 0.5, 2.0], p=[0.9, 0.05, 0.05]))
    return {
        "transfer_syntax": str(transfer),
        "pixel_representation": int(rng.random() < 0.5),
        "bits_stored": 12 if rng.random() < 0.6 else 16,
        "slope": slope,
        "window": [(400.0, 1800.0), (40.0, 400.0), (500.0, 2000.0)][int(rng.integers(0, 3))],
        "reversed": bool(rng.random() < 0.15),
        "instance_numbers_reversed": bool(rng.random() < 0.2),
    }


def _make_storage(options: dict) -> Storage:
    signed = options["pixel_representation"]
    bits = options["bits_stored"]
    slope = options["slope"]
    if slope == 0.5:
        bits = 16  # doubled values of the HU range need more than 12 bits
    center, width = options["window"]
    return Storage(
        transfer_syntax=options["transfer_syntax"],
        pixel_representation=signed,
        bits_stored=bits,
        slope=slope,
        intercept=0.0 if signed else -1024.0,
        window_center=center,
        window_width=width,
    )


# Variants that every sample must contain, applied to distinct training studies where there
# are enough of them (with fewer studies, a study takes several variants).
_REQUIRED_TRAIN_VARIANTS = (
    {"large": True, "transfer_syntax": str(ExplicitVRLittleEndian)},
    {"transfer_syntax": str(RLELossless), "pixel_representation": 1, "bits_stored": 16},
    {"transfer_syntax": str(JPEG2000Lossless), "pixel_representation": 0, "bits_stored": 12},
    {"slope": 0.5, "pixel_representation": 0},
    {"slope": 2.0, "pixel_representation": 1, "bits_stored": 12},
    {"reversed": True, "segmented": True},
    {"instance_numbers_reversed": True},
    {"pixel_representation": 1, "bits_stored": 12, "transfer_syntax": str(ExplicitVRLittleEndian)},
    {"pixel_representation": 0, "bits_stored": 16, "transfer_syntax": str(ExplicitVRLittleEndian)},
)


def _study_numbers(rng: np.random.Generator, numbers: range, count: int) -> list[int]:
    defective = {int(uid.rsplit(".", 1)[1]) for uid in DEFECTIVE_STUDIES}
    candidates = np.array([n for n in numbers if n not in defective])
    if count > len(candidates):
        raise ValueError(f"cannot draw {count} study numbers from {numbers}. Request fewer studies")
    return sorted(int(n) for n in rng.choice(candidates, size=count, replace=False))


def plan_sample(n_train: int, n_test: int, image_size: int, seed: int) -> list[StudyPlan]:
    """Plan every synthetic study (train first, then test) from the seed alone."""
    if n_train < 1 or n_test < 0:
        raise ValueError(
            f"invalid study counts n_train={n_train}, n_test={n_test}: "
            f"n_train must be at least 1 and n_test at least 0"
        )
    rng = np.random.default_rng(seed)
    conditional = conditional_fracture_probabilities()
    train_numbers = _study_numbers(rng, TRAIN_NUMBERS, n_train)
    test_numbers = _study_numbers(rng, TEST_NUMBERS, n_test)
    rng.shuffle(train_numbers)

    options = [_draw_storage(rng) for _ in range(n_train + n_test)]
    for option in options:
        option.update(large=False, segmented=False)
    order = rng.permutation(n_train)
    for index, variant in enumerate(_REQUIRED_TRAIN_VARIANTS):
        options[int(order[index % n_train])].update(variant)
    if n_test:
        options[n_train].update(reversed=True)
    large = [i for i in range(n_train) if options[i]["large"]]
    for index in large[1:]:
        options[index]["large"] = False  # exactly one large study
    for index in large[:1]:
        options[index]["transfer_syntax"] = str(ExplicitVRLittleEndian)
        if n_train > 1:
            options[index]["segmented"] = False  # a 768 px label volume would be large

    n_segmented = max(math.ceil(n_train / 4), min(4, n_train))
    chosen = [i for i in range(n_train) if options[i]["segmented"]]
    candidates = [
        int(i) for i in order if not options[int(i)]["segmented"] and not options[int(i)]["large"]
    ]
    for index in candidates[: max(n_segmented - len(chosen), 0)]:
        options[index]["segmented"] = True

    all_targets = [draw_targets(rng, conditional) for _ in range(n_train + n_test)]
    _ensure_positives(all_targets[:n_train], rng, minimum=min(3, n_train // 10))
    plans = []
    for index in range(n_train + n_test):
        split = "train" if index < n_train else "test"
        number = train_numbers[index] if split == "train" else test_numbers[index - n_train]
        option = options[index]
        targets = all_targets[index]
        fractured = tuple(v for v in VERTEBRAE if targets[v])
        size = LARGE_IMAGE_SIZE if option["large"] else image_size
        phantom = make_phantom_spec(rng, size, fractured)
        half_extent = (size - 1) / 2 * phantom.pixel_spacing
        day = datetime.date(2021, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 730)))
        seconds = int(rng.integers(7 * 3600, 20 * 3600))
        plans.append(
            StudyPlan(
                uid=f"{UID_ROOT}{number}",
                split=split,
                phantom=phantom,
                targets=targets,
                storage=_make_storage(option),
                reversed=option["reversed"],
                instance_numbers_reversed=option["instance_numbers_reversed"],
                segmented=split == "train" and option["segmented"],
                with_boxes=split == "train" and bool(fractured) and rng.random() < 0.4,
                origin=(
                    round(-half_extent + float(rng.uniform(-15.0, 15.0)), 4),
                    round(-half_extent + float(rng.uniform(-15.0, 15.0)), 4),
                ),
                z_top=round(float(rng.uniform(-150.0, 150.0)), 4),
                study_date=day.strftime("%Y%m%d"),
                study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
            )
        )
    # At least one training study with boxes when any is fractured.
    fractured_train = [
        i for i, p in enumerate(plans) if p.split == "train" and p.targets["patient_overall"]
    ]
    if fractured_train and not any(plans[i].with_boxes for i in fractured_train):
        plans[fractured_train[0]] = replace(plans[fractured_train[0]], with_boxes=True)
    return plans


def _study_dataset(plan: StudyPlan) -> Dataset:
    """Build the DICOM header shared by a study's slices. _write_slice sets the per-slice elements."""
    phantom = plan.phantom
    storage = plan.storage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = plan.study_date
    ds.SeriesDate = plan.study_date
    ds.StudyTime = plan.study_time
    ds.Modality = "CT"
    ds.Manufacturer = "csfd synthetic phantom"
    ds.PatientName = "Anonymous"
    ds.PatientID = plan.uid.rsplit(".", 1)[1]
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = phantom.slice_spacing
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = plan.uid
    ds.SeriesInstanceUID = f"{plan.uid}.1"
    ds.StudyID = ds.PatientID
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = f"{plan.uid}.2"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = phantom.image_size
    ds.Columns = phantom.image_size
    ds.PixelSpacing = [phantom.pixel_spacing, phantom.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = storage.pixel_representation
    ds.WindowCenter = storage.window_center
    ds.WindowWidth = storage.window_width
    ds.RescaleIntercept = storage.intercept
    ds.RescaleSlope = storage.slope
    ds.RescaleType = "HU"
    return ds


def _write_slice(
    path: Path, ds: Dataset, plan: StudyPlan, position: int, stored: np.ndarray
) -> None:
    """Set the slice's own elements and pixel data on the study header `ds` and save it."""
    slice_number = plan.slice_number(position)
    sop_instance_uid = f"{plan.uid}.1.{slice_number}"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.SOPInstanceUID = sop_instance_uid
    if plan.instance_numbers_reversed:
        ds.InstanceNumber = plan.n_slices + 1 - slice_number
    else:
        ds.InstanceNumber = slice_number
    ds.ImagePositionPatient = [plan.origin[0], plan.origin[1], plan.z(position)]
    ds.SliceLocation = plan.z(position)
    if plan.storage.transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
    else:
        # generate_instance_uid=False keeps the SOP Instance UID, because the default draws a random one.
        ds.compress(plan.storage.transfer_syntax, stored, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _verify_slice(path: Path, storage: Storage, expected_hu: np.ndarray) -> None:
    """Read a written file back and raise RuntimeError unless it decodes to exactly the expected HU."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if hu.shape != expected_hu.shape or not np.array_equal(hu, expected_hu):
        raise RuntimeError(
            f"{path}: decoded HU differ from the rendered HU (transfer syntax "
            f"{ds.file_meta.TransferSyntaxUID}, pixel representation {storage.pixel_representation}, "
            f"bits stored {storage.bits_stored}, slope {storage.slope}). "
            f"The writer or the codec is broken"
        )


def segmentation_affine(plan: StudyPlan) -> np.ndarray:
    """Return the NIfTI affine (voxel to RAS mm) of the study's segmentation array.

    The array is (column, row, slice) with rows flipped and slices from inferior to superior,
    as in the competition, so voxel (i, j, k) is column i, row rows-1-j of the k-th slice from
    the bottom. The affine follows from the DICOM geometry: ImagePositionPatient of the
    bottom slice, ImageOrientationPatient, PixelSpacing and the step between slices, all in
    LPS; RAS negates x and y.
    """
    phantom = plan.phantom
    row_cosine = np.array([1.0, 0.0, 0.0])  # ImageOrientationPatient[:3]: along a row
    column_cosine = np.array([0.0, 1.0, 0.0])  # ImageOrientationPatient[3:]: down a column
    row_spacing = column_spacing = phantom.pixel_spacing  # PixelSpacing = [row, column] spacing
    bottom = plan.n_slices - 1  # a phantom has at least 40 slices
    bottom_position = np.array([plan.origin[0], plan.origin[1], plan.z(bottom)])
    step = np.array([0.0, 0.0, plan.z(bottom - 1) - plan.z(bottom)])  # one slice toward the head
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing
    lps[:3, 1] = -column_cosine * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = bottom_position + column_cosine * row_spacing * (phantom.image_size - 1)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_segmentation(path: Path, plan: StudyPlan, labels_top_first: np.ndarray) -> None:
    # (slice top first, row, column) -> (column, row flipped, slice bottom first).
    data = np.ascontiguousarray(labels_top_first.transpose(2, 1, 0)[:, ::-1, ::-1]).astype(np.uint8)
    affine = segmentation_affine(plan)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _boxes(plan: StudyPlan, crack_ids: np.ndarray) -> list[dict]:
    """Return one box per crack and slice: the crack's pixels plus a small margin."""
    size = plan.phantom.image_size
    margin = max(2, round(size / 100))
    rows = []
    for position in range(plan.n_slices):
        for crack_id in np.unique(crack_ids[position])[1:]:
            ys, xs = np.nonzero(crack_ids[position] == crack_id)
            x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin, size - 1)
            y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin, size - 1)
            rows.append(
                {
                    "StudyInstanceUID": plan.uid,
                    "x": float(x0),
                    "y": float(y0),
                    "width": float(x1 - x0 + 1),
                    "height": float(y1 - y0 + 1),
                    "slice_number": plan.slice_number(position),
                }
            )
    return sorted(rows, key=lambda row: (row["slice_number"], row["x"], row["y"]))


@contextlib.contextmanager
def _quiet_openjpeg():
    """Silence the openjpeg plugin's per-tile INFO messages while encoding."""
    openjpeg_logger = logging.getLogger("openjpeg")
    level = openjpeg_logger.level
    openjpeg_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        openjpeg_logger.setLevel(level)


def write_study(plan: StudyPlan, out_dir: Path) -> tuple[int, list[dict]]:
    """Render and write one study's DICOM files and segmentation.

    Return the number of slices and the study's bounding-box rows.
    """
    hu, labels, crack = render_volume(plan.phantom)
    study_dir = out_dir / f"{plan.split}_images" / plan.uid
    study_dir.mkdir(parents=True, exist_ok=True)
    header = _study_dataset(plan)
    with _quiet_openjpeg():
        for position in range(plan.n_slices):
            stored = plan.storage.to_stored(hu[position])
            path = study_dir / f"{plan.slice_number(position)}.dcm"
            _write_slice(path, header, plan, position, stored)
            _verify_slice(path, plan.storage, plan.storage.to_hu(stored))
    if plan.segmented:
        (out_dir / "segmentations").mkdir(exist_ok=True)
        _write_segmentation(out_dir / "segmentations" / f"{plan.uid}.nii", plan, labels)
    boxes = _boxes(plan, crack) if plan.with_boxes else []
    return plan.n_slices, boxes


def _write_studies(plans: list[StudyPlan], out_dir: Path, workers: int) -> list[tuple[int, list[dict]]]:
    """Write the studies, in worker processes when workers > 1, and return results in plan order."""
    if workers <= 1 or len(plans) <= 1:
        return [write_study(plan, out_dir) for plan in tqdm(plans, desc="sample studies", unit="study")]
    # spawn, because a forked child copies only the calling thread and can deadlock on locks
    # held by the parent's library thread pools (OpenCV, BLAS).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(write_study, plan, out_dir) for plan in plans]
        try:
            for future in tqdm(futures, desc="sample studies", unit="study"):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # do not write the queued studies after a failure
            raise
        return [future.result() for future in futures]


def copy_real_ct(real_ct_dir: Path, test_dir: Path, seed: int) -> list[str]:
    """Copy each real CT series in REAL_CT_SERIES to a study folder and return the new UIDs."""
    rng = np.random.default_rng([seed, 1])
    numbers = _study_numbers(rng, REAL_CT_NUMBERS, len(REAL_CT_SERIES))
    uids = []
    for (folder, pattern), number in zip(REAL_CT_SERIES, numbers):
        source = real_ct_dir / folder
        files = sorted(p for p in source.glob(pattern) if p.is_file())
        if not files:
            logger.warning("real CT series %s has no files matching %s, skipped", source, pattern)
            continue
        uid = f"{UID_ROOT}{number}"
        destination = test_dir / uid
        destination.mkdir(parents=True)
        for index, file in enumerate(files, start=1):
            shutil.copyfile(file, destination / f"{index}.dcm")
        logger.info("copied %d real CT file(s) from %s to test study %s", len(files), source, uid)
        uids.append(uid)
    return uids


def _test_rows(uids: list[str]) -> pd.DataFrame:
    rows = [
        {"row_id": f"{uid}_{target}", "StudyInstanceUID": uid, "prediction_type": target}
        for uid in uids
        for target in VERTEBRAE + ("patient_overall",)
    ]
    return pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])


def _replace_output(staging: Path, out_dir: Path) -> None:
    """Move the finished build onto out_dir, replacing an earlier sample only."""
    if out_dir.exists():
        unknown = sorted(p.name for p in out_dir.iterdir() if p.name not in _OUTPUT_ENTRIES)
        if unknown:
            raise FileExistsError(
                f"{out_dir} contains files that are not part of a sample ({', '.join(unknown[:5])}). "
                f"Choose an empty or new output folder"
            )
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def build_sample(
    out_dir: Path,
    *,
    n_train: int = 80,
    n_test: int = 6,
    image_size: int = 256,
    seed: int = 0,
    real_ct_dir: Path | None = None,
    workers: int = 0,
) -> dict:
    """Write a synthetic dataset in the competition's layout to out_dir and return counts.

    The build happens in a temporary folder beside out_dir and replaces out_dir only when
    complete. An existing out_dir may contain only an earlier sample, otherwise the build
    raises FileExistsError. Real CT series from real_ct_dir, when it exists, join the test
    studies. test.csv also names one study without a folder in test_images, as the
    competition's public test.csv does. `workers` processes write the studies (0 means one
    per CPU core), and the files do not depend on their number.
    """
    out_dir = Path(out_dir)
    plans = plan_sample(n_train, n_test, image_size, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    # mkdtemp creates the folder as 0700. Give out_dir the permissions of a plain mkdir.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        (staging / "train_images").mkdir()
        (staging / "test_images").mkdir()
        (staging / "segmentations").mkdir()
        slices = {"train": 0, "test": 0}
        boxes: list[dict] = []
        results = _write_studies(plans, staging, workers or os.cpu_count() or 1)
        for plan, (n_slices, study_boxes) in zip(plans, results):
            slices[plan.split] += n_slices
            boxes.extend(study_boxes)

        train = [p for p in plans if p.split == "train"]
        test_uids = [p.uid for p in plans if p.split == "test"]
        real_uids: list[str] = []
        if real_ct_dir is not None:
            real_ct_dir = Path(real_ct_dir)
            if real_ct_dir.is_dir():
                real_uids = copy_real_ct(real_ct_dir, staging / "test_images", seed)
                for uid in real_uids:
                    slices["test"] += len(list((staging / "test_images" / uid).iterdir()))
            else:
                logger.warning(
                    "real CT folder %s not found, so the sample has no real CT studies", real_ct_dir
                )
        missing_number = _study_numbers(np.random.default_rng([seed, 2]), TEST_NUMBERS, n_test + 1)
        taken = {int(uid.rsplit(".", 1)[1]) for uid in test_uids}
        missing_uid = f"{UID_ROOT}{next(n for n in missing_number if n not in taken)}"

        train_df = pd.DataFrame(
            [{"StudyInstanceUID": p.uid, **{t: p.targets[t] for t in TARGETS}} for p in train],
            columns=["StudyInstanceUID", *TARGETS],
        )
        atomic_write_csv(train_df, staging / "train.csv")
        box_columns = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
        boxes_df = pd.DataFrame(boxes, columns=box_columns)
        atomic_write_csv(boxes_df, staging / "train_bounding_boxes.csv")
        test_df = _test_rows(test_uids + real_uids + [missing_uid])
        atomic_write_csv(test_df, staging / "test.csv")
        submission = pd.DataFrame({"row_id": test_df["row_id"], "fractured": 0.5})
        atomic_write_csv(submission, staging / "sample_submission.csv")
        _replace_output(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

    summary = {
        "train_studies": len(train),
        "test_studies": len(test_uids) + len(real_uids) + 1,
        "synthetic_test_studies": len(test_uids),
        "real_ct_studies": len(real_uids),
        "missing_test_studies": 1,
        "train_slices": slices["train"],
        "test_slices": slices["test"],
        "segmented_studies": sum(p.segmented for p in train),
        "bounding_boxes": len(boxes),
        "bounding_box_studies": len({row["StudyInstanceUID"] for row in boxes}),
        "fractured_studies": int(train_df["patient_overall"].sum()),
        "reversed_studies": sum(p.reversed for p in plans),
    }
    return summary


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Build the sample dataset from the command line and log its summary."""
    parser = argparse.ArgumentParser(
        prog="python -m csfd sample", description="Write a synthetic sample dataset in the competition's layout."
    )
    parser.add_argument(
        "--out", type=Path, default=Path("input/sample"), help="output folder (default input/sample)"
    )
    parser.add_argument(
        "--n-train", type=int, default=80, help="number of training studies (default 80)"
    )
    parser.add_argument(
        "--n-test", type=int, default=6, help="number of synthetic test studies (default 6)"
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="rows and columns of a slice in pixels (default 256)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)"
    )
    parser.add_argument(
        "--real-ct",
        default=str(DEFAULT_REAL_CT_DIR) if DEFAULT_REAL_CT_DIR.is_dir() else "",
        help='folder of real CT series to add to test_images; "" for none '
        "(default: ../shared/data/real-ct beside the repository when it exists)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that write studies (default 0: one per CPU core)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    summary = build_sample(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        real_ct_dir=Path(args.real_ct) if args.real_ct else None,
        workers=args.workers,
    )
    elapsed = time.perf_counter() - started
    size_mb = _directory_size(args.out) / 2**20
    logger.info("sample written to %s in %.1f s (%.1f MiB)", args.out, elapsed, size_mb)
    for key, value in summary.items():
        logger.info("  %s: %s", key, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
