"""Write small CT DICOM files with pydicom for tests (Explicit VR Little Endian, one frame)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_ct(
    path: Path,
    words: np.ndarray,
    *,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    padding: tuple[str, int] | None = None,
    padding_limit: tuple[str, int] | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    spacing: Sequence[float] | None = (1.0, 1.0),
    instance_number: int | None = None,
    study_uid: str = "1.2.3.4",
) -> Path:
    """Write `words` (rows, cols) as the raw 16-bit pixel words of a CT slice.

    `padding` and `padding_limit` are (VR, value), so that a test can write a US value for
    signed pixels, as some scanners do.
    """
    words = np.asarray(words)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = study_uid + ".1"
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = words.shape
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = pixel_representation
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    if slope is not None:
        dataset.RescaleSlope = slope
    if intercept is not None:
        dataset.RescaleIntercept = intercept
    if padding is not None:
        dataset.add_new(0x00280120, padding[0], padding[1])
    if padding_limit is not None:
        dataset.add_new(0x00280121, padding_limit[0], padding_limit[1])
    if position is not None:
        dataset.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        dataset.ImageOrientationPatient = [float(v) for v in orientation]
    if spacing is not None:
        dataset.PixelSpacing = [float(v) for v in spacing]
    if instance_number is not None:
        dataset.InstanceNumber = instance_number
    dataset.PixelData = words.astype(np.int64).astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def hu_to_words(hu: np.ndarray, intercept: float = -1024.0) -> np.ndarray:
    """Stored 16-bit words for HU with slope 1 and `intercept` (signed values as two's complement)."""
    return (np.asarray(hu, dtype=np.int64) - int(intercept)).astype(np.uint16)
