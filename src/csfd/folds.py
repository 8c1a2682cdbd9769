"""Study-level folds, made once and read by every stage.

StratifiedGroupKFold groups by StudyInstanceUID (so no study is split across folds) and
stratifies on the fracture pattern, so each fold gets a similar share of positive studies.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from csfd.constants import VERTEBRAE
from csfd.io_utils import atomic_write_csv

logger = logging.getLogger(__name__)


def make_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Return StudyInstanceUID and fold for every study of `labels` (a train.csv frame)."""
    if labels["StudyInstanceUID"].duplicated().any():
        uid = labels.loc[labels["StudyInstanceUID"].duplicated(), "StudyInstanceUID"].iloc[0]
        raise ValueError(f"train.csv lists StudyInstanceUID {uid} more than once")
    if len(labels) < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {len(labels)} studies; lower folds.n_folds")
    # Stratify on the study's rarest fractured vertebra (0 for a negative study), so that the
    # positives of every vertebra, C3 and C4 included, spread over the folds and each fold's
    # training folds hold some of each.
    strata = np.zeros(len(labels), dtype=int)
    by_rarity = labels[list(VERTEBRAE)].sum().sort_values(ascending=False).index
    for rank, vertebra in enumerate(by_rarity, start=1):
        strata[labels[vertebra].to_numpy() > 0] = rank
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(labels), -1, dtype=int)
    for k, (_, valid_idx) in enumerate(splitter.split(labels, strata, groups=labels["StudyInstanceUID"])):
        fold[valid_idx] = k
    return pd.DataFrame({"StudyInstanceUID": labels["StudyInstanceUID"].to_numpy(), "fold": fold})


def write_folds(labels_csv: Path, folds_csv: Path, n_folds: int, seed: int, overwrite: bool = False) -> pd.DataFrame:
    """Make the folds once; an existing folds file is kept unless `overwrite` is set."""
    labels = pd.read_csv(labels_csv)
    if folds_csv.exists() and not overwrite:
        existing = pd.read_csv(folds_csv)
        missing = set(labels["StudyInstanceUID"]) - set(existing["StudyInstanceUID"])
        if missing:
            raise ValueError(
                f"{folds_csv} lacks {len(missing)} studies of {labels_csv} (for example {sorted(missing)[0]}); "
                "delete it or run folds with --overwrite to remake the folds"
            )
        logger.info("Folds already exist at %s; keeping them (use --overwrite to remake)", folds_csv)
        return existing
    folds = make_folds(labels, n_folds, seed)
    atomic_write_csv(folds, folds_csv)
    counts = folds.merge(labels, on="StudyInstanceUID").groupby("fold")["patient_overall"].agg(["size", "mean"])
    logger.info("Wrote %d folds to %s:\n%s", n_folds, folds_csv, counts.round(3).to_string())
    return folds


def read_folds(folds_csv: Path) -> pd.DataFrame:
    if not Path(folds_csv).is_file():
        raise FileNotFoundError(f"folds file not found: {folds_csv}; run `make folds` first")
    return pd.read_csv(folds_csv)
