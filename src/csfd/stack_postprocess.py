"""Post-processing of the stacker's raw outputs: patient_overall blend and clipping.

patient_overall = w * learned + (1 - w) * (1 - prod(1 - Ck)), with w from BLEND_GRID, and each
target is clipped to [low, high]. Both are chosen from small grids by the per-study metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from csfd.config import StackConfig
from csfd.constants import TARGETS
from csfd.metric import _weighted_losses, overall_from_vertebrae

BLEND_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# Candidate lower clip bounds; the upper candidates are 1 - these. Candidates beyond
# stack.clip_min / stack.clip_max are dropped and those two bounds are always candidates.
CLIP_LOWER_GRID = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05)


@dataclass(frozen=True)
class PostProcess:
    """Blend weight of the learned patient_overall and per-target clip range."""

    blend_weight: float
    clip: dict[str, tuple[float, float]]


def clip_candidates(stack_config: StackConfig, lower_grid) -> tuple[list[float], list[float]]:
    """Return lower candidates ascending and upper candidates descending (least clipping first)."""
    lowers = sorted({stack_config.clip_min, *[v for v in lower_grid if v >= stack_config.clip_min]})
    uppers = sorted({stack_config.clip_max, *[1.0 - v for v in lower_grid if 1.0 - v <= stack_config.clip_max]})
    return lowers, uppers[::-1]


def apply_postprocess(raw: pd.DataFrame, postprocess: PostProcess) -> pd.DataFrame:
    """Blend patient_overall and clip every target of raw booster outputs (columns TARGETS)."""
    out = raw[list(TARGETS)].copy()
    from_vertebrae = overall_from_vertebrae(raw)
    out["patient_overall"] = postprocess.blend_weight * raw["patient_overall"] + (
        1.0 - postprocess.blend_weight
    ) * from_vertebrae
    for target in TARGETS:
        low, high = postprocess.clip[target]
        out[target] = out[target].clip(low, high)
    return out


def _per_study_contributions(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return each target's share of the per-study metric; the shares sum to competition_score's per_study.

    Uses the metric module's own weights and clipping, so the two cannot drift apart.
    """
    weights, bce = _weighted_losses(y, p)
    return (weights * bce / weights.sum(axis=1, keepdims=True)).mean(axis=0)


def choose_postprocess(
    raw: pd.DataFrame, labels: pd.DataFrame, blend_grid, lowers: list[float], uppers: list[float]
) -> PostProcess:
    """Pick the blend weight and per-target clip bounds with the best per-study metric.

    raw and labels: indexed by StudyInstanceUID with columns TARGETS. The per-study metric is a
    sum of per-target shares whose per-study normalisers depend on labels only, so the blend
    weight and each target's lower and upper bound are chosen one at a time. A later candidate
    must score strictly better, so ties keep the least clipping.
    """
    y = labels.loc[raw.index, list(TARGETS)].to_numpy(dtype=float)
    values = raw[list(TARGETS)].to_numpy(dtype=float)
    learned = values[:, 0].copy()
    from_vertebrae = overall_from_vertebrae(raw).to_numpy()
    best_weight, best_score = float(blend_grid[0]), np.inf
    for weight in blend_grid:
        values[:, 0] = weight * learned + (1.0 - weight) * from_vertebrae
        score = _per_study_contributions(y, values)[0]
        if score < best_score:
            best_weight, best_score = float(weight), score
    values[:, 0] = best_weight * learned + (1.0 - best_weight) * from_vertebrae

    bounds = {}
    for side, candidates in (("lower", lowers), ("upper", uppers)):
        best = np.full(len(TARGETS), np.nan)
        best_scores = np.full(len(TARGETS), np.inf)
        for bound in candidates:
            clipped = np.maximum(values, bound) if side == "lower" else np.minimum(values, bound)
            scores = _per_study_contributions(y, clipped)
            better = scores < best_scores
            best[better], best_scores[better] = bound, scores[better]
        bounds[side] = best
    clip = {t: (float(bounds["lower"][j]), float(bounds["upper"][j])) for j, t in enumerate(TARGETS)}
    return PostProcess(blend_weight=best_weight, clip=clip)


def nested_postprocess(
    raw: pd.DataFrame, fold_of: pd.Series, labels: pd.DataFrame, blend_grid, lowers, uppers
) -> pd.DataFrame:
    """Post-process each fold with the choice made on the other folds' OOF predictions.

    NOTE: those other folds' predictions come from boosters that were trained partly on this
    fold's labels, so the choice is not fully independent of them. It is two scalars per
    target, so the optimism this leaves in the reported score should be small (not measured).
    """
    parts = []
    for fold in sorted(fold_of.unique()):
        others = fold_of.index[fold_of != fold]
        own = fold_of.index[fold_of == fold]
        chosen = choose_postprocess(raw.loc[others], labels, blend_grid, lowers, uppers)
        parts.append(apply_postprocess(raw.loc[own], chosen))
    return pd.concat(parts).loc[raw.index]
