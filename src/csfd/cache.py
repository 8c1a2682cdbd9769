"""Layout of the prepared slice cache and the reader that training uses.

```
<cache_dir>/<split>/studies/<StudyInstanceUID>.npy    uint8 (n_slices, S, S), canonical order
<cache_dir>/<split>/studies/<StudyInstanceUID>.json   per-study metadata, written last
<cache_dir>/<split>/slices.csv, report.csv, vertebra_labels.csv (train only)
```
A study counts as prepared only when its JSON exists, was made with the current window and
image size, and its .npy has the shape and dtype that the JSON records.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from csfd.config import PrepareConfig
from csfd.constants import VERTEBRAE

# pandas is imported where it is used: prepare workers import this module for its paths only,
# and pandas would add about 0.2 s to the start of every worker.
if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

SLICES_COLUMNS = ("StudyInstanceUID", "slice_number", "position_index", "z")
VERTEBRA_LABEL_COLUMNS = ("StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE)


def split_dir(cache_dir: str | Path, split: str) -> Path:
    return Path(cache_dir) / split


def studies_dir(cache_dir: str | Path, split: str) -> Path:
    return split_dir(cache_dir, split) / "studies"


def volume_path(studies: Path, study_uid: str) -> Path:
    return studies / f"{study_uid}.npy"


def record_path(studies: Path, study_uid: str) -> Path:
    return studies / f"{study_uid}.json"


def read_record(studies: Path, study_uid: str) -> dict | None:
    """Return the metadata JSON of a cached study, or None when it is absent or unreadable."""
    path = record_path(studies, study_uid)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("ignoring unreadable cache record %s (%s); the study will be prepared again", path, error)
        return None


def record_matches(
    record: dict,
    studies: Path,
    prepare: PrepareConfig,
    segmentation_name: str | None = None,
) -> bool:
    """Return True when `record` describes a usable .npy made with the settings of `prepare`.

    With `segmentation_name`, the record must also hold the vertebra visibility computed
    from that segmentation file.
    """
    if record.get("status") != "done":
        return False
    settings = (record.get("image_size"), record.get("window_center"), record.get("window_width"))
    if settings != (prepare.image_size, prepare.window_center, prepare.window_width):
        return False
    if segmentation_name is not None:
        if record.get("segmentation") != segmentation_name or record.get("vertebra_visibility") is None:
            return False

    study_uid = record.get("StudyInstanceUID")
    if not isinstance(study_uid, str):
        return False
    path = volume_path(studies, study_uid)
    if not path.is_file():
        return False
    try:
        volume = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as error:
        logger.warning("ignoring unreadable cached volume %s (%s); the study will be prepared again", path, error)
        return False
    return list(volume.shape) == list(record.get("shape", ())) and volume.dtype == np.uint8


def slices_frame(records: list[dict]) -> pd.DataFrame:
    """Build the slices.csv table (one row per cached slice) from study records."""
    import pandas as pd

    frames = [
        pd.DataFrame(
            {
                "StudyInstanceUID": record["StudyInstanceUID"],
                "slice_number": np.asarray(record["slice_numbers"], dtype=np.int64),
                "position_index": np.arange(len(record["slice_numbers"]), dtype=np.int64),
                "z": np.asarray(record["z"], dtype=np.float64),
            }
        )
        for record in records
    ]
    if not frames:
        return pd.DataFrame(columns=list(SLICES_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def vertebra_labels_frame(records: list[dict]) -> pd.DataFrame:
    """Build the vertebra_labels.csv table from the records that hold vertebra visibility."""
    import pandas as pd

    frames = []
    for record in records:
        visibility = record.get("vertebra_visibility")
        if visibility is None:
            continue
        visibility = np.asarray(visibility, dtype=np.uint8).reshape(-1, len(VERTEBRAE))
        frame = pd.DataFrame(visibility, columns=list(VERTEBRAE))
        frame.insert(0, "StudyInstanceUID", record["StudyInstanceUID"])
        frame.insert(1, "slice_number", np.asarray(record["slice_numbers"], dtype=np.int64))
        frame.insert(2, "position_index", np.arange(len(frame), dtype=np.int64))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(VERTEBRA_LABEL_COLUMNS))
    return pd.concat(frames, ignore_index=True)


class StudyCache:
    """Read access to one split of the prepared cache.

    Volumes open as read-only memory maps on first use and stay open, up to `max_open` per
    process (the least recently used is dropped first), because each open map keeps a file descriptor.
    Pickling drops the open maps and the slice table, so a copy sent to a DataLoader worker
    is small and reopens what it needs there.
    """

    def __init__(self, cache_dir: str | Path, split: str, max_open: int = 256) -> None:
        self.split = split
        self.split_dir = split_dir(cache_dir, split)
        self.studies_dir = studies_dir(cache_dir, split)
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.max_open = max_open
        slices_csv = self.split_dir / "slices.csv"
        if not slices_csv.is_file():
            raise FileNotFoundError(
                f"prepared cache not found: {slices_csv} is missing; run the prepare stage "
                f"(`make prepare`) for split {split!r} first, or check paths.cache_dir"
            )
        self._slices: pd.DataFrame | None = None
        self._study_uids: tuple[str, ...] | None = None
        self._volumes: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def slices(self) -> pd.DataFrame:
        """The slices.csv table: StudyInstanceUID, slice_number, position_index, z."""
        import pandas as pd

        if self._slices is None:
            self._slices = pd.read_csv(self.split_dir / "slices.csv", dtype={"StudyInstanceUID": str})
        return self._slices

    @property
    def study_uids(self) -> list[str]:
        """The prepared studies, in the order of slices.csv."""
        import pandas as pd

        if self._study_uids is None:
            self._study_uids = tuple(pd.unique(self.slices["StudyInstanceUID"]))
        return list(self._study_uids)

    def volume(self, study_uid: str) -> np.ndarray:
        """Return the (n_slices, S, S) uint8 volume of a study as a read-only memory map."""
        volume = self._volumes.get(study_uid)
        if volume is not None:
            self._volumes.move_to_end(study_uid)
            return volume

        path = volume_path(self.studies_dir, study_uid)
        if not path.is_file():
            raise FileNotFoundError(f"study {study_uid} is not in the {self.split} cache: {path} not found")
        volume = np.load(path, mmap_mode="r")
        if volume.ndim != 3 or volume.dtype != np.uint8:
            raise ValueError(
                f"{path}: expected a uint8 (n_slices, S, S) volume, found {volume.dtype} {volume.shape}; "
                "delete it and run the prepare stage again"
            )
        self._volumes[study_uid] = volume
        if len(self._volumes) > self.max_open:
            self._volumes.popitem(last=False)
        return volume

    def vertebra_labels(self) -> pd.DataFrame:
        """Return vertebra_labels.csv, or an empty frame with its columns when it is absent."""
        import pandas as pd

        path = self.split_dir / "vertebra_labels.csv"
        if not path.is_file():
            return pd.DataFrame(columns=list(VERTEBRA_LABEL_COLUMNS))
        return pd.read_csv(path, dtype={"StudyInstanceUID": str})

    def close(self) -> None:
        """Drop every open memory map of this process."""
        self._volumes.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_volumes"] = OrderedDict()
        state["_slices"] = None
        return state
