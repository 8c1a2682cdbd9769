"""Stage 2: a LightGBM stacker from per-study features to the eight patient-level probabilities.

Training (train_stacker) uses the same study-to-fold map as stage 1. For each fold k and each
target (patient_overall, C1..C7) one booster is trained on the other folds' studies only. Early
stopping watches an inner split of those training studies (stratified by the target, seeded),
never fold k, and fold k is predicted at the best iteration. These fold-k predictions are the
out-of-fold (OOF) predictions that every reported score uses. With stack.init_from_aggregate
the boosters start from the plain aggregation's log-odds (LightGBM's init_score) and learn
corrections to it; prediction adds the same init score back.

Post-processing (stack_postprocess), chosen from small grids by the per-study metric:
- patient_overall = w * learned + (1 - w) * (1 - prod(1 - Ck)), with w from BLEND_GRID;
- each target is clipped to [low, high], low from CLIP_LOWER_GRID but no lower than
  stack.clip_min, high from 1 - CLIP_LOWER_GRID but no higher than stack.clip_max.
The reported OOF scores apply to fold k the choice made on the other folds' OOF predictions.
The choice saved for prediction is made on all OOF predictions.

Stack folder (out_dir):
    stacker.json                  feature names per target, LightGBM params, folds, blend, clip
    fold<k>/<target>.txt          booster text, truncated at its best iteration
    features_oof.csv              StudyInstanceUID, fold, feature columns
    oof_predictions.csv           StudyInstanceUID, patient_overall, C1..C7 (stacker, out of fold)
    cv.csv                        per-fold and mean scores of every method (see stack_report.cv_table)
    feature_importance.csv/.png   gain importances averaged over folds
    summary.json                  mean scores and better_method ("stacker" or "aggregate"); written last
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from csfd.config import ExperimentConfig, StackConfig
from csfd.constants import TARGETS, VERTEBRAE
from csfd.features import aggregate_from_features, aggregate_predictions, build_features, target_feature_columns
from csfd.features import validate_slices
from csfd.io_utils import atomic_path, atomic_write_csv, atomic_write_text
from csfd.stack_postprocess import (
    BLEND_GRID,
    CLIP_LOWER_GRID,
    PostProcess,
    apply_postprocess,
    choose_postprocess,
    clip_candidates,
    nested_postprocess,
)
from csfd.stack_params import SAMPLE_WEIGHTINGS, resolve_training_params, target_weight_table
from csfd.stack_report import (
    best_constant_oof,
    cv_table,
    folds_by_study,
    importance_table,
    labels_by_study,
    mean_scores,
    prior_oof,
    write_importance,
)

logger = logging.getLogger(__name__)

STACKER_JSON = "stacker.json"
SUMMARY_JSON = "summary.json"
FORMAT_VERSION = 1
METHODS = ("stacker", "aggregate")
# The aggregation is clipped to [c, 1 - c] before its log-odds become the init score.
INIT_PROBABILITY_CLIP = 1e-4


@dataclass
class StackResult:
    """Outputs of train_stacker; the files they come from are in out_dir."""

    out_dir: Path
    oof: pd.DataFrame  # StudyInstanceUID, patient_overall, C1..C7: the reported stacker OOF
    oof_raw: pd.DataFrame  # indexed by StudyInstanceUID: fold and each booster's raw OOF output
    cv: pd.DataFrame
    feature_importance: pd.DataFrame
    better_method: str
    postprocess: PostProcess
    best_iterations: dict[str, list[int]]  # target -> best iteration per fold, in fold order
    # (fold, target) -> (studies the booster was fit on, studies early stopping watched)
    inner_splits: dict[tuple[int, str], tuple[list[str], list[str]]] = field(repr=False, default_factory=dict)


def _validated_features(features: pd.DataFrame, source: str = "features") -> pd.DataFrame:
    frame = features.copy()
    if "StudyInstanceUID" in frame.columns:
        frame = frame.set_index("StudyInstanceUID")
    if frame.index.name != "StudyInstanceUID":
        raise ValueError(
            f"{source}: expected the index (or a column) StudyInstanceUID, got index {frame.index.name!r}; "
            f"rows are matched by study, never by position"
        )
    frame.index = frame.index.astype(str)
    if frame.index.duplicated().any():
        raise ValueError(f"{source}: StudyInstanceUID {frame.index[frame.index.duplicated()][0]} appears twice")
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(f"{source}: column(s) {', '.join(map(str, non_numeric))} are not numeric")
    frame = frame.astype(float)
    infinite = np.isinf(frame.to_numpy())
    if infinite.any():
        row, col = np.argwhere(infinite)[0]
        raise ValueError(f"{source}: {frame.columns[col]} is infinite for study {frame.index[row]}")
    return frame


def _inner_split(
    train_index: pd.Index, y: np.ndarray, fraction: float, seed: int, booster_id: str
) -> tuple[pd.Index, pd.Index]:
    """Split the training studies into fit and early-stopping parts, stratified by y."""
    stratify = y
    if np.bincount(y.astype(int), minlength=2).min() < 2:
        logger.warning(
            "%s: fewer than 2 studies of one class, so the early-stopping split is not stratified", booster_id
        )
        stratify = None
    fit, stop = train_test_split(
        np.arange(len(train_index)), test_size=fraction, stratify=stratify, random_state=seed, shuffle=True
    )
    return train_index[np.sort(fit)], train_index[np.sort(stop)]


def _split_seed(seed: int, fold: int, target_index: int) -> int:
    return int(np.random.SeedSequence([seed, fold, target_index]).generate_state(1)[0])


def _train_booster(
    X: pd.DataFrame,
    y: pd.Series,
    weights: pd.Series,
    fit: pd.Index,
    stop: pd.Index,
    columns: list[str],
    params: dict,
    stack_config: StackConfig,
    base: pd.Series | None = None,
) -> lgb.Booster:
    """Train one booster with early stopping on `stop`; `base` contains per-study init scores (log-odds)."""
    fit_weights = weights.loc[fit].to_numpy()
    # Normalise to mean 1 on the fit rows so that min_sum_hessian_in_leaf and lambda_l2 keep
    # the scale they have without weights.
    scale = fit_weights.mean()
    train_set = lgb.Dataset(
        X.loc[fit, columns], y.loc[fit].to_numpy(), weight=fit_weights / scale, feature_name=columns,
        init_score=None if base is None else base.loc[fit].to_numpy(), free_raw_data=True,
    )
    stop_set = lgb.Dataset(
        X.loc[stop, columns], y.loc[stop].to_numpy(), weight=weights.loc[stop].to_numpy() / scale,
        init_score=None if base is None else base.loc[stop].to_numpy(), reference=train_set,
    )
    return lgb.train(
        params,
        train_set,
        num_boost_round=stack_config.num_boost_round,
        valid_sets=[stop_set],
        valid_names=["inner"],
        callbacks=[lgb.early_stopping(stack_config.early_stopping_rounds, verbose=False)],
    )


def aggregate_log_odds(X: pd.DataFrame) -> pd.DataFrame:
    """Return the plain aggregation of each study as log-odds (studies x targets), the init score."""
    probabilities = aggregate_from_features(X).set_index("StudyInstanceUID")[list(TARGETS)]
    p = probabilities.to_numpy(dtype=float).clip(INIT_PROBABILITY_CLIP, 1.0 - INIT_PROBABILITY_CLIP)
    return pd.DataFrame(np.log(p / (1.0 - p)), index=X.index, columns=list(TARGETS))


def _booster_probability(booster: lgb.Booster, X: pd.DataFrame, base: pd.Series | None, num_iteration=None) -> np.ndarray:
    """Return P(target) from `booster`, adding the init score `base` (log-odds) when given."""
    if base is None:
        return booster.predict(X, num_iteration=num_iteration, validate_features=True)
    raw = booster.predict(X, num_iteration=num_iteration, raw_score=True, validate_features=True)
    return 1.0 / (1.0 + np.exp(-(raw + base.to_numpy())))


def _check_stack_config(stack_config: StackConfig) -> None:
    if stack_config.num_boost_round < 1:
        raise ValueError(f"stack.num_boost_round: expected 1 or more, got {stack_config.num_boost_round}")
    if stack_config.early_stopping_rounds < 1:
        raise ValueError(f"stack.early_stopping_rounds: expected 1 or more, got {stack_config.early_stopping_rounds}")
    if not 0.0 < stack_config.inner_valid_fraction < 1.0:
        raise ValueError(
            f"stack.inner_valid_fraction: expected a value in (0, 1), got {stack_config.inner_valid_fraction}"
        )
    if not 0.0 < stack_config.clip_min < stack_config.clip_max < 1.0:
        raise ValueError("stack.clip_min and stack.clip_max must satisfy 0 < clip_min < clip_max < 1")


def _align_inputs(
    X: pd.DataFrame, labels: pd.DataFrame, folds: pd.DataFrame | pd.Series
) -> tuple[pd.DataFrame, pd.Series]:
    """Return labels and folds restricted to the feature studies, in their order."""
    label_frame = labels_by_study(labels)
    fold_of = folds if isinstance(folds, pd.Series) else folds_by_study(folds)
    for name, index in (("labels", label_frame.index), ("folds", fold_of.index)):
        missing = X.index.difference(index)
        if len(missing):
            raise ValueError(
                f"{name}: {len(missing)} studies with features are missing, for example {missing[0]}; "
                f"every study with features needs a label and a fold"
            )
        unused = index.difference(X.index)
        if len(unused):
            logger.warning(
                "%d studies of %s have no features and are left out of the stacker, for example %s",
                len(unused),
                name,
                unused[0],
            )
    fold_of = fold_of.loc[X.index]
    if fold_of.nunique() < 2:
        raise ValueError(f"folds: the studies with features span {fold_of.nunique()} fold(s); need at least 2")
    return label_frame.loc[X.index], fold_of


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@dataclass
class _TrainedBoosters:
    """Raw OOF outputs and bookkeeping of every fold's boosters."""

    raw: pd.DataFrame  # indexed by StudyInstanceUID, columns TARGETS
    best_iterations: dict[str, list[int]]
    gains: dict[tuple[int, str], pd.Series]
    inner_splits: dict[tuple[int, str], tuple[list[str], list[str]]]


