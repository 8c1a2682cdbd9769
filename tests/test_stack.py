"""Tests of the stage-2 stacker: leakage guards, saved boosters, prediction safety, CV outputs.

Every test trains real LightGBM boosters on small seeded synthetic studies and scores them with
the shared competition metric.
"""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from csfd.config import ConfigError, ExperimentConfig, FoldsConfig, PathsConfig, StackConfig
from csfd.constants import TARGETS, VERTEBRAE
from csfd.features import aggregate_predictions, build_features
from csfd.metric import competition_score
from csfd.stack import aggregate_log_odds, predict_stacker, run_stack, train_stacker
from csfd.stack_postprocess import CLIP_LOWER_GRID, PostProcess, apply_postprocess, choose_postprocess
from csfd.stack_params import target_weight_table, validate_lightgbm_params
from csfd.stack_report import best_constant_oof, folds_by_study, labels_by_study

N_STUDIES = 90
N_FOLDS = 3


def _stack_config(**overrides) -> StackConfig:
    params = dict(StackConfig().params, learning_rate=0.1, num_threads=1, min_data_in_leaf=5)
    values = {"params": params, "num_boost_round": 60, "early_stopping_rounds": 10}
    values.update(overrides)
    return StackConfig(**values)


def _labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    uids = [f"1.2.826.0.1.3680043.{5000 + i}" for i in range(n)]
    vertebrae = {v: (rng.random(n) < 0.2).astype(int) for v in VERTEBRAE}
    labels = pd.DataFrame({"StudyInstanceUID": uids, **vertebrae})
    labels.insert(1, "patient_overall", labels[list(VERTEBRAE)].max(axis=1))
    return labels


