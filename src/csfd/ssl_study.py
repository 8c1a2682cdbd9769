"""The label-fraction study: does self-training help when few studies are segmented?

For every fold in ssl.study.folds, seed in ssl.study.seeds and labelled fraction in
ssl.study.fractions, these arms run on the same folds CSV:

    supervised          stage 1 with ssl.rounds = 0: the vertebra model trains on the
                        labelled studies only (the pipeline without self-training)
    semi_supervised     stage 1 with ssl.rounds = ssl.study.rounds, starting from the
                        supervised cell's vertebra model as its round-0 teacher
    supervised_matched  the vertebra stage only: the supervised cell's model fine-tuned on the
                        labelled studies alone for as many optimiser steps as the
                        semi-supervised student (ssl.study.matched_control)

The third arm separates the effect of the pseudo-labels from that of the extra training
steps that self-training adds. A seed fixes the labelled subset (nested: a smaller
fraction's studies are part of a larger one's) and the model initialisation, and all arms
share it. The held-out fold gives the metrics: vertebra visibility on its segmented studies,
and the competition metric of the plain aggregation (csfd.features.aggregate_predictions) on
all its studies. A difference semi_supervised - baseline is averaged over seeds, and its 95%
interval comes from a bootstrap over held-out studies, resampled within each fold, with the
same resample for both arms and every seed.

Outputs, in <paths.runs_dir>/<study name>/: cells/ (one run folder per cell), cells.csv,
table.csv, table.md, plot.png, metrics.json and study.log; a row per study in
leaderboard_ssl.csv beside paths.runs_dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from csfd.config import ExperimentConfig, save_config
from csfd.constants import TARGET_WEIGHTS, TARGETS, VERTEBRAE
from csfd.io_utils import atomic_path, atomic_write_csv, atomic_write_text
from csfd.logs import add_file_log

logger = logging.getLogger(__name__)

ARMS = ("supervised", "semi_supervised", "supervised_matched")
VERTEBRA_OOF = "vertebra_oof.csv"
VIS_COLUMNS = [f"vis_{v}" for v in VERTEBRAE]
CONFIDENCE = 0.95
CELL_RECORD = "study_cell.json"


# ---------------------------------------------------------------------------------------------
# Metrics as functions of per-study sums, so that a bootstrap only re-weights studies


@dataclass(frozen=True)
class StudyMetric:
    """A metric computed from per-study statistics summed over the studies of a sample."""

    name: str
    family: str  # "vertebra" (held-out segmented studies) or "fracture" (all held-out studies)
    columns: tuple[str, ...]  # per-study statistics it needs, in the order compute() reads them
    compute: Callable[[np.ndarray], np.ndarray]  # (..., len(columns)) summed statistics -> (...)
    higher_is_better: bool


def _ratio(sums: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[..., 0] / sums[..., 1]


def _macro_f1(sums: np.ndarray) -> np.ndarray:
    n = len(VERTEBRAE)
    tp, fp, fn = sums[..., :n], sums[..., n : 2 * n], sums[..., 2 * n :]
    denominator = 2 * tp + fp + fn
    defined = denominator > 0
    f1 = np.where(defined, 2 * tp / np.where(defined, denominator, 1.0), 0.0)
    n_defined = defined.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_defined > 0, f1.sum(axis=-1) / np.maximum(n_defined, 1), np.nan)


_F1_COLUMNS = tuple(f"{kind}_{v}" for kind in ("tp", "fp", "fn") for v in VERTEBRAE)

METRICS: tuple[StudyMetric, ...] = (
    StudyMetric("vertebra_accuracy", "vertebra", ("correct_outputs", "outputs"), _ratio, True),
    StudyMetric("vertebra_exact_match", "vertebra", ("exact_slices", "slices"), _ratio, True),
    StudyMetric("vertebra_macro_f1", "vertebra", _F1_COLUMNS, _macro_f1, True),
    StudyMetric("vertebra_exact_match_anatomy", "vertebra", ("exact_slices_anatomy", "slices"), _ratio, True),
    StudyMetric("competition_per_study", "fracture", ("study_loss", "studies"), _ratio, False),
    StudyMetric("competition_flat", "fracture", ("weighted_loss", "weight"), _ratio, False),
)
METRIC_DESCRIPTIONS = {
    "vertebra_accuracy": "share of correct (slice, vertebra) outputs at 0.5, held-out segmented studies",
    "vertebra_exact_match": "share of slices with all seven outputs correct at 0.5 (slice accuracy)",
    "vertebra_macro_f1": "F1 of each vertebra's visibility at 0.5, averaged over C1..C7",
    "vertebra_exact_match_anatomy": "slice accuracy after the anatomical consistency step (csfd.anatomy)",
    "competition_per_study": "competition metric (per-study weighted log loss), plain aggregation",
    "competition_flat": "weighted log loss normalised once over all rows, plain aggregation",
}


def vertebra_study_stats(oof: pd.DataFrame, truth: pd.DataFrame, anatomy_options=None, min_level_mm: float = 0.0) -> pd.DataFrame:
    """Return per-study statistics of the vertebra metrics, one row per segmented study of `oof`.

    `oof` has StudyInstanceUID, slice_number, position_index and vis_C1..vis_C7 (an
    oof_slices.csv); `truth` is vertebra_labels.csv. Only studies present in both count. With
    `anatomy_options` (csfd.anatomy.AnatomyOptions) the predictions also pass through the
    anatomy step for exact_slices_anatomy; without it that column equals exact_slices.
    """
    from csfd.anatomy import refine_frame

    truth_columns = ["StudyInstanceUID", "slice_number", *VERTEBRAE]
    merged = oof.merge(truth[truth_columns], on=["StudyInstanceUID", "slice_number"], how="inner")
    if merged.empty:
        return pd.DataFrame(columns=["slices", *_all_vertebra_columns()], index=pd.Index([], name="StudyInstanceUID"))
    predicted = merged[VIS_COLUMNS].to_numpy(np.float64) > 0.5
    actual = merged[list(VERTEBRAE)].to_numpy(np.float64) > 0.5
    if anatomy_options is not None:
        renamed = merged[["StudyInstanceUID", "position_index", *VIS_COLUMNS] + (["z"] if "z" in merged else [])]
        renamed = renamed.rename(columns=dict(zip(VIS_COLUMNS, VERTEBRAE)))
        refined = refine_frame(renamed, VERTEBRAE, anatomy_options, min_level_mm)[list(VERTEBRAE)].to_numpy() > 0.5
    else:
        refined = predicted
    frame = pd.DataFrame({"StudyInstanceUID": merged["StudyInstanceUID"].to_numpy()})
    frame["slices"] = 1.0
    frame["outputs"] = float(len(VERTEBRAE))
    frame["correct_outputs"] = (predicted == actual).sum(axis=1).astype(float)
    frame["exact_slices"] = (predicted == actual).all(axis=1).astype(float)
    frame["exact_slices_anatomy"] = (refined == actual).all(axis=1).astype(float)
    for j, v in enumerate(VERTEBRAE):
        frame[f"tp_{v}"] = (predicted[:, j] & actual[:, j]).astype(float)
        frame[f"fp_{v}"] = (predicted[:, j] & ~actual[:, j]).astype(float)
        frame[f"fn_{v}"] = (~predicted[:, j] & actual[:, j]).astype(float)
    return frame.groupby("StudyInstanceUID").sum()


def _all_vertebra_columns() -> list[str]:
    return ["outputs", "correct_outputs", "exact_slices", "exact_slices_anatomy", *_F1_COLUMNS]


def fracture_study_stats(oof: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Return per-study statistics of the competition metric of the plain aggregation.

    `labels` is train.csv (StudyInstanceUID and the eight targets). Per study: its weighted
    log loss (the per-study form averages it), the sum of its row weights and weight times loss
    (the flat form divides their sums).
    """
    from csfd.features import aggregate_predictions
    from csfd.metric import competition_score

    predictions = aggregate_predictions(oof)
    labels = labels.set_index("StudyInstanceUID") if "StudyInstanceUID" in labels.columns else labels
    missing = sorted(set(predictions["StudyInstanceUID"]) - set(labels.index))
    if missing:
        raise ValueError(f"train.csv has no labels for {len(missing)} held-out studies, for example {missing[0]}")
    rows = []
    for _, row in predictions.iterrows():
        uid = row["StudyInstanceUID"]
        truth = labels.loc[[uid], list(TARGETS)].reset_index()
        loss = competition_score(truth, row.to_frame().T)["per_study"]
        weight = sum(TARGET_WEIGHTS[t][1] if truth.at[0, t] > 0.5 else TARGET_WEIGHTS[t][0] for t in TARGETS)
        rows.append({"StudyInstanceUID": uid, "studies": 1.0, "study_loss": loss, "weight": weight, "weighted_loss": loss * weight})
    return pd.DataFrame(rows).set_index("StudyInstanceUID")