def _train_boosters(
    X: pd.DataFrame,
    label_frame: pd.DataFrame,
    fold_of: pd.Series,
    weights: pd.DataFrame,
    target_columns: dict[str, list[str]],
    params: dict,
    stack_config: StackConfig,
    seed: int,
    out_dir: Path,
    base: pd.DataFrame | None = None,
) -> _TrainedBoosters:
    """Train and save one booster per fold and target; predict each fold with its own boosters.

    `base` (studies x targets, log-odds) is the init score the boosters start from, or None.
    """
    trained = _TrainedBoosters(
        raw=pd.DataFrame(np.nan, index=X.index, columns=list(TARGETS)),
        best_iterations={t: [] for t in TARGETS},
        gains={},
        inner_splits={},
    )
    jobs = [(int(fold), j, target) for fold in sorted(fold_of.unique()) for j, target in enumerate(TARGETS)]
    for fold, j, target in tqdm(jobs, desc="stacker boosters", unit="booster", disable=None):
        valid = fold_of.index[fold_of == fold]
        train = fold_of.index[fold_of != fold]
        y = label_frame[target]
        booster_id = f"fold {fold} target {target}"
        if y.loc[train].nunique() < 2:
            raise ValueError(
                f"{booster_id}: the training folds contain only label {int(y.loc[train].iloc[0])}, so no "
                f"booster can be trained; use more studies or fewer folds"
            )
        fit, stop = _inner_split(
            train, y.loc[train].to_numpy(), stack_config.inner_valid_fraction, _split_seed(seed, fold, j), booster_id
        )
        if valid.intersection(fit).size or valid.intersection(stop).size:
            raise RuntimeError(f"{booster_id}: the reported fold overlaps the training rows; the fold split is wrong")

        columns = target_columns[target]
        target_base = None if base is None else base[target]
        booster = _train_booster(X, y, weights[target], fit, stop, columns, params, stack_config, target_base)
        # LightGBM stops before num_boost_round when no leaf can be split any more. It then drops
        # the last, empty tree, so best_iteration can exceed the number of trees kept by one.
        best = min(booster.best_iteration, booster.current_iteration()) or booster.current_iteration()
        trained.raw.loc[valid, target] = _booster_probability(
            booster, X.loc[valid, columns], None if target_base is None else target_base.loc[valid], best
        )

        model_path = out_dir / f"fold{fold}" / f"{target}.txt"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(model_path) as tmp:
            booster.save_model(tmp, num_iteration=best)
        trained.gains[(fold, target)] = pd.Series(
            booster.feature_importance("gain", iteration=best), index=booster.feature_name(), dtype=float
        )
        trained.best_iterations[target].append(int(best))
        trained.inner_splits[(fold, target)] = (list(fit), list(stop))
        inner_score = next(iter(booster.best_score["inner"].values()))
        logger.info(
            "fold=%d target=%s best_iteration=%d inner_score=%.5f fit_studies=%d stop_studies=%d",
            fold, target, best, inner_score, len(fit), len(stop),
        )
    return trained