def _slices(labels: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Slice predictions where frac is high on the slices of each fractured vertebra."""
    parts = []
    for study in labels.itertuples(index=False):
        n = int(rng.integers(30, 45))
        bounds = np.sort(rng.choice(np.arange(2, n - 2), len(VERTEBRAE) + 1, replace=False))
        position = np.arange(n)
        part = {"StudyInstanceUID": study.StudyInstanceUID, "slice_number": n - position, "position_index": position}
        for k, vertebra in enumerate(VERTEBRAE):
            inside = (position >= bounds[k]) & (position < bounds[k + 1])
            part[f"vis_{vertebra}"] = np.where(inside, rng.uniform(0.7, 1.0, n), rng.uniform(0.0, 0.2, n))
            if getattr(study, vertebra) == 1:
                frac = np.where(inside, rng.uniform(0.3, 0.95, n), rng.uniform(0.0, 0.2, n))
            else:
                frac = rng.uniform(0.0, 0.35, n)
            part[f"frac_{vertebra}"] = frac
        parts.append(pd.DataFrame(part))
    return pd.concat(parts, ignore_index=True)


def _folds(labels: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    fold = rng.permutation(np.arange(len(labels)) % N_FOLDS)
    return pd.DataFrame({"StudyInstanceUID": labels["StudyInstanceUID"], "fold": fold})


def _shuffled(labels: pd.DataFrame, seed: int) -> pd.DataFrame:
    shuffled = labels.copy()
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled[list(TARGETS)] = labels[list(TARGETS)].to_numpy()[order]
    return shuffled


def _mean_per_study(result) -> dict[str, float]:
    means = result.cv[result.cv["fold"] == "mean"]
    return dict(zip(means["method"], means["per_study"]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    labels = _labels(N_STUDIES, rng)
    slices = _slices(labels, rng)
    return {"labels": labels, "slices": slices, "folds": _folds(labels, rng), "features": build_features(slices)}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("stack")
    result = train_stacker(data["features"], data["labels"], data["folds"], _stack_config(), out_dir, seed=3)
    return result


def test_informative_stacker_beats_prior(trained):
    scores = _mean_per_study(trained)

    assert scores["stacker"] < scores["prior"] - 0.1
    assert scores["stacker"] < scores["best_constant"] - 0.1
    assert scores["stacker_overall_learned"] < scores["prior"] - 0.1


def test_shuffled_labels_no_better_than_prior(data, tmp_path):
    labels = _shuffled(data["labels"], seed=11)

    result = train_stacker(data["features"], labels, data["folds"], _stack_config(), tmp_path, seed=3)
    scores = _mean_per_study(result)

    # best_constant is the metric-optimal constant of the training folds. A booster that learns
    # nothing reaches at most that, and the prevalence ("prior") scores a little worse than it.
    assert scores["stacker"] > scores["best_constant"] - 0.01
    assert scores["stacker"] > scores["prior"] - 0.02


def test_random_features_no_better_than_prior(data, tmp_path):
    rng = np.random.default_rng(5)
    uids = pd.Index(data["labels"]["StudyInstanceUID"], name="StudyInstanceUID")
    noise = pd.DataFrame(rng.normal(size=(len(uids), 12)), index=uids, columns=[f"noise_{i}" for i in range(12)])

    result = train_stacker(noise, data["labels"], data["folds"], _stack_config(), tmp_path, seed=3)
    scores = _mean_per_study(result)

    assert "aggregate" not in scores
    assert json.loads((tmp_path / "stacker.json").read_text())["init_from_aggregate"] is False
    assert scores["stacker"] > scores["best_constant"] - 0.01
    assert scores["stacker"] > scores["prior"] - 0.02
    assert result.better_method == "stacker"


def test_training_independent_of_row_order(data, trained, tmp_path):
    shuffled = data["features"].sample(frac=1.0, random_state=9)

    result = train_stacker(shuffled, data["labels"], data["folds"], _stack_config(), tmp_path, seed=3)

    pd.testing.assert_frame_equal(result.oof, trained.oof, check_exact=True)


@pytest.mark.parametrize("column", ["C2", "patient_overall", "fold"])
def test_label_or_fold_column_rejected(data, tmp_path, column):
    features = data["features"].assign(**{column: 0.0})

    with pytest.raises(ValueError, match=f"column\\(s\\) {column} are labels, folds or unnamed"):
        train_stacker(features, data["labels"], data["folds"], _stack_config(), tmp_path, seed=3)


def test_early_stopping_never_sees_reported_fold(data, trained):
    fold_of = folds_by_study(data["folds"])
    fraction = StackConfig().inner_valid_fraction

    assert len(trained.inner_splits) == N_FOLDS * len(TARGETS)
    for (fold, target), (fit, stop) in trained.inner_splits.items():
        reported = set(fold_of.index[fold_of == fold])
        training = set(fold_of.index[fold_of != fold])
        assert not reported & set(stop), (fold, target)
        assert not reported & set(fit), (fold, target)
        assert not set(fit) & set(stop), (fold, target)
        assert set(fit) | set(stop) == training, (fold, target)
        assert len(stop) == int(np.ceil(fraction * len(training))), (fold, target)


def test_inner_split_stratified(data, trained):
    labels = labels_by_study(data["labels"])

    for (fold, target), (fit, stop) in trained.inner_splits.items():
        fit_rate = labels.loc[fit, target].mean()
        stop_rate = labels.loc[stop, target].mean()
        assert abs(fit_rate - stop_rate) < 0.1, (fold, target, fit_rate, stop_rate)


def test_boosters_saved_and_reloadable(data, trained):
    fold_of = folds_by_study(data["folds"])
    features = data["features"]

    for fold in range(N_FOLDS):
        studies = fold_of.index[fold_of == fold]
        for j, target in enumerate(TARGETS):
            path = trained.out_dir / f"fold{fold}" / f"{target}.txt"
            assert path.read_text().startswith("tree"), path
            booster = lgb.Booster(model_file=str(path))
            assert booster.num_trees() == trained.best_iterations[target][fold]
            # The boosters start from the plain aggregation's log-odds (stack.init_from_aggregate).
            raw = booster.predict(features.loc[studies, booster.feature_name()], raw_score=True)
            predicted = 1.0 / (1.0 + np.exp(-(raw + aggregate_log_odds(features).loc[studies, target].to_numpy())))
            np.testing.assert_allclose(predicted, trained.oof_raw.loc[studies, target], rtol=0, atol=1e-12)


def test_stacker_json_contents(data, trained):
    model = json.loads((trained.out_dir / "stacker.json").read_text())

    assert model["feature_names"] == list(data["features"].columns)
    assert model["folds"] == list(range(N_FOLDS))
    assert model["params"]["num_threads"] == 1
    assert model["params"]["metric"] == "binary_logloss"
    assert model["params"]["seed"] == 3
    assert model["sample_weighting"] == "per_study"
    assert "C3_prev_wmean" in model["target_features"]["C3"]
    assert "C2_wmean" not in model["target_features"]["C3"]
    assert model["blend_weight"] == trained.postprocess.blend_weight


def test_clip_range_chosen_from_grid(trained):
    model = json.loads((trained.out_dir / "stacker.json").read_text())
    config = StackConfig()
    lowers = model["clip_lower_candidates"]
    uppers = model["clip_upper_candidates"]

    assert lowers[0] == config.clip_min
    assert uppers[0] == config.clip_max
    assert all(low >= config.clip_min for low in lowers)
    assert all(high <= config.clip_max for high in uppers)
    assert set(lowers) - {config.clip_min} == {v for v in CLIP_LOWER_GRID if v >= config.clip_min} - {config.clip_min}
    for target in TARGETS:
        low, high = model["clip"][target]
        assert low in lowers, target
        assert high in uppers, target


def test_choose_postprocess_tightens_clip_for_confident_errors():
    rng = np.random.default_rng(0)
    n = 200
    uids = pd.Index([f"s{i}" for i in range(n)], name="StudyInstanceUID")
    labels = pd.DataFrame(0.0, index=uids, columns=list(TARGETS))
    raw = pd.DataFrame(rng.uniform(0.001, 0.01, size=(n, len(TARGETS))), index=uids, columns=list(TARGETS))
    # C4: a tenth of the studies are fractured but predicted 0.001, so a higher floor pays off.
    labels.iloc[:20, labels.columns.get_loc("C4")] = 1.0
    labels["patient_overall"] = labels[list(VERTEBRAE)].max(axis=1)
    raw.iloc[:20, raw.columns.get_loc("C4")] = 0.001
    raw.iloc[:20, raw.columns.get_loc("patient_overall")] = 0.9
    lowers = [0.0005, 0.001, 0.01, 0.05]
    uppers = [0.9995, 0.99, 0.95]

    chosen = choose_postprocess(raw, labels, (0.0, 0.5, 1.0), lowers, uppers)

    assert chosen.clip["C4"][0] == 0.05
    assert chosen.clip["C1"] == (0.0005, 0.9995)
    assert chosen.clip["patient_overall"][1] == 0.9995


def test_choose_postprocess_picks_better_overall_source():
    n = 100
    uids = pd.Index([f"s{i}" for i in range(n)], name="StudyInstanceUID")
    labels = pd.DataFrame(0.0, index=uids, columns=list(TARGETS))
    labels.iloc[:50, labels.columns.get_loc("C2")] = 1.0
    labels["patient_overall"] = labels[list(VERTEBRAE)].max(axis=1)
    good = labels.clip(0.02, 0.98)
    bad_overall = good.copy()
    bad_overall["patient_overall"] = 0.5

    flat_vertebrae = good.copy()
    flat_vertebrae[list(VERTEBRAE)] = 0.1

    # The vertebrae carry the truth and the learned column is flat: 1 - prod(1 - Ck) must win.
    vertebrae_win = choose_postprocess(bad_overall, labels, (0.0, 0.5, 1.0), [0.001], [0.999])
    learned_wins = choose_postprocess(flat_vertebrae, labels, (0.0, 0.5, 1.0), [0.001], [0.999])

    assert vertebrae_win.blend_weight == 0.0
    assert learned_wins.blend_weight == 1.0


def test_apply_postprocess_blend_and_clip():
    raw = pd.DataFrame([[0.9] + [0.5] + [0.0] * 6], columns=list(TARGETS))
    postprocess = PostProcess(blend_weight=0.25, clip={t: (0.01, 0.99) for t in TARGETS})

    out = apply_postprocess(raw, postprocess)

    assert out.loc[0, "patient_overall"] == pytest.approx(0.25 * 0.9 + 0.75 * 0.5)
    assert out.loc[0, "C1"] == 0.5
    assert out.loc[0, "C3"] == 0.01


def test_oof_predictions_score_like_cv_table(data, trained):
    oof = pd.read_csv(trained.out_dir / "oof_predictions.csv", dtype={"StudyInstanceUID": str})
    fold_of = folds_by_study(data["folds"])
    labels = data["labels"]
    table = trained.cv.set_index(["method", "fold"])

    assert list(oof.columns) == ["StudyInstanceUID", *TARGETS]
    assert len(oof) == N_STUDIES
    fold0 = labels[labels["StudyInstanceUID"].isin(fold_of.index[fold_of == 0])]
    score = competition_score(fold0, oof)
    assert table.loc[("stacker", "0"), "per_study"] == pytest.approx(score["per_study"], abs=1e-9)
    assert table.loc[("stacker", "0"), "flat"] == pytest.approx(score["flat"], abs=1e-9)
    folds_only = table.loc["stacker"].drop(index="mean")
    assert table.loc[("stacker", "mean"), "per_study"] == pytest.approx(folds_only["per_study"].mean())


def test_cv_csv_methods_and_folds(trained):
    written = pd.read_csv(trained.out_dir / "cv.csv", dtype={"fold": str})

    expected_methods = {
        "prior",
        "best_constant",
        "aggregate",
        "stacker",
        "stacker_overall_learned",
        "stacker_overall_from_vertebrae",
    }
    assert set(written["method"]) == expected_methods
    assert set(written["fold"]) == {"0", "1", "2", "mean"}
    assert list(written.columns) == ["method", "fold", "n_studies", "per_study", "flat", *TARGETS]
    pd.testing.assert_frame_equal(written, trained.cv.astype({"fold": str}), check_dtype=False)


def test_summary_names_better_method(trained):
    summary = json.loads((trained.out_dir / "summary.json").read_text())
    scores = summary["per_study_mean"]

    expected = "stacker" if scores["stacker"] < scores["aggregate"] else "aggregate"
    assert summary["better_method"] == expected
    assert summary["better_method"] == trained.better_method
    assert summary["n_studies"] == N_STUDIES


def test_feature_importance_written(data, trained):
    table = pd.read_csv(trained.out_dir / "feature_importance.csv", index_col="feature")
    png = (trained.out_dir / "feature_importance.png").read_bytes()

    assert png.startswith(b"\x89PNG")
    assert set(table.index) <= set(data["features"].columns)
    assert list(table.columns) == [*TARGETS, "mean_share"]
    assert table["mean_share"].is_monotonic_decreasing
    assert table["mean_share"].sum() == pytest.approx(1.0)
    # Only the frac statistics carry signal here, so they outrank the geometry columns
    # (n_visible, extent, vis_sum, slice count), whose gain comes from noise.
    for name in table.index[:5]:
        assert name.endswith(("wmean", "max", "topk_mean", "q50", "q90")), name


def test_features_oof_written(data, trained):
    written = pd.read_csv(trained.out_dir / "features_oof.csv", dtype={"StudyInstanceUID": str})
    fold_of = folds_by_study(data["folds"])

    assert list(written.columns) == ["StudyInstanceUID", "fold", *data["features"].columns]
    assert (written["fold"].to_numpy() == fold_of.loc[written["StudyInstanceUID"]].to_numpy()).all()


def test_predict_column_order_irrelevant(data, trained):
    features = data["features"]

    forward = predict_stacker(features, trained.out_dir, method="stacker")
    backward = predict_stacker(features[features.columns[::-1]], trained.out_dir, method="stacker")

    pd.testing.assert_frame_equal(forward, backward, check_exact=True)


def test_predict_row_order_irrelevant(data, trained):
    features = data["features"]
    shuffled = features.sample(frac=1.0, random_state=4)

    forward = predict_stacker(features, trained.out_dir, method="stacker").set_index("StudyInstanceUID")
    shuffled_out = predict_stacker(shuffled, trained.out_dir, method="stacker").set_index("StudyInstanceUID")

    assert list(shuffled_out.index) == list(shuffled.index)
    pd.testing.assert_frame_equal(forward.loc[shuffled.index], shuffled_out, check_exact=True)


def test_predict_missing_column_rejected(data, trained):
    with pytest.raises(ValueError, match="missing column\\(s\\) C3_q90"):
        predict_stacker(data["features"].drop(columns=["C3_q90"]), trained.out_dir)


def test_predict_extra_column_rejected(data, trained):
    features = data["features"].assign(leaked_label=1.0)

    with pytest.raises(ValueError, match="unexpected column\\(s\\) leaked_label"):
        predict_stacker(features, trained.out_dir)


def test_predict_needs_study_index(data, trained):
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        predict_stacker(data["features"].reset_index(drop=True), trained.out_dir)


def test_predict_applies_saved_postprocess(data, trained):
    out = predict_stacker(data["features"], trained.out_dir, method="stacker")

    assert list(out.columns) == ["StudyInstanceUID", *TARGETS]
    for target in TARGETS:
        low, high = trained.postprocess.clip[target]
        assert out[target].min() >= low, target
        assert out[target].max() <= high, target
    # Boosters of every fold, averaged: the informative studies keep their signal.
    labels = data["labels"].set_index("StudyInstanceUID")
    merged = out.set_index("StudyInstanceUID")
    assert merged.loc[labels.index[labels["C2"] == 1], "C2"].mean() > merged.loc[labels.index[labels["C2"] == 0], "C2"].mean() + 0.3


def test_predict_aggregate_and_auto(data, trained):
    aggregate = predict_stacker(data["features"], trained.out_dir, method="aggregate")
    automatic = predict_stacker(data["features"], trained.out_dir)
    chosen = predict_stacker(data["features"], trained.out_dir, method=trained.better_method)

    pd.testing.assert_frame_equal(aggregate, aggregate_predictions(data["slices"]), check_exact=True)
    pd.testing.assert_frame_equal(automatic, chosen, check_exact=True)


def test_unknown_lightgbm_parameter_rejected(data, tmp_path):
    params = dict(StackConfig().params, num_leafs=7)
    out_dir = tmp_path / "stack"

    with pytest.raises(ConfigError, match="'num_leafs' \\(close matches: .*num_leaves"):
        train_stacker(data["features"], data["labels"], data["folds"], StackConfig(params=params), out_dir, seed=0)
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lambda_l2": 1.0, "reg_lambda": 2.0}, "lambda_l2, reg_lambda are aliases of the same LightGBM parameter"),
        ({"n_estimators": 10}, "remove 'n_estimators'; set stack.num_boost_round"),
        ({"early_stopping_rounds": 5}, "set stack.early_stopping_rounds"),
        ({"objective": "regression"}, "objective 'regression' does not predict probabilities"),
    ],
)
def test_conflicting_lightgbm_parameters_rejected(params, message):
    with pytest.raises(ConfigError, match=message):
        validate_lightgbm_params(params)


def test_lightgbm_aliases_accepted():
    params = {"reg_lambda": 1.0, "colsample_bytree": 0.5, "n_jobs": 1, "objective": "xentropy"}

    assert validate_lightgbm_params(params) == params


def test_single_class_target_rejected(data, tmp_path):
    labels = data["labels"].copy()
    labels["C5"] = 0

    with pytest.raises(ValueError, match="target C5: the training folds contain only label 0"):
        train_stacker(data["features"], labels, data["folds"], _stack_config(), tmp_path, seed=0)


def test_unlabelled_study_rejected(data, tmp_path):
    labels = data["labels"].iloc[1:]
    missing = data["labels"]["StudyInstanceUID"].iloc[0]

    with pytest.raises(ValueError, match=f"labels: 1 studies with features are missing, for example {missing}"):
        train_stacker(data["features"], labels, data["folds"], _stack_config(), tmp_path, seed=0)


def test_sample_weights_follow_metric():
    labels = labels_by_study(
        pd.DataFrame(
            {"StudyInstanceUID": ["neg", "pos"], "patient_overall": [0, 1], "C1": [0, 1], **{v: [0, 0] for v in VERTEBRAE[1:]}}
        )
    )

    per_study = target_weight_table(labels, "per_study")
    flat = target_weight_table(labels, "flat")

    assert per_study.loc["neg", "patient_overall"] == pytest.approx(7 / 14)
    assert per_study.loc["neg", "C1"] == pytest.approx(1 / 14)
    assert per_study.loc["pos", "patient_overall"] == pytest.approx(14 / 22)
    assert per_study.loc["pos", "C1"] == pytest.approx(2 / 22)
    assert per_study.loc["pos", "C2"] == pytest.approx(1 / 22)
    assert flat.loc["pos", "patient_overall"] == 14
    assert flat.loc["neg", "C3"] == 1
    assert (target_weight_table(labels, "none") == 1.0).all().all()


def test_best_constant_minimises_metric(data):
    labels = labels_by_study(data["labels"])
    fold_of = folds_by_study(data["folds"])
    constant = best_constant_oof(labels, fold_of).set_index("StudyInstanceUID")
    fold0 = fold_of.index[fold_of == 0]
    training = labels.loc[fold_of.index[fold_of != 0]].reset_index()
    value = constant.loc[fold0[0]]

    base = competition_score(training, pd.DataFrame({"StudyInstanceUID": training["StudyInstanceUID"], **value}))
    for target in ("patient_overall", "C4"):
        for step in (-0.02, 0.02):
            moved = value.copy()
            moved[target] += step
            frame = pd.DataFrame({"StudyInstanceUID": training["StudyInstanceUID"], **moved})
            assert competition_score(training, frame)["per_study"] > base["per_study"], (target, step)


def _write_run(tmp_path, data, config: ExperimentConfig, skip_fold: int | None = None) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    data["labels"].to_csv(data_dir / "train.csv", index=False)
    folds_path = tmp_path / "folds.csv"
    data["folds"].to_csv(folds_path, index=False)
    fold_of = folds_by_study(data["folds"])
    for fold in range(N_FOLDS):
        if fold == skip_fold:
            continue
        studies = fold_of.index[fold_of == fold]
        run_dir = config.run_dir(fold)
        run_dir.mkdir(parents=True, exist_ok=True)
        data["slices"][data["slices"]["StudyInstanceUID"].isin(studies)].to_csv(run_dir / "oof_slices.csv", index=False)


def _experiment(tmp_path) -> ExperimentConfig:
    paths = PathsConfig(
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        folds_csv=str(tmp_path / "folds.csv"),
        runs_dir=str(tmp_path / "runs"),
    )
    return ExperimentConfig(name="synthetic", seed=3, paths=paths, folds=FoldsConfig(n_folds=N_FOLDS), stack=_stack_config())


def test_run_stack_end_to_end(data, tmp_path):
    config = _experiment(tmp_path)
    _write_run(tmp_path, data, config)
    cache = tmp_path / "cache" / "train"
    cache.mkdir(parents=True)
    slices = data["slices"]
    pd.DataFrame(
        {
            "StudyInstanceUID": slices["StudyInstanceUID"],
            "slice_number": slices["slice_number"],
            "position_index": slices["position_index"],
            "z": -2.5 * slices["position_index"],
        }
    ).to_csv(cache / "slices.csv", index=False)

    result = run_stack(config)

    stack_dir = tmp_path / "runs" / "synthetic" / "stack"
    assert result.out_dir == stack_dir
    assert (stack_dir / "summary.json").is_file()
    features = pd.read_csv(stack_dir / "features_oof.csv", dtype={"StudyInstanceUID": str})
    assert (features["study_slice_spacing"] == 2.5).all()
    scores = _mean_per_study(result)
    assert scores["stacker"] < scores["prior"] - 0.1


def test_run_stack_missing_fold_named(data, tmp_path):
    config = _experiment(tmp_path)
    _write_run(tmp_path, data, config, skip_fold=1)

    with pytest.raises(FileNotFoundError, match="missing for fold\\(s\\) 1 "):
        run_stack(config)


def test_run_stack_foreign_study_rejected(data, tmp_path):
    config = _experiment(tmp_path)
    _write_run(tmp_path, data, config)
    fold_of = folds_by_study(data["folds"])
    intruder = fold_of.index[fold_of == 2][0]
    path = config.run_dir(0) / "oof_slices.csv"
    frame = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    extra = data["slices"][data["slices"]["StudyInstanceUID"] == intruder]
    pd.concat([frame, extra]).to_csv(path, index=False)

    with pytest.raises(ValueError, match=f"study {intruder} belongs to fold 2, not fold 0"):
        run_stack(config)


def test_empty_boosters_with_init_score(data, tmp_path):
    # No leaf can hold 1000 studies, so every booster is empty and only the init score remains.
    config = _stack_config(params=dict(_stack_config().params, min_data_in_leaf=1000))
    result = train_stacker(data["features"], data["labels"], data["folds"], config, tmp_path, seed=3)

    aggregate = aggregate_predictions(data["slices"]).set_index("StudyInstanceUID")
    raw = result.oof_raw.drop(columns="fold")
    expected = aggregate.loc[raw.index, list(TARGETS)].clip(1e-4, 1 - 1e-4)
    np.testing.assert_allclose(raw[list(TARGETS)].to_numpy(float), expected.to_numpy(float), rtol=1e-6, atol=1e-9)
    assert json.loads((tmp_path / "stacker.json").read_text())["init_from_aggregate"] is True

    # Prediction adds the same init score to every fold's (empty) booster.
    predicted = predict_stacker(data["features"], tmp_path, method="stacker").set_index("StudyInstanceUID")
    postprocessed = apply_postprocess(expected, result.postprocess)
    np.testing.assert_allclose(
        predicted.loc[expected.index, list(TARGETS)].to_numpy(float), postprocessed[list(TARGETS)].to_numpy(float), rtol=1e-6
    )


def test_empty_boosters_without_init_score(data, tmp_path):
    config = _stack_config(params=dict(_stack_config().params, min_data_in_leaf=1000), init_from_aggregate=False)
    result = train_stacker(data["features"], data["labels"], data["folds"], config, tmp_path, seed=3)

    raw = result.oof_raw.drop(columns="fold")
    # Empty boosters predict one constant per fold and target: the fit studies' mean.
    for target in TARGETS:
        assert raw.groupby(result.oof_raw["fold"])[target].nunique().max() == 1
    assert json.loads((tmp_path / "stacker.json").read_text())["init_from_aggregate"] is False


def test_predict_with_fold_map(data, trained):
    fold_of = folds_by_study(data["folds"])
    predicted = predict_stacker(data["features"], trained.out_dir, method="stacker", fold_of=fold_of)

    raw = trained.oof_raw.drop(columns="fold")
    expected = apply_postprocess(raw, trained.postprocess)
    merged = predicted.set_index("StudyInstanceUID").loc[expected.index]
    np.testing.assert_allclose(merged[list(TARGETS)].to_numpy(float), expected[list(TARGETS)].to_numpy(float), rtol=1e-9)
    averaged = predict_stacker(data["features"], trained.out_dir, method="stacker").set_index("StudyInstanceUID")
    assert not np.allclose(averaged.loc[expected.index, "C2"], merged["C2"])
