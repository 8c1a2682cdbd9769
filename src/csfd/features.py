"""Per-study features for the stage-2 stacker, built from stage-1 slice predictions.

Input: one row per slice with StudyInstanceUID, position_index (0 is the most superior slice),
vis_C1..vis_C7 (probability that Ck is visible on the slice) and frac_C1..frac_C7 (probability
that Ck is fractured on the slice). Other columns, such as slice_number, are ignored.

A slice "shows" Ck when vis_Ck > VISIBLE_THRESHOLD. When no slice shows Ck, the statistics
over "the slices that show Ck" use the `top_k` slices with the highest vis_Ck instead. This way a
vertebra that the vertebra model detects only with low confidence still gets the best evidence.

Feature table (every name below exists for k = 1..7; the order of FEATURE_NAMES is fixed):

| name                         | meaning                                                                  |
|------------------------------|--------------------------------------------------------------------------|
| Ck_wmean                     | sum(vis * frac) / sum(vis) over all slices; the mean of frac when sum(vis) is 0 |
| Ck_max                       | max of frac over the slices that show Ck                                 |
| Ck_topk_mean                 | mean of the `top_k` largest frac values over the slices that show Ck     |
| Ck_q50, Ck_q90               | 0.5 and 0.9 quantiles of frac over the slices that show Ck               |
| Ck_n_visible                 | number of slices with vis > VISIBLE_THRESHOLD                            |
| Ck_vis_sum                   | sum of vis over all slices (expected number of slices that show Ck)      |
| Ck_extent                    | (last - first + 1) position_index of the slices that show Ck / slice count; 0 if none |
| Ck_extent_mm                 | the same span times the slice spacing in mm; NaN without spacing         |
| Ck_prev_wmean, _max, _topk_mean | C(k-1)_wmean, _max, _topk_mean; NaN for C1                            |
| Ck_next_wmean, _max, _topk_mean | C(k+1)_wmean, _max, _topk_mean; NaN for C7                            |
| study_n_slices               | slice count (from study_info, else the number of rows)                   |
| study_slice_spacing          | slice spacing in mm from study_info; NaN when not given                  |
| study_max_wmean              | max over C1..C7 of Ck_wmean                                              |
| study_max_max                | max over C1..C7 of Ck_max                                                |
| study_max_topk_mean          | max over C1..C7 of Ck_topk_mean                                          |
| study_noisy_or_wmean         | 1 - prod(1 - Ck_wmean)                                                   |
| study_sum_wmean              | sum over C1..C7 of Ck_wmean                                              |
| study_n_vertebrae_visible    | number of vertebrae with Ck_n_visible > 0                                |
| study_argmax_vertebra        | k (1..7) of the vertebra with the largest Ck_wmean                       |

The neighbour columns copy the adjacent vertebra's values, because fractures cluster at
adjacent levels and a booster restricted to one vertebra's columns would otherwise not see them.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from tqdm import tqdm

from csfd.constants import TARGETS, VERTEBRAE

logger = logging.getLogger(__name__)

VISIBLE_THRESHOLD = 0.5
DEFAULT_TOP_K = 5
# Below this total visibility a vertebra counts as never seen and Ck_wmean uses the plain mean.
MIN_VIS_SUM = 1e-9

VIS_COLUMNS = tuple(f"vis_{v}" for v in VERTEBRAE)
FRAC_COLUMNS = tuple(f"frac_{v}" for v in VERTEBRAE)
REQUIRED_SLICE_COLUMNS = ("StudyInstanceUID", "position_index") + VIS_COLUMNS + FRAC_COLUMNS

VERTEBRA_STATS = ("wmean", "max", "topk_mean", "q50", "q90", "n_visible", "vis_sum", "extent", "extent_mm")
NEIGHBOUR_STATS = ("wmean", "max", "topk_mean")
NEIGHBOUR_SIDES = ("prev", "next")
STUDY_FEATURES = (
    "study_n_slices",
    "study_slice_spacing",
    "study_max_wmean",
    "study_max_max",
    "study_max_topk_mean",
    "study_noisy_or_wmean",
    "study_sum_wmean",
    "study_n_vertebrae_visible",
    "study_argmax_vertebra",
)


def _vertebra_feature_names(vertebra: str) -> list[str]:
    names = [f"{vertebra}_{stat}" for stat in VERTEBRA_STATS]
    names += [f"{vertebra}_{side}_{stat}" for side in NEIGHBOUR_SIDES for stat in NEIGHBOUR_STATS]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(
    [name for vertebra in VERTEBRAE for name in _vertebra_feature_names(vertebra)] + list(STUDY_FEATURES)
)


def feature_names() -> list[str]:
    """Return the feature columns of build_features, in their fixed order."""
    return list(FEATURE_NAMES)


def _is_neighbour_copy(name: str) -> bool:
    parts = name.split("_")
    return len(parts) > 2 and parts[0] in VERTEBRAE and parts[1] in NEIGHBOUR_SIDES


def target_feature_columns(target: str, columns, scope: str = "local") -> list[str]:
    """Select the feature columns that the booster for `target` is trained on.

    scope "all": every column. scope "local", for Ck: the columns named Ck_* (its own statistics
    and the neighbour copies) plus every column that belongs to no vertebra (study_* and any
    custom column). scope "local", for patient_overall: every column except the neighbour
    copies, because they only duplicate other vertebrae's columns.
    """
    columns = list(columns)
    if scope == "all":
        return columns
    if scope != "local":
        raise ValueError(f"invalid feature scope {scope!r}; expected 'local' or 'all'")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if target == "patient_overall":
        return [c for c in columns if not _is_neighbour_copy(c)]
    vertebra_prefixes = tuple(f"{v}_" for v in VERTEBRAE)
    return [c for c in columns if c.startswith(f"{target}_") or not c.startswith(vertebra_prefixes)]


def validate_slices(slices: pd.DataFrame, source: str = "slices") -> pd.DataFrame:
    """Check a slice prediction frame and return a copy sorted by study and position_index.

    Raises ValueError naming `source`, the column and a study when a column is missing, a
    probability is outside [0, 1] or not finite, or a position_index is negative, not an
    integer or repeated within a study.
    """
    missing = [c for c in REQUIRED_SLICE_COLUMNS if c not in slices.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(missing)}; slice predictions need "
            f"StudyInstanceUID, position_index, vis_C1..vis_C7 and frac_C1..frac_C7"
        )
    if len(slices) == 0:
        raise ValueError(f"{source}: no slice rows")
    frame = slices[list(REQUIRED_SLICE_COLUMNS)].copy()
    if frame["StudyInstanceUID"].isna().any():
        raise ValueError(f"{source}: StudyInstanceUID is empty in {int(frame['StudyInstanceUID'].isna().sum())} row(s)")
    frame["StudyInstanceUID"] = frame["StudyInstanceUID"].astype(str)

    position = pd.to_numeric(frame["position_index"], errors="coerce")
    bad_position = position.isna() | (position < 0) | (position != np.floor(position))
    if bad_position.any():
        row = frame.loc[bad_position].iloc[0]
        raise ValueError(
            f"{source}: position_index {row['position_index']} of study {row['StudyInstanceUID']} "
            f"is not an integer >= 0"
        )
    frame["position_index"] = position.astype(np.int64)
    duplicated = frame.duplicated(["StudyInstanceUID", "position_index"])
    if duplicated.any():
        row = frame.loc[duplicated].iloc[0]
        raise ValueError(
            f"{source}: study {row['StudyInstanceUID']} has position_index {row['position_index']} "
            f"more than once; expected one row per slice"
        )

    for column in VIS_COLUMNS + FRAC_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce").astype(float)
        invalid = ~np.isfinite(values) | (values < 0.0) | (values > 1.0)
        if invalid.any():
            row_index = invalid[invalid].index[0]
            raise ValueError(
                f"{source}: {column} is {frame.at[row_index, column]} for study "
                f"{frame.at[row_index, 'StudyInstanceUID']}; expected a probability in [0, 1]"
            )
        frame[column] = values
    return frame.sort_values(["StudyInstanceUID", "position_index"], kind="mergesort").reset_index(drop=True)


def _study_table(frame: pd.DataFrame, study_info: pd.DataFrame | None) -> pd.DataFrame:
    """Return n_slices and slice_spacing per study, indexed by StudyInstanceUID."""
    counts = frame.groupby("StudyInstanceUID", sort=True).size()
    table = pd.DataFrame({"n_slices": counts.astype(float), "slice_spacing": np.nan}, index=counts.index)
    if study_info is None:
        logger.warning(
            "no study_info given: slice counts come from the slice rows, and study_slice_spacing "
            "and Ck_extent_mm are NaN"
        )
        return table

    info = study_info.copy()
    if "StudyInstanceUID" in info.columns:
        info = info.set_index("StudyInstanceUID")
    info.index = info.index.astype(str)
    if info.index.duplicated().any():
        raise ValueError(f"study_info: StudyInstanceUID {info.index[info.index.duplicated()][0]} appears twice")
    known = [c for c in ("n_slices", "slice_spacing") if c in info.columns]
    if not known:
        raise ValueError(
            f"study_info: expected a column n_slices or slice_spacing, got {', '.join(map(str, info.columns))}"
        )
    covered = table.index.intersection(info.index)
    uncovered = table.index.difference(info.index)
    if len(uncovered):
        logger.warning(
            "study_info has no row for %d of %d studies (for example %s): their slice count comes "
            "from the slice rows and their spacing is NaN",
            len(uncovered),
            len(table),
            uncovered[0],
        )
    for column in known:
        values = pd.to_numeric(info.loc[covered, column], errors="coerce").astype(float)
        invalid = values.notna() & ~(np.isfinite(values) & (values > 0))
        if invalid.any():
            uid = invalid[invalid].index[0]
            raise ValueError(f"study_info: {column} is {values[uid]} for study {uid}; expected a positive number")
        present = values.dropna()
        table.loc[present.index, column] = present
    return table


def _weighted_means(vis: np.ndarray, frac: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (wmean, fallback mask), both (studies, 7), for rows grouped by `starts`."""
    vis_sum = np.add.reduceat(vis, starts, axis=0)
    weighted = np.add.reduceat(vis * frac, starts, axis=0)
    counts = np.diff(np.append(starts, len(vis)))[:, None]
    plain_mean = np.add.reduceat(frac, starts, axis=0) / counts
    fallback = vis_sum <= MIN_VIS_SUM
    wmean = np.where(fallback, plain_mean, weighted / np.where(fallback, 1.0, vis_sum))
    return wmean, fallback