def _oof_methods(
    raw: pd.DataFrame,
    X: pd.DataFrame,
    label_frame: pd.DataFrame,
    fold_of: pd.Series,
    aggregate: pd.DataFrame | None,
    blend_grid,
    lowers: list[float],
    uppers: list[float],
) -> dict[str, pd.DataFrame]:
    """Return every compared method's wide OOF predictions; "stacker" is the reported one."""
    predictions = {
        "prior": prior_oof(label_frame, fold_of),
        "best_constant": best_constant_oof(label_frame, fold_of, "per_study"),
    }
    if aggregate is None and all(f"{v}_wmean" in X.columns for v in VERTEBRAE):
        aggregate = aggregate_from_features(X)
    if aggregate is None:
        logger.warning("features have no Ck_wmean columns and no aggregate was given, so only the stacker is compared")
    else:
        predictions["aggregate"] = aggregate
    variants = {"stacker_overall_learned": (1.0,), "stacker_overall_from_vertebrae": (0.0,), "stacker": blend_grid}
    for method, grid in variants.items():
        predictions[method] = nested_postprocess(raw, fold_of, label_frame, grid, lowers, uppers).reset_index()
    return predictions


def train_stacker(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    folds: pd.DataFrame | pd.Series,
    stack_config: StackConfig,
    out_dir: str | Path,
    seed: int,
    *,
    sample_weighting: str = "per_study",
    feature_scope: str = "local",
    aggregate: pd.DataFrame | None = None,
    blend_grid=BLEND_GRID,
    clip_lower_grid=CLIP_LOWER_GRID,
) -> StackResult:
    """Train one booster per fold and target, score them out of fold and write the stack folder.

    features: indexed (or with a column) StudyInstanceUID, numeric columns; NaN is allowed.
    labels: train.csv's layout. folds: StudyInstanceUID, fold (or a Series uid -> fold).
    sample_weighting: "per_study" (weights that make the booster's log loss the competition's
    per-study form), "flat" (the metric's 1/2 and 7/14 row weights) or "none".
    feature_scope: "local" or "all", see features.target_feature_columns.
    aggregate: the plain aggregation's wide predictions for the same studies. By default it
    comes from the Ck_wmean columns, and without them it is left out of the comparison.
    """
    _check_stack_config(stack_config)
    if sample_weighting not in SAMPLE_WEIGHTINGS:
        raise ValueError(f"invalid sample_weighting {sample_weighting!r}; expected one of {', '.join(SAMPLE_WEIGHTINGS)}")
    params = resolve_training_params(stack_config.params, seed)
    X = _validated_features(features).sort_index()
    not_features = [c for c in X.columns if not isinstance(c, str) or c in TARGETS or c == "fold"]
    if not_features:
        raise ValueError(
            f"features: column(s) {', '.join(map(str, not_features))} are labels, folds or unnamed; "
            f"features must be named strings and must not contain labels or folds"
        )
    label_frame, fold_of = _align_inputs(X, labels, folds)
    weights = target_weight_table(label_frame, sample_weighting)
    target_columns = {t: target_feature_columns(t, X.columns, feature_scope) for t in TARGETS}
    for target, columns in target_columns.items():
        if not columns:
            raise ValueError(f"feature scope {feature_scope!r} leaves no feature column for target {target}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fold_ids = [int(k) for k in sorted(fold_of.unique())]

    base = None
    if stack_config.init_from_aggregate:
        if all(f"{v}_wmean" in X.columns for v in VERTEBRAE):
            base = aggregate_log_odds(X)
        else:
            logger.warning("stack.init_from_aggregate: the features have no Ck_wmean columns, so the boosters start from the prevalence")
    trained = _train_boosters(X, label_frame, fold_of, weights, target_columns, params, stack_config, seed, out_dir, base)

    lowers, uppers = clip_candidates(stack_config, clip_lower_grid)
    final = choose_postprocess(trained.raw, label_frame, blend_grid, lowers, uppers)
    logger.info("post-processing chosen on all OOF predictions: blend_weight=%.2f clip=%s", final.blend_weight, final.clip)
    predictions = _oof_methods(trained.raw, X, label_frame, fold_of, aggregate, blend_grid, lowers, uppers)
    table = cv_table(label_frame, fold_of, predictions, out_dir)
    scores = mean_scores(table)
    better = "stacker" if "aggregate" not in scores or scores["stacker"] < scores["aggregate"] else "aggregate"
    logger.info("cross-validation (mean over folds):\n%s", table[table["fold"] == "mean"].to_string(index=False))

    importance = importance_table(trained.gains)
    write_importance(importance, out_dir)
    features_out = X.reset_index()
    features_out.insert(1, "fold", fold_of.to_numpy())
    atomic_write_csv(features_out, out_dir / "features_oof.csv")
    oof = predictions["stacker"]
    atomic_write_csv(oof, out_dir / "oof_predictions.csv")
    _write_json(
        out_dir / STACKER_JSON,
        {
            "format_version": FORMAT_VERSION,
            "lightgbm_version": lgb.__version__,
            "feature_names": list(X.columns),
            "target_features": target_columns,
            "folds": fold_ids,
            "params": params,
            "num_boost_round": stack_config.num_boost_round,
            "early_stopping_rounds": stack_config.early_stopping_rounds,
            "inner_valid_fraction": stack_config.inner_valid_fraction,
            "init_from_aggregate": base is not None,
            "sample_weighting": sample_weighting,
            "feature_scope": feature_scope,
            "seed": seed,
            "best_iterations": trained.best_iterations,
            "blend_grid": list(blend_grid),
            "clip_lower_candidates": lowers,
            "clip_upper_candidates": uppers,
            "blend_weight": final.blend_weight,
            "clip": {t: list(bounds) for t, bounds in final.clip.items()},
        },
    )
    # summary.json comes last: its presence marks a complete stack folder.
    _write_json(
        out_dir / SUMMARY_JSON,
        {
            "better_method": better,
            "per_study_mean": scores,
            "flat_mean": mean_scores(table, "flat"),
            "n_studies": len(X),
            "folds": fold_ids,
        },
    )
    oof_raw = trained.raw.copy()
    oof_raw.insert(0, "fold", fold_of)
    return StackResult(
        out_dir=out_dir,
        oof=oof,
        oof_raw=oof_raw,
        cv=table,
        feature_importance=importance,
        better_method=better,
        postprocess=final,
        best_iterations=trained.best_iterations,
        inner_splits=trained.inner_splits,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; train the stacker (run_stack) into {path.parent} first")
    return json.loads(path.read_text())


def predict_stacker(
    features: pd.DataFrame, stack_dir: str | Path, method: str = "auto", fold_of: pd.Series | None = None
) -> pd.DataFrame:
    """Predict patient_overall and C1..C7 for each study of `features` from a stack folder.

    method "auto" uses summary.json's better_method; "stacker" averages every fold's booster
    per target and applies the saved blend and clip; "aggregate" uses the Ck_wmean columns.
    With `fold_of` (StudyInstanceUID -> fold) each study gets only its own fold's boosters,
    which were trained without it: out-of-fold predictions of training studies.
    features must have exactly the training feature columns (any order); rows are matched by
    StudyInstanceUID. Returns StudyInstanceUID, patient_overall, C1..C7 in the input row order.
    """
    stack_dir = Path(stack_dir)
    model = _read_json(stack_dir / STACKER_JSON)
    if method == "auto":
        method = _read_json(stack_dir / SUMMARY_JSON)["better_method"]
    if method not in METHODS:
        raise ValueError(f"invalid method {method!r}; expected auto, stacker or aggregate")

    X = _validated_features(features)
    expected = model["feature_names"]
    missing = [c for c in expected if c not in X.columns]
    extra = [c for c in X.columns if c not in expected]
    if missing:
        raise ValueError(f"features: missing column(s) {', '.join(missing)} that the stacker in {stack_dir} needs")
    if extra:
        raise ValueError(
            f"features: unexpected column(s) {', '.join(map(str, extra))} that the stacker in {stack_dir} "
            f"was not trained on; drop them or retrain"
        )
    if method == "aggregate":
        return aggregate_from_features(X)

    raw = pd.DataFrame(index=X.index, columns=list(TARGETS), dtype=float)
    base = aggregate_log_odds(X) if model.get("init_from_aggregate", False) else None
    for target in TARGETS:
        fold_predictions = []
        for fold in model["folds"]:
            path = stack_dir / f"fold{fold}" / f"{target}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; the stack folder {stack_dir} is incomplete, retrain it")
            booster = lgb.Booster(model_file=str(path))
            names = booster.feature_name()
            if names != model["target_features"][target]:
                raise ValueError(
                    f"{path}: booster features differ from {STACKER_JSON}'s list for {target}; the folder "
                    f"mixes runs, retrain it"
                )
            fold_predictions.append(_booster_probability(booster, X[names], None if base is None else base[target]))
        if fold_of is None:
            raw[target] = np.mean(fold_predictions, axis=0)
        else:
            own_fold = fold_of.loc[X.index].to_numpy()
            chosen = np.full(len(X), np.nan)
            for fold, predictions in zip(model["folds"], fold_predictions):
                chosen[own_fold == fold] = predictions[own_fold == fold]
            if np.isnan(chosen).any():
                raise ValueError(f"fold_of names folds that {stack_dir} has no boosters for")
            raw[target] = chosen
    postprocess = PostProcess(
        blend_weight=float(model["blend_weight"]), clip={t: tuple(b) for t, b in model["clip"].items()}
    )
    return apply_postprocess(raw, postprocess).reset_index()


def _study_info_from_cache(config: ExperimentConfig) -> pd.DataFrame | None:
    """Return n_slices and slice_spacing (median |dz| in mm) per study from the prepared slice table."""
    path = Path(config.paths.cache_dir) / "train" / "slices.csv"
    if not path.is_file():
        logger.warning("%s not found, so the stacker features have no slice spacing", path)
        return None
    table = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    missing = [c for c in ("StudyInstanceUID", "position_index", "z") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; rerun the prepare stage")
    table = table.sort_values(["StudyInstanceUID", "position_index"], kind="mergesort")
    step = table.groupby("StudyInstanceUID")["z"].diff().abs()
    grouped = step.groupby(table["StudyInstanceUID"])
    return pd.DataFrame(
        {"n_slices": table.groupby("StudyInstanceUID").size(), "slice_spacing": grouped.median()}
    ).rename_axis("StudyInstanceUID")


def _read_oof_slices(config: ExperimentConfig, fold_of: pd.Series) -> pd.DataFrame:
    """Read every fold's oof_slices.csv and check that each holds only its own fold's studies."""
    fold_ids = [int(k) for k in sorted(fold_of.unique())]
    paths = {k: config.run_dir(k) / "oof_slices.csv" for k in fold_ids}
    absent = [k for k, path in paths.items() if not path.is_file()]
    if absent:
        raise FileNotFoundError(
            f"experiment {config.name}: out-of-fold slice predictions missing for fold(s) "
            f"{', '.join(map(str, absent))} ({', '.join(str(paths[k]) for k in absent)}); "
            f"train and predict those folds first"
        )
    frames = []
    seen: dict[str, int] = {}
    for fold, path in tqdm(paths.items(), desc="read OOF slices", unit="fold", disable=None):
        frame = validate_slices(pd.read_csv(path, dtype={"StudyInstanceUID": str}), source=str(path))
        studies = pd.Index(frame["StudyInstanceUID"].unique())
        unknown = studies.difference(fold_of.index)
        if len(unknown):
            raise ValueError(f"{path}: study {unknown[0]} is not in the folds CSV {config.paths.folds_csv}")
        foreign = studies[fold_of.loc[studies].to_numpy() != fold]
        if len(foreign):
            raise ValueError(
                f"{path}: study {foreign[0]} belongs to fold {fold_of[foreign[0]]}, not fold {fold}; the OOF "
                f"file must hold only its own fold's studies, or stage 2 would train on leaked predictions"
            )
        repeated = [uid for uid in studies if uid in seen]
        if repeated:
            raise ValueError(f"{path}: study {repeated[0]} also appears in fold {seen[repeated[0]]}'s OOF file")
        seen.update({uid: fold for uid in studies})
        absent_studies = fold_of.index[fold_of == fold].difference(studies)
        if len(absent_studies):
            logger.warning(
                "%s: %d studies of fold %d have no slice predictions, for example %s",
                path, len(absent_studies), fold, absent_studies[0],
            )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def run_stack(config: ExperimentConfig) -> StackResult:
    """Build features from every fold's OOF slice predictions and train the stacker.

    Writes into config.run_dir() / "stack". Raises FileNotFoundError naming the folds whose
    oof_slices.csv is absent, and ValueError when a fold's file contains another fold's study.
    """
    folds_path = Path(config.paths.folds_csv)
    if not folds_path.is_file():
        raise FileNotFoundError(f"folds CSV {folds_path} not found; make the folds first")
    fold_of = folds_by_study(pd.read_csv(folds_path, dtype={"StudyInstanceUID": str}))
    if fold_of.nunique() != config.folds.n_folds:
        raise ValueError(
            f"{folds_path} has {fold_of.nunique()} folds but folds.n_folds is {config.folds.n_folds}; "
            f"remake the folds or fix the config"
        )
    labels_path = Path(config.paths.data_dir) / "train.csv"
    if not labels_path.is_file():
        raise FileNotFoundError(f"labels {labels_path} not found; set paths.data_dir to the competition data")
    labels = pd.read_csv(labels_path, dtype={"StudyInstanceUID": str})

    slices = _read_oof_slices(config, fold_of)
    features = build_features(slices, _study_info_from_cache(config))
    aggregate = aggregate_predictions(slices)
    result = train_stacker(
        features, labels, fold_of, config.stack, config.run_dir() / "stack", config.seed, aggregate=aggregate
    )
    logger.info("stacker written to %s; better method by mean per-study CV: %s", result.out_dir, result.better_method)
    return result