# ---------------------------------------------------------------------------------------------
# Paired bootstrap


@dataclass(frozen=True)
class PairedEstimate:
    """Metric of each arm (mean over seeds) and their paired difference with its interval."""

    baseline: float  # supervised, mean over seeds
    treatment: float  # semi-supervised, mean over seeds
    baseline_sd: float  # standard deviation over seeds
    treatment_sd: float
    difference: float  # mean over seeds of treatment - baseline
    low: float
    high: float
    n_studies: int
    n_seeds: int


def paired_bootstrap(
    baseline: np.ndarray,
    treatment: np.ndarray,
    compute: Callable[[np.ndarray], np.ndarray],
    strata: Sequence | None = None,
    n_resamples: int = 2000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedEstimate:
    """Estimate treatment - baseline with a percentile bootstrap over studies.

    `baseline` and `treatment` are (seeds, studies, statistics): per-study statistics of each
    seed's run, with the studies in the same order. A resample draws studies with replacement
    within each stratum (the fold) and applies the same draw to both arms and every seed. The
    metric of a resample is compute(sum over the drawn studies), and the difference is
    averaged over seeds.
    """
    baseline = np.asarray(baseline, dtype=np.float64)
    treatment = np.asarray(treatment, dtype=np.float64)
    if baseline.shape != treatment.shape or baseline.ndim != 3:
        raise ValueError(f"baseline {baseline.shape} and treatment {treatment.shape} must both be (seeds, studies, statistics)")
    n_seeds, n_studies, _ = baseline.shape
    if n_studies == 0:
        nan = float("nan")
        return PairedEstimate(nan, nan, nan, nan, nan, nan, nan, 0, n_seeds)
    strata = np.zeros(n_studies, dtype=int) if strata is None else np.asarray(strata)
    if strata.shape != (n_studies,):
        raise ValueError(f"strata has shape {strata.shape}, expected ({n_studies},)")

    base_point = compute(baseline.sum(axis=1))  # (seeds,)
    treat_point = compute(treatment.sum(axis=1))
    counts = _resample_counts(strata, n_resamples, np.random.default_rng(seed))  # (B, studies)
    base_boot = compute(np.einsum("bs,rsk->brk", counts, baseline))  # (B, seeds)
    treat_boot = compute(np.einsum("bs,rsk->brk", counts, treatment))
    differences = np.nanmean(treat_boot - base_boot, axis=1)
    alpha = (1.0 - confidence) / 2.0
    finite = differences[np.isfinite(differences)]
    low, high = (np.quantile(finite, [alpha, 1.0 - alpha]) if len(finite) else (np.nan, np.nan))
    return PairedEstimate(
        baseline=float(np.nanmean(base_point)),
        treatment=float(np.nanmean(treat_point)),
        baseline_sd=float(np.nanstd(base_point, ddof=1)) if n_seeds > 1 else 0.0,
        treatment_sd=float(np.nanstd(treat_point, ddof=1)) if n_seeds > 1 else 0.0,
        difference=float(np.nanmean(treat_point - base_point)),
        low=float(low),
        high=float(high),
        n_studies=n_studies,
        n_seeds=n_seeds,
    )


def _resample_counts(strata: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.zeros((n_resamples, len(strata)))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_resamples)
    return counts


# ---------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    fraction: float
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"f{self.fraction:g}-{self.arm}-s{self.seed}"


def study_dir(config: ExperimentConfig) -> Path:
    """Return the study's folder: <paths.runs_dir>/<ssl.study.name or ssl-study-<name>>."""
    return Path(config.paths.runs_dir) / (config.ssl.study.name or f"ssl-study-{config.name}")


def study_arms(config: ExperimentConfig) -> tuple[str, ...]:
    return ARMS if config.ssl.study.matched_control else ARMS[:2]


def matched_student_epochs(config: ExperimentConfig) -> int:
    """Return the student epochs of the compute-matched control.

    A semi-supervised epoch contains the labelled slices plus at most pseudo_ratio times as
    many pseudo-labelled ones. The control trains on the labelled slices only, so it runs
    1 + pseudo_ratio times as many epochs. It then takes as many optimiser steps as the
    student, or more when confidence filtering leaves fewer pseudo-labelled slices.
    """
    ssl = config.ssl
    epochs = config.ssl.study.student_epochs or ssl.student_epochs or config.vertebra.epochs
    if ssl.pseudo_ratio <= 0:
        logger.warning("ssl.pseudo_ratio is 0 (every pseudo-labelled slice each epoch): the control keeps %d epochs, not matched", epochs)
        return epochs
    return max(1, int(round(epochs * (1.0 + ssl.pseudo_ratio))))


def cell_config(config: ExperimentConfig, cell: Cell, root: Path, teacher_weights: Path | None = None) -> ExperimentConfig:
    """Return the experiment config of one cell: its run folder is <root>/cells/<cell>/fold<k>."""
    study = config.ssl.study
    changes: dict = {
        "student_epochs": study.student_epochs or config.ssl.student_epochs,
        "rounds": 0 if cell.arm == "supervised" else study.rounds,
        "labelled_fraction": cell.fraction,
        "teacher_weights": str(teacher_weights) if teacher_weights is not None else "",
    }
    if cell.arm == "supervised_matched":
        changes.update(pseudo_weight=0.0, student_epochs=matched_student_epochs(config))
    ssl = dataclasses.replace(config.ssl, **changes)
    fracture = config.fracture
    if study.fracture_epochs:
        fracture = dataclasses.replace(fracture, epochs=study.fracture_epochs)
    paths = dataclasses.replace(config.paths, runs_dir=str(root / "cells"))
    return dataclasses.replace(config, name=cell.name, seed=cell.seed, paths=paths, ssl=ssl, fracture=fracture)


def _finished_record(config: ExperimentConfig, fold: int, output: str) -> dict | None:
    fold_dir = config.run_dir(fold)
    record_path = fold_dir / CELL_RECORD
    if not (record_path.is_file() and (fold_dir / output).is_file()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("config_hash") != config.hash():
        return None
    logger.info("Cell %s fold %d already done (config hash %s); reusing it", config.name, fold, config.hash())
    return {**record, "reused": True}


def _write_record(config: ExperimentConfig, fold: int, seconds: float, vertebra_metrics: dict) -> dict:
    record = {
        "config_hash": config.hash(),
        "seconds": seconds,
        "labelled_studies": vertebra_metrics.get("labelled_studies"),
        "unlabelled_studies": vertebra_metrics.get("unlabelled_studies"),
    }
    atomic_write_text(config.run_dir(fold) / CELL_RECORD, json.dumps(record, indent=2))
    return {**record, "reused": False}


def _run_cell(config: ExperimentConfig, fold: int) -> dict:
    """Train one cell's fold (all of stage 1), or reuse it when it finished with this config."""
    from csfd.train import train_fold

    finished = _finished_record(config, fold, "oof_slices.csv")
    if finished is not None:
        return finished
    start = time.time()
    metrics = train_fold(config, fold)
    return _write_record(config, fold, time.time() - start, metrics["vertebra"])


def _run_vertebra_cell(config: ExperimentConfig, fold: int) -> dict:
    """Run only the vertebra stage of a fold and write the held-out visibility to vertebra_oof.csv."""
    from csfd.cache import StudyCache
    from csfd.checkpoint import start_run_dir
    from csfd.ssl import run_vertebra_stage, split_vertebra_studies
    from csfd.train import _split_studies
    from csfd.trainer import resolve_device, seed_everything

    finished = _finished_record(config, fold, VERTEBRA_OOF)
    if finished is not None:
        return finished
    start = time.time()
    run_dir = config.run_dir(fold)
    start_run_dir(config, run_dir, resume=False)
    save_config(config, run_dir / "config.yaml")
    handler = add_file_log(run_dir / "train.log")
    try:
        seed = config.seed + fold  # as csfd.train, so the labelled subset is the same
        seed_everything(seed)
        cache = StudyCache(Path(config.paths.cache_dir), "train")
        train_uids, valid_uids, _ = _split_studies(config, fold, set(cache.study_uids))
        vertebra_labels = cache.vertebra_labels()
        split = split_vertebra_studies(train_uids, valid_uids, set(vertebra_labels["StudyInstanceUID"]), config.ssl.labelled_fraction, seed)
        stage = run_vertebra_stage(
            config,
            cache,
            run_dir,
            resolve_device(config.device),
            seed,
            labelled=split.labelled,
            unlabelled=split.unlabelled,
            valid_segmented=split.valid_segmented,
            all_studies=split.valid_segmented,
            vertebra_labels=vertebra_labels,
        )
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    oof = stage.predictions.rename(columns={v: f"vis_{v}" for v in VERTEBRAE})
    atomic_write_csv(oof, run_dir / VERTEBRA_OOF, float_format="%.5f")
    atomic_write_text(run_dir / "metrics.json", json.dumps({"fold": fold, "config_hash": config.hash(), "vertebra": stage.metrics}, indent=2, default=float))
    return _write_record(config, fold, time.time() - start, stage.metrics)


# ---------------------------------------------------------------------------------------------
# The study


def run_study(config: ExperimentConfig) -> dict:
    """Run (or resume) every cell of the study, then write its tables, plot and records."""
    from csfd.cache import StudyCache
    from csfd.folds import read_folds

    study = config.ssl.study
    root = study_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(root / "study.log")
    start = time.time()
    try:
        folds = read_folds(Path(config.paths.folds_csv))
        available = sorted(int(f) for f in folds["fold"].unique())
        missing = sorted(set(study.folds) - set(available))
        if missing:
            raise ValueError(f"ssl.study.folds {missing} are not in {config.paths.folds_csv} (folds {available})")
        save_config(config, root / "config.yaml")
        cells = [Cell(f, arm, s) for s in study.seeds for f in study.fractions for arm in study_arms(config)]
        logger.info(
            "SSL study %s: %d cells (fractions %s, seeds %s, folds %s, %d round(s)) in %s",
            root.name, len(cells), list(study.fractions), list(study.seeds), list(study.folds), study.rounds, root,
        )
        records = _train_cells(config, root, cells)
        cache = StudyCache(Path(config.paths.cache_dir), "train")
        labels = pd.read_csv(Path(config.paths.data_dir) / "train.csv")
        stats = _collect_stats(config, root, cells, cache, labels)
        wall_seconds = time.time() - start
        return write_results(config, root, cells, records, stats, wall_seconds)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train_cells(config: ExperimentConfig, root: Path, cells: list[Cell]) -> dict:
    from tqdm.auto import tqdm

    records: dict = {}
    jobs = [(cell, fold) for cell in cells for fold in config.ssl.study.folds]
    for cell, fold in tqdm(jobs, desc="ssl-study cells", mininterval=5.0):
        teacher = None
        if cell.arm != "supervised":
            # Both other arms start from the supervised cell's model, so the three share round 0.
            partner = cell_config(config, Cell(cell.fraction, "supervised", cell.seed), root)
            teacher = partner.run_dir(fold) / "vertebra.pt"
        cell_cfg = cell_config(config, cell, root, teacher)
        run = _run_vertebra_cell if cell.arm == "supervised_matched" else _run_cell
        records[(cell, fold)] = run(cell_cfg, fold)
    return records


def _collect_stats(config: ExperimentConfig, root: Path, cells: list[Cell], cache, labels: pd.DataFrame) -> dict:
    """Return {(cell, family): per-study statistics over the study's folds, with a fold column}.

    The compute-matched control has no fracture model, so it has vertebra statistics only.
    """
    from csfd.ssl import anatomy_options

    truth = cache.vertebra_labels()
    slices_z = cache.slices[["StudyInstanceUID", "slice_number", "z"]] if "z" in cache.slices.columns else None
    options = anatomy_options(config.ssl)
    stats: dict = {}
    for cell in cells:
        vertebra_parts, fracture_parts = [], []
        for fold in config.ssl.study.folds:
            fold_dir = cell_config(config, cell, root).run_dir(fold)
            oof_path = fold_dir / (VERTEBRA_OOF if cell.arm == "supervised_matched" else "oof_slices.csv")
            oof = pd.read_csv(oof_path, dtype={"StudyInstanceUID": str})
            if slices_z is not None:
                oof = oof.merge(slices_z, on=["StudyInstanceUID", "slice_number"], how="left")
            vertebra_parts.append(vertebra_study_stats(oof, truth, options, config.ssl.anatomy_min_level_mm).assign(fold=fold))
            if cell.arm != "supervised_matched":
                fracture_parts.append(fracture_study_stats(oof, labels).assign(fold=fold))
        stats[(cell, "vertebra")] = pd.concat(vertebra_parts).sort_index()
        if fracture_parts:
            stats[(cell, "fracture")] = pd.concat(fracture_parts).sort_index()
    return stats


def _arm_arrays(study, stats: dict, fraction: float, arm: str, metric: StudyMetric) -> tuple[np.ndarray, np.ndarray, pd.Index] | None:
    """Return (seeds, studies, statistics), the fold of each study and the study index, or None."""
    per_seed, strata, index = [], None, None
    for seed in study.seeds:
        frame = stats.get((Cell(fraction, arm, seed), metric.family))
        if frame is None:
            return None
        if index is not None and not frame.index.equals(index):
            raise ValueError(f"fraction {fraction}, arm {arm}: the seeds' held-out studies differ; the cells used other folds")
        per_seed.append(frame[list(metric.columns)].to_numpy(np.float64))
        strata, index = frame["fold"].to_numpy(), frame.index
    return np.stack(per_seed), strata, index


def compare_arms(config: ExperimentConfig, cells: list[Cell], stats: dict) -> pd.DataFrame:
    """Return one row per (fraction, metric): each arm over seeds and the paired differences.

    difference = semi_supervised - supervised; difference_matched = semi_supervised -
    supervised_matched (vertebra metrics only, when the control ran). Each has a 95% interval.
    """
    study = config.ssl.study
    nan = float("nan")
    rows = []
    for fraction in study.fractions:
        for metric in METRICS:
            arrays = {arm: _arm_arrays(study, stats, fraction, arm, metric) for arm in study_arms(config)}
            semi, strata, index = arrays["semi_supervised"]
            row = {"fraction": fraction, "metric": metric.name, "better": "higher" if metric.higher_is_better else "lower"}
            for arm, other in (("supervised", "difference"), ("supervised_matched", "difference_matched")):
                found = arrays.get(arm)
                if found is None:
                    row.update({arm: nan, f"{arm}_sd": nan, other: nan, f"{other}_low": nan, f"{other}_high": nan})
                    continue
                baseline, _, baseline_index = found
                if not baseline_index.equals(index):
                    raise ValueError(f"fraction {fraction}: the held-out studies of {arm} and semi_supervised differ")
                estimate = paired_bootstrap(baseline, semi, metric.compute, strata, study.bootstrap, CONFIDENCE, seed=0)
                row.update(
                    {
                        arm: estimate.baseline,
                        f"{arm}_sd": estimate.baseline_sd,
                        "semi_supervised": estimate.treatment,
                        "semi_supervised_sd": estimate.treatment_sd,
                        other: estimate.difference,
                        f"{other}_low": estimate.low,
                        f"{other}_high": estimate.high,
                        "n_studies": estimate.n_studies,
                        "n_seeds": estimate.n_seeds,
                    }
                )
            rows.append(row)
    columns = [
        "fraction", "metric", "better", "supervised", "supervised_sd", "semi_supervised", "semi_supervised_sd",
        "supervised_matched", "supervised_matched_sd", "difference", "difference_low", "difference_high",
        "difference_matched", "difference_matched_low", "difference_matched_high", "n_studies", "n_seeds",
    ]
    return pd.DataFrame(rows)[columns]


def cell_table(config: ExperimentConfig, cells: list[Cell], records: dict, stats: dict) -> pd.DataFrame:
    """Return one row per cell with its metrics pooled over the study's folds."""
    rows = []
    for cell in cells:
        row = {"fraction": cell.fraction, "arm": cell.arm, "seed": cell.seed}
        fold_records = [records[(cell, fold)] for fold in config.ssl.study.folds]
        row["labelled_studies"] = sum(r.get("labelled_studies") or 0 for r in fold_records)
        row["train_seconds"] = sum(r.get("seconds", 0.0) for r in fold_records)
        row["reused"] = all(r.get("reused") for r in fold_records)
        for metric in METRICS:
            frame = stats.get((cell, metric.family))
            row[metric.name] = float("nan") if frame is None else float(metric.compute(frame[list(metric.columns)].to_numpy(np.float64).sum(axis=0)))
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(config: ExperimentConfig, root: Path, cells: list[Cell], records: dict, stats: dict, wall_seconds: float) -> dict:
    """Write cells.csv, table.csv, table.md, plot.png, metrics.json and the leaderboard row."""
    per_cell = cell_table(config, cells, records, stats)
    table = compare_arms(config, cells, stats)
    atomic_write_csv(per_cell, root / "cells.csv", float_format="%.6f")
    atomic_write_csv(table, root / "table.csv", float_format="%.6f")
    trained_seconds = float(per_cell["train_seconds"].sum())
    atomic_write_text(root / "table.md", markdown_report(config, table, per_cell, wall_seconds, trained_seconds))
    plot_fractions(table, root / "plot.png")
    summary = {
        "kind": "ssl_study",
        "name": root.name,
        "experiment": config.name,
        "config_hash": config.hash(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "cell_train_seconds": trained_seconds,
        "cells_reused": int(per_cell["reused"].sum()),
        "fractions": list(config.ssl.study.fractions),
        "seeds": list(config.ssl.study.seeds),
        "folds": list(config.ssl.study.folds),
        "rounds": config.ssl.study.rounds,
        "arms": list(study_arms(config)),
        "confidence": CONFIDENCE,
        "results": table.to_dict(orient="records"),
    }
    atomic_write_text(root / "metrics.json", json.dumps(summary, indent=2, default=float))
    update_leaderboard(Path(config.paths.runs_dir).parent / "leaderboard_ssl.csv", summary)
    logger.info("SSL study done in %.0f s; table: %s", wall_seconds, root / "table.md")
    return summary


def update_leaderboard(path: Path, summary: dict) -> pd.DataFrame:
    """Add or replace the row of this study (same name) in the SSL leaderboard CSV."""
    row = {
        "study": summary["name"],
        "experiment": summary["experiment"],
        "config_hash": summary["config_hash"],
        "finished_at": summary["finished_at"],
        "wall_seconds": round(summary["wall_seconds"], 1),
        "seeds": len(summary["seeds"]),
        "folds": " ".join(str(f) for f in summary["folds"]),
        "rounds": summary["rounds"],
    }
    for result in summary["results"]:
        if result["metric"] not in ("vertebra_exact_match", "competition_per_study"):
            continue
        prefix = f"{result['metric']}@{result['fraction']:g}"
        for arm in ("supervised", "semi_supervised", "supervised_matched"):
            row[f"{prefix}_{arm}"] = result[arm]
        row[f"{prefix}_difference"] = result["difference"]
        row[f"{prefix}_ci"] = f"[{result['difference_low']:.4f}, {result['difference_high']:.4f}]"
    board = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if len(board) and "study" in board.columns:
        board = board[board["study"] != row["study"]]
    board = pd.concat([board, pd.DataFrame([row])], ignore_index=True)
    atomic_write_csv(board, path, float_format="%.6f")
    return board


def _cell_text(value: float, sd: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.4f} ± {sd:.4f}"


def _difference_text(value: float, low: float, high: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:+.4f} [{low:+.4f}, {high:+.4f}]"


def markdown_report(config: ExperimentConfig, table: pd.DataFrame, per_cell: pd.DataFrame, wall_seconds: float, trained_seconds: float) -> str:
    """Return the study's result as Markdown: settings, the comparison table and the cells."""
    study = config.ssl.study
    lines = [
        f"# SSL study {study.name or 'ssl-study-' + config.name}",
        "",
        f"Experiment `{config.name}` (config hash {config.hash()}), folds {list(study.folds)}, seeds {list(study.seeds)}, "
        f"{study.rounds} self-training round(s). Wall time {wall_seconds:.0f} s; cell training time {trained_seconds:.0f} s.",
        "",
        "Differences are semi-supervised minus the baseline, averaged over seeds, with a 95% interval from a bootstrap "
        f"over held-out studies ({study.bootstrap} resamples, paired by seed and fold). `matched` is the supervised "
        "model fine-tuned on the labelled studies alone for as many optimiser steps as the semi-supervised student "
        "(vertebra metrics only).",
        "",
        "| fraction | metric | better | supervised | semi-supervised | matched | semi - supervised [95% CI] | semi - matched [95% CI] | studies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table.to_dict(orient="records"):
        lines.append(
            f"| {row['fraction']:g} | {row['metric']} | {row['better']} | {_cell_text(row['supervised'], row['supervised_sd'])} | "
            f"{_cell_text(row['semi_supervised'], row['semi_supervised_sd'])} | "
            f"{_cell_text(row['supervised_matched'], row['supervised_matched_sd'])} | "
            f"{_difference_text(row['difference'], row['difference_low'], row['difference_high'])} | "
            f"{_difference_text(row['difference_matched'], row['difference_matched_low'], row['difference_matched_high'])} | "
            f"{row['n_studies']} |"
        )
    lines += ["", "± is the standard deviation over seeds.", "", "## Metrics", ""]
    lines += [f"- `{name}`: {text}" for name, text in METRIC_DESCRIPTIONS.items()]
    lines += ["", "## Cells (pooled over folds)", "", "| fraction | arm | seed | labelled studies | " + " | ".join(m.name for m in METRICS) + " | train s |"]
    lines.append("|" + "---|" * (5 + len(METRICS)))
    for row in per_cell.to_dict(orient="records"):
        values = " | ".join("n/a" if not np.isfinite(row[m.name]) else f"{row[m.name]:.4f}" for m in METRICS)
        lines.append(f"| {row['fraction']:g} | {row['arm']} | {row['seed']} | {row['labelled_studies']} | {values} | {row['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_fractions(table: pd.DataFrame, path: Path) -> None:
    """Plot each metric of every arm against the labelled fraction (error bars: sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted_metrics = ["vertebra_exact_match", "vertebra_macro_f1", "competition_per_study"]
    arms = (("supervised", "supervised"), ("semi_supervised", "semi-supervised"), ("supervised_matched", "supervised, matched steps"))
    figure, axes = plt.subplots(1, len(plotted_metrics), figsize=(4.4 * len(plotted_metrics), 3.8))
    for axis, metric in zip(axes, plotted_metrics):
        rows = table[table["metric"] == metric].sort_values("fraction")
        for arm, label in arms:
            if rows[arm].notna().any():
                axis.errorbar(rows["fraction"], rows[arm], yerr=rows[f"{arm}_sd"], marker="o", capsize=3, label=label)
        axis.set_xlabel("labelled fraction of segmented studies")
        axis.set_title(metric + (" (lower is better)" if metric.startswith("competition") else ""))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