def _study_bounds(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return the sorted study ids and the first row of each in a frame sorted by study."""
    uid = frame["StudyInstanceUID"].to_numpy()
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    return uid[starts], starts


def _warn_fallback(mask: np.ndarray, uids: np.ndarray, what: str) -> None:
    if not mask.any():
        return
    study, vertebra = np.argwhere(mask)[0]
    logger.warning(
        "%d of %d (study, vertebra) pairs %s; for example %s %s",
        int(mask.sum()),
        mask.size,
        what,
        uids[study],
        VERTEBRAE[vertebra],
    )


def _vertebra_stats(
    vis: np.ndarray, frac: np.ndarray, position: np.ndarray, n_slices: float, spacing: float, top_k: int
) -> tuple[dict[str, float], bool]:
    """Return the statistics over the slices that show one vertebra, and whether they fell back."""
    visible = vis > VISIBLE_THRESHOLD
    n_visible = int(visible.sum())
    if n_visible:
        selected = frac[visible]
        span = int(position[visible].max() - position[visible].min() + 1)
    else:
        # Stable sort of rows already ordered by position_index, so ties resolve the same way
        # whatever the input row order was.
        selected = frac[np.argsort(-vis, kind="stable")[:top_k]]
        span = 0
    descending = np.sort(selected)[::-1]
    q50, q90 = np.quantile(selected, [0.5, 0.9])
    stats = {
        "max": float(descending[0]),
        "topk_mean": float(descending[:top_k].mean()),
        "q50": float(q50),
        "q90": float(q90),
        "n_visible": float(n_visible),
        "vis_sum": float(vis.sum()),
        "extent": span / n_slices,
        "extent_mm": span * spacing,  # NaN when the spacing is unknown
    }
    return stats, n_visible == 0


def build_features(
    slices: pd.DataFrame, study_info: pd.DataFrame | None = None, top_k: int = DEFAULT_TOP_K
) -> pd.DataFrame:
    """Build the per-study feature table (columns FEATURE_NAMES, index StudyInstanceUID, sorted).

    study_info: optional table with StudyInstanceUID (column or index) and n_slices and/or
    slice_spacing (mm). Without it the slice count is the number of rows of the study and the
    spacing is NaN. Every position_index must be below the study's slice count.
    The result does not depend on the row order of `slices`.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    frame = validate_slices(slices)
    table = _study_table(frame, study_info)
    uids, starts = _study_bounds(frame)
    vis = frame[list(VIS_COLUMNS)].to_numpy(dtype=float)
    frac = frame[list(FRAC_COLUMNS)].to_numpy(dtype=float)
    position = frame["position_index"].to_numpy()
    wmean, wmean_fallback = _weighted_means(vis, frac, starts)
    ends = np.append(starts[1:], len(frame))
    n_slices = table.loc[uids, "n_slices"].to_numpy()
    spacing = table.loc[uids, "slice_spacing"].to_numpy()

    last_position = np.maximum.reduceat(position, starts)
    too_far = last_position >= n_slices
    if too_far.any():
        i = int(np.flatnonzero(too_far)[0])
        raise ValueError(
            f"study {uids[i]}: position_index {last_position[i]} is not below the slice count "
            f"{int(n_slices[i])}; position_index must run 0..n_slices-1 (give study_info.n_slices "
            f"when only some slices have predictions)"
        )

    values = np.full((len(uids), len(FEATURE_NAMES)), np.nan)
    column = {name: j for j, name in enumerate(FEATURE_NAMES)}
    stats_fallback = np.zeros((len(uids), len(VERTEBRAE)), dtype=bool)
    per_vertebra = {stat: np.zeros((len(uids), len(VERTEBRAE))) for stat in VERTEBRA_STATS}
    per_vertebra["wmean"] = wmean
    for i in tqdm(range(len(uids)), desc="study features", unit="study", disable=None, leave=False):
        rows = slice(starts[i], ends[i])
        for k, vertebra in enumerate(VERTEBRAE):
            stats, fell_back = _vertebra_stats(
                vis[rows, k], frac[rows, k], position[rows], n_slices[i], spacing[i], top_k
            )
            stats_fallback[i, k] = fell_back
            for stat, value in stats.items():
                per_vertebra[stat][i, k] = value

    for k, vertebra in enumerate(VERTEBRAE):
        for stat in VERTEBRA_STATS:
            values[:, column[f"{vertebra}_{stat}"]] = per_vertebra[stat][:, k]
        for side, neighbour in (("prev", k - 1), ("next", k + 1)):
            if 0 <= neighbour < len(VERTEBRAE):
                for stat in NEIGHBOUR_STATS:
                    values[:, column[f"{vertebra}_{side}_{stat}"]] = per_vertebra[stat][:, neighbour]

    study = {
        "study_n_slices": n_slices,
        "study_slice_spacing": spacing,
        "study_max_wmean": wmean.max(axis=1),
        "study_max_max": per_vertebra["max"].max(axis=1),
        "study_max_topk_mean": per_vertebra["topk_mean"].max(axis=1),
        "study_noisy_or_wmean": 1.0 - np.prod(1.0 - wmean, axis=1),
        "study_sum_wmean": wmean.sum(axis=1),
        "study_n_vertebrae_visible": (per_vertebra["n_visible"] > 0).sum(axis=1).astype(float),
        "study_argmax_vertebra": wmean.argmax(axis=1).astype(float) + 1.0,
    }
    for name, array in study.items():
        values[:, column[name]] = array

    _warn_fallback(wmean_fallback, uids, "have sum(vis) = 0, so Ck_wmean is the plain mean of frac")
    _warn_fallback(
        stats_fallback,
        uids,
        f"have no slice with vis > {VISIBLE_THRESHOLD}, so max, top-k and quantiles use the "
        f"{top_k} slices with the highest vis",
    )
    features = pd.DataFrame(values, index=pd.Index(uids, name="StudyInstanceUID"), columns=list(FEATURE_NAMES))
    return features


def _wide_from_vertebra_probabilities(uids, vertebra_probabilities: np.ndarray) -> pd.DataFrame:
    wide = pd.DataFrame(vertebra_probabilities, columns=list(VERTEBRAE))
    wide.insert(0, "patient_overall", 1.0 - np.prod(1.0 - vertebra_probabilities, axis=1))
    wide.insert(0, "StudyInstanceUID", np.asarray(uids, dtype=object))
    return wide


def aggregate_predictions(slices: pd.DataFrame) -> pd.DataFrame:
    """Aggregate slice predictions without a model: Ck = Ck_wmean, patient_overall = 1 - prod(1 - Ck).

    Returns a wide frame with the columns StudyInstanceUID, patient_overall, C1..C7, one row
    per study sorted by StudyInstanceUID. Equals aggregate_from_features(build_features(slices)).
    """
    frame = validate_slices(slices)
    uids, starts = _study_bounds(frame)
    vis = frame[list(VIS_COLUMNS)].to_numpy(dtype=float)
    frac = frame[list(FRAC_COLUMNS)].to_numpy(dtype=float)
    wmean, fallback = _weighted_means(vis, frac, starts)
    _warn_fallback(fallback, uids, "have sum(vis) = 0, so Ck is the plain mean of frac")
    return _wide_from_vertebra_probabilities(uids, wmean)


def aggregate_from_features(features: pd.DataFrame) -> pd.DataFrame:
    """Return the plain aggregation from the Ck_wmean columns of a build_features table.

    Rows keep the order of `features`; its index must be StudyInstanceUID.
    """
    columns = [f"{v}_wmean" for v in VERTEBRAE]
    missing = [c for c in columns if c not in features.columns]
    if missing:
        raise ValueError(f"features: missing column(s) {', '.join(missing)} needed for the plain aggregation")
    return _wide_from_vertebra_probabilities(features.index, features[columns].to_numpy(dtype=float))
