"""Stage 1 for one fold: vertebra model, pseudo-labels, fracture model, out-of-fold predictions.

fold k in 0..n-1 trains on the other folds and predicts fold k; fold -1 trains on every study
and writes no out-of-fold predictions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from csfd.config import ExperimentConfig, SliceModelConfig, save_config
from csfd.constants import VERTEBRAE
from csfd.data import SliceStackDataset, StudyVolumes
from csfd.folds import read_folds
from csfd.fracture_targets import fracture_targets, negative_subsampler, target_visibility_labels, visibility_targets
from csfd.io_utils import atomic_write_csv, atomic_write_text
from csfd.logs import add_file_log
from csfd.models import create_slice_model
from csfd.trainer import resolve_device, seed_everything, train_stage
from csfd.checkpoint import start_run_dir
from csfd.distributed import barrier, is_main_process, run_on_main

logger = logging.getLogger(__name__)

VIS_COLUMNS = [f"vis_{v}" for v in VERTEBRAE]
FRAC_COLUMNS = [f"frac_{v}" for v in VERTEBRAE]


class SliceTable:
    """The slices of a set of studies as numpy arrays, ready for SliceStackDataset."""

    def __init__(self, slices: pd.DataFrame, study_uids: list[str]) -> None:
        self.study_uids = study_uids
        order = {uid: i for i, uid in enumerate(study_uids)}
        rows = slices[slices["StudyInstanceUID"].isin(order)].copy()
        rows["study_index"] = rows["StudyInstanceUID"].map(order)
        rows = rows.sort_values(["study_index", "position_index"]).reset_index(drop=True)
        self.frame = rows[["StudyInstanceUID", "slice_number", "position_index"]]
        self.study_index = rows["study_index"].to_numpy(np.int64)
        self.position_index = rows["position_index"].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.study_index)

    def dataset(self, cache, model_config: SliceModelConfig, targets: np.ndarray | None, weights=None, augment=False, seed=0):
        if targets is None:
            targets = np.zeros((len(self), 1), dtype=np.float32)
        return SliceStackDataset(
            StudyVolumes(cache, self.study_uids),
            self.study_index,
            self.position_index,
            targets,
            weights,
            model_config.context_slices,
            model_config.image_size,
            model_config.augment if augment else None,
            seed,
        )


def _split_studies(config: ExperimentConfig, fold: int, prepared: set[str]) -> tuple[list[str], list[str], pd.DataFrame]:
    labels = pd.read_csv(Path(config.paths.data_dir) / "train.csv")
    folds = read_folds(Path(config.paths.folds_csv))
    if fold >= folds["fold"].max() + 1 or fold < -1:
        raise ValueError(f"fold {fold} does not exist in {config.paths.folds_csv} (folds 0..{folds['fold'].max()}, or -1 for all)")
    folds = folds[folds["StudyInstanceUID"].isin(prepared)]
    if fold == -1:
        train = sorted(folds["StudyInstanceUID"])
        valid: list[str] = []
    else:
        train = sorted(folds.loc[folds["fold"] != fold, "StudyInstanceUID"])
        valid = sorted(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
    return train, valid, labels.set_index("StudyInstanceUID")


def _vertebra_targets(table: SliceTable, vertebra_labels: pd.DataFrame) -> np.ndarray:
    merged = table.frame.merge(vertebra_labels, on=["StudyInstanceUID", "slice_number"], how="left", suffixes=("", "_seg"))
    if merged[list(VERTEBRAE)].isna().any().any():
        uid = merged.loc[merged[list(VERTEBRAE)].isna().any(axis=1), "StudyInstanceUID"].iloc[0]
        raise ValueError(f"vertebra_labels.csv lacks slices of segmented study {uid}; rerun `make prepare`")
    return merged[list(VERTEBRAE)].to_numpy(np.float32)


def train_fold(config: ExperimentConfig, fold: int, resume: bool = False) -> dict:
    """Run stage 1 for `fold` and write its run folder; return the metrics.

    A run folder of the same config continues from its checkpoints and finished stages. With
    `resume`, a run folder of another config raises ConfigError (csfd.checkpoint.start_run_dir).
    Under torchrun every rank trains and only rank 0 writes files.
    """
    from csfd.cache import StudyCache

    run_dir = config.run_dir(fold)
    run_on_main(start_run_dir, config, run_dir, resume)
    log_handler = add_file_log(run_dir / "train.log") if is_main_process() else None
    try:
        metrics = _train_fold(config, fold, run_dir, StudyCache(Path(config.paths.cache_dir), "train"))
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
    barrier()
    return metrics


def _train_fold(config: ExperimentConfig, fold: int, run_dir: Path, cache) -> dict:
    if is_main_process():
        save_config(config, run_dir / "config.yaml")
    seed = config.seed + max(fold, 0)
    seed_everything(seed)
    device = resolve_device(config.device)
    logger.info("Training %s fold %d on %s (config hash %s)", config.name, fold, device, config.hash())

    prepared = set(cache.study_uids)
    train_uids, valid_uids, labels = _split_studies(config, fold, prepared)
    vertebra_labels = cache.vertebra_labels()
    segmented = set(vertebra_labels["StudyInstanceUID"]) if len(vertebra_labels) else set()
    boxes_path = Path(config.paths.data_dir) / "train_bounding_boxes.csv"
    boxes = pd.read_csv(boxes_path) if boxes_path.is_file() else pd.DataFrame(columns=["StudyInstanceUID", "slice_number"])
    metrics: dict = {"fold": fold, "config_hash": config.hash(), "n_train_studies": len(train_uids), "n_valid_studies": len(valid_uids)}

    # Stage 1a/1b (csfd.ssl): the vertebra model learns C1..C7 visibility on the labelled
    # segmented training studies (ssl.labelled_fraction of them; the others count as unlabelled),
    # self-trains for ssl.rounds rounds on the unlabelled training studies, then labels every
    # study. Studies with true labels keep them as targets for the fracture model.
    from csfd.ssl import run_vertebra_stage, split_vertebra_studies

    try:
        split = split_vertebra_studies(train_uids, valid_uids, segmented, config.ssl.labelled_fraction, seed)
    except ValueError as error:
        raise ValueError(f"fold {fold}: {error}") from error
    segmented = split.true_labels
    vertebra = run_vertebra_stage(
        config,
        cache,
        run_dir,
        device,
        seed,
        labelled=split.labelled,
        unlabelled=split.unlabelled,
        valid_segmented=split.valid_segmented,
        all_studies=sorted(set(train_uids) | set(valid_uids)),
        vertebra_labels=vertebra_labels,
    )
    metrics["vertebra"] = vertebra.metrics
    pseudo = vertebra.labels

    # Stage 1c: the fracture model on every training study, 2.5D input.
    fcfg = config.fracture
    in_chans_f = 2 * fcfg.context_slices + 1
    table_train = SliceTable(cache.slices, train_uids)
    target_labels = target_visibility_labels(config, pseudo, cache.slices)
    visibility_train = visibility_targets(table_train.frame, target_labels, vertebra_labels, segmented, fcfg.visibility_threshold)
    targets, weights = fracture_targets(table_train.frame, visibility_train, labels, boxes, fcfg)
    fracture_model = create_slice_model(fcfg.backbone, in_chans_f, 2 * len(VERTEBRAE), fcfg.pretrained_path)
    train_set = table_train.dataset(cache, fcfg, targets, weights, augment=True, seed=seed)
    table_valid = SliceTable(cache.slices, valid_uids)
    valid_set = None
    if valid_uids:
        visibility_valid = visibility_targets(table_valid.frame, target_labels, vertebra_labels, segmented, fcfg.visibility_threshold)
        valid_targets, valid_weights = fracture_targets(table_valid.frame, visibility_valid, labels, boxes, fcfg)
        valid_set = table_valid.dataset(cache, fcfg, valid_targets, valid_weights)
    sampler = negative_subsampler(targets, fcfg.negative_keep, seed)
    from csfd.ssl import fracture_stage_name, refine_fracture_stage

    fracture_meta = {"in_chans": in_chans_f, "num_outputs": 2 * len(VERTEBRAE)}
    result = train_stage(
        fracture_model, train_set, valid_set, fcfg, device, seed, fracture_stage_name(0, config.ssl.fracture_rounds), sampler,
        run_dir=run_dir, config_hash=config.hash(), weights_meta=fracture_meta,
    )
    refinement = []
    if config.ssl.fracture_rounds:
        # Pseudo-label refinement: the previous round's model re-weights which visible slices of
        # a fractured vertebra carry the fracture; box slices stay fixed positives.
        fracture_model, result, refinement = refine_fracture_stage(
            config, cache, run_dir, device, seed, model=fracture_model, table=table_train, targets=targets,
            weights=weights, valid_set=valid_set, sampler=sampler, boxes=boxes, weights_meta=fracture_meta,
        )
    metrics["fracture"] = {"train_loss": result.train_loss, "valid_loss": result.valid_loss, "optimizer_steps": result.optimizer_steps}
    if refinement:
        metrics["fracture"]["refinement"] = refinement

    if valid_uids:
        # The OOF visibility is the vertebra model's raw output, as at test time (csfd.inference).
        metrics["cv"] = _write_oof(config, run_dir, fracture_model, table_valid, vertebra.predictions, labels, cache, device)
    if is_main_process():
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
    logger.info("Fold %d done: %s", fold, json.dumps(metrics, default=float))
    return metrics


def _write_oof(config, run_dir, fracture_model, table_valid, pseudo, labels, cache, device) -> dict:
    from csfd.features import aggregate_predictions
    from csfd.metric import competition_score

    from csfd.ssl import predict_probabilities

    fcfg = config.fracture
    dataset = table_valid.dataset(cache, fcfg, None)
    probs = predict_probabilities(fracture_model, dataset, fcfg.batch_size, fcfg.num_workers, device, "OOF", config.predict.tta_hflip)
    oof = table_valid.frame.merge(pseudo, on=["StudyInstanceUID", "slice_number", "position_index"], how="left")
    oof = oof.rename(columns={v: f"vis_{v}" for v in VERTEBRAE})
    oof[FRAC_COLUMNS] = probs[:, len(VERTEBRAE) :]
    if is_main_process():
        atomic_write_csv(oof, run_dir / "oof_slices.csv", float_format="%.5f")
    study_predictions = aggregate_predictions(oof)
    study_labels = labels.loc[study_predictions["StudyInstanceUID"]].reset_index()
    score = competition_score(study_labels, study_predictions)
    logger.info("Fold OOF plain aggregation: per_study=%.5f flat=%.5f", score["per_study"], score["flat"])
    return {"aggregate": score}
