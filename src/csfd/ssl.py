"""Semi-supervised stage 1: self-training of the vertebra model and pseudo-label sets.

Round 0 trains a teacher on the labelled segmented studies. In each round r >= 1 the model of
round r-1 labels the unlabelled training studies, the labels pass through the anatomical
consistency step (csfd.anatomy) and a confidence filter, and a student trains on the true
labels plus these pseudo-labels. The model of the last round labels every study for the
fracture model. With ssl.rounds = 0 only the teacher is trained and the final labels are its
raw probabilities, the supervised pipeline.

Every pseudo-label set lands in run_dir/pseudo_labels/round<r>.csv, made by the model of
round r, beside round<r>.json naming that model's weights file, its SHA-256, the config hash
and summary numbers. The final set is also written to run_dir/pseudo_labels.csv.

The fracture-target refinement (refine_fracture_targets) is the same idea for stage 1c: a
fracture model re-weights which visible slices of a fractured vertebra carry the fracture.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from csfd.anatomy import AnatomyOptions, count_order_violations, refine_frame
from csfd.config import ExperimentConfig, SSLConfig
from csfd.constants import VERTEBRAE
from csfd.distributed import is_main_process
from csfd.io_utils import atomic_write_csv, atomic_write_text
from csfd.models import create_slice_model, load_weights, save_weights
from csfd.train import SliceTable, _vertebra_targets
from csfd.trainer import predict, train_stage

logger = logging.getLogger(__name__)

PSEUDO_DIR = "pseudo_labels"
KEY_COLUMNS = ["StudyInstanceUID", "slice_number", "position_index"]
LABEL_COLUMNS = list(VERTEBRAE)


# ---------------------------------------------------------------------------------------------
# Labelled subset, confidence weights, targets


def select_labelled(segmented_uids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Return the segmented studies whose labels are used, sorted.

    The studies are permuted with `seed` and the first ceil(fraction * n) are kept (at least
    one), so for one seed a smaller fraction's set is part of every larger one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labelled fraction must lie in (0, 1], got {fraction}")
    ordered = sorted(segmented_uids)
    if not ordered:
        return []
    count = max(1, math.ceil(fraction * len(ordered) - 1e-9))
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    return sorted(ordered[i] for i in permutation[:count])


@dataclass(frozen=True)
class VertebraSplit:
    """The studies of a fold's vertebra stage: labelled, unlabelled and held out."""

    labelled: list[str]  # training studies whose segmentation labels are used
    unlabelled: list[str]  # training studies without used labels (pseudo-labelled when ssl.rounds > 0)
    valid_segmented: list[str]  # held-out segmented studies: validation loss and metrics
    true_labels: set[str]  # every study whose true labels the fold uses: labelled and held-out segmented


def split_vertebra_studies(
    train_uids: Sequence[str], valid_uids: Sequence[str], segmented: set[str], fraction: float, seed: int
) -> VertebraSplit:
    """Split a fold's studies for the vertebra stage, keeping `fraction` of the segmented training studies."""
    seg_train = [u for u in train_uids if u in segmented]
    if not seg_train:
        raise ValueError("no segmented study among the training folds; the vertebra model needs some")
    labelled = select_labelled(seg_train, fraction, seed)
    valid_segmented = [u for u in valid_uids if u in segmented]
    true_labels = set(labelled) | set(valid_segmented)
    unlabelled = [u for u in train_uids if u not in true_labels]
    return VertebraSplit(labelled, unlabelled, valid_segmented, true_labels)


def confidence_weights(probabilities: np.ndarray, config: SSLConfig) -> np.ndarray:
    """Return one loss weight per slice: pseudo_weight, times uncertain_weight when uncertain.

    A slice is uncertain when any of its seven probabilities lies strictly between
    confidence_low and confidence_high; uncertain_weight 0 drops it.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    uncertain = ((p > config.confidence_low) & (p < config.confidence_high)).any(axis=1)
    return (np.where(uncertain, config.uncertain_weight, 1.0) * config.pseudo_weight).astype(np.float32)


def pseudo_targets(probabilities: np.ndarray, hard: bool) -> np.ndarray:
    """Return training targets: 0/1 at 0.5 when `hard`, else the probabilities themselves."""
    p = np.asarray(probabilities, dtype=np.float32)
    return (p >= 0.5).astype(np.float32) if hard else p.copy()


def anatomy_options(config: SSLConfig) -> AnatomyOptions:
    return AnatomyOptions(
        skip_penalty=config.anatomy_skip_penalty,
        edge_penalty=config.anatomy_edge_penalty,
        identity_noise=config.anatomy_identity_noise,
        smooth_sigma=config.anatomy_smooth_sigma,
    )


def build_pseudo_labels(predictions: pd.DataFrame, config: SSLConfig) -> tuple[pd.DataFrame, dict]:
    """Turn a model's slice probabilities into a pseudo-label set and summary numbers.

    `predictions` has StudyInstanceUID, slice_number, position_index, C1..C7 and, for the
    anatomy step's slice spacing, z. Steps: anatomical consistency (when ssl.anatomy), then
    confidence weights, then hard or soft targets. Returns the set (key columns, C1..C7,
    weight) and a summary: slices, studies, mean weight, share of slices with weight 0, and
    order violations before and after the anatomy step.
    """
    raw = predictions[LABEL_COLUMNS].to_numpy(np.float64)
    refined = predictions
    if config.anatomy and len(predictions):
        refined = refine_frame(predictions, LABEL_COLUMNS, anatomy_options(config), min_level_mm=config.anatomy_min_level_mm)
    probabilities = refined[LABEL_COLUMNS].to_numpy(np.float64)
    weights = confidence_weights(probabilities, config)
    labels = predictions[KEY_COLUMNS].copy()
    labels[LABEL_COLUMNS] = pseudo_targets(probabilities, config.hard_labels)
    labels["weight"] = weights
    summary = {
        "slices": int(len(labels)),
        "studies": int(labels["StudyInstanceUID"].nunique()),
        "mean_weight": float(weights.mean()) if len(weights) else float("nan"),
        "dropped_fraction": float((weights == 0).mean()) if len(weights) else float("nan"),
        "order_violations_raw": _violations(predictions, raw),
        "order_violations_labels": _violations(predictions, probabilities),
    }
    return labels, summary


def _violations(frame: pd.DataFrame, probabilities: np.ndarray) -> int:
    positions = frame["position_index"].to_numpy()
    total = 0
    for rows in frame.groupby("StudyInstanceUID", sort=False).indices.values():
        total += count_order_violations(probabilities[rows], positions[rows])
    return total


# ---------------------------------------------------------------------------------------------
# Saved pseudo-label sets


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_pseudo_label_set(
    run_dir: Path, round_index: int, labels: pd.DataFrame, teacher_weights: Path, config: ExperimentConfig, details: dict
) -> Path:
    """Write pseudo_labels/round<r>.csv and its JSON record; return the CSV path.

    The record names the weights of the model that made the set (relative to run_dir when
    inside it), their SHA-256 and the config hash, so a run can be checked and repeated.
    """
    folder = Path(run_dir) / PSEUDO_DIR
    csv_path = folder / f"round{round_index}.csv"
    if not is_main_process():
        return csv_path
    atomic_write_csv(labels, csv_path, float_format="%.5f")
    teacher_weights = Path(teacher_weights)
    try:
        teacher_name = str(teacher_weights.resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        teacher_name = str(teacher_weights)
    record = {
        "round": round_index,
        "teacher_weights": teacher_name,
        "teacher_sha256": file_sha256(teacher_weights),
        "config_hash": config.hash(),
        "hard_labels": config.ssl.hard_labels,
        "anatomy": config.ssl.anatomy,
        "confidence_low": config.ssl.confidence_low,
        "confidence_high": config.ssl.confidence_high,
        "uncertain_weight": config.ssl.uncertain_weight,
        **details,
    }
    atomic_write_text(folder / f"round{round_index}.json", json.dumps(record, indent=2, default=float))
    return csv_path


def load_pseudo_label_set(run_dir: Path, round_index: int) -> tuple[pd.DataFrame, dict]:
    """Read pseudo_labels/round<r>.csv and its JSON record."""
    folder = Path(run_dir) / PSEUDO_DIR
    csv_path, json_path = folder / f"round{round_index}.csv", folder / f"round{round_index}.json"
    for path in (csv_path, json_path):
        if not path.is_file():
            raise FileNotFoundError(f"pseudo-label set not found: {path}; train the fold with ssl.rounds >= {round_index}")
    labels = pd.read_csv(csv_path, dtype={"StudyInstanceUID": str})
    return labels, json.loads(json_path.read_text())


# ---------------------------------------------------------------------------------------------
# Prediction with test-time flip


class FlippedImages(Dataset):
    """The items of a slice dataset with each image mirrored left to right."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int):
        image, target, weight = self.dataset[item]
        return torch.flip(image, dims=(-1,)), target, weight


def predict_probabilities(
    model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, label: str, tta_hflip: bool = False
) -> np.ndarray:
    """Return the model's probabilities, averaged with those of the mirrored images when `tta_hflip`."""
    probabilities = predict(model, dataset, batch_size, num_workers, device, label)
    if tta_hflip:
        flipped = predict(model, FlippedImages(dataset), batch_size, num_workers, device, f"{label} (flipped)")
        probabilities = (probabilities + flipped) / 2.0
    return probabilities


# ---------------------------------------------------------------------------------------------
# Vertebra metrics


def vertebra_metrics(probabilities: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Return slice metrics of C1..C7 visibility at `threshold`.

    output_accuracy is the share of correct (slice, vertebra) outputs, and exact_match the share
    of slices with all seven outputs correct. macro_f1 averages the F1 of the vertebrae that are
    present or predicted, so a vertebra with neither is left out.
    """
    predicted = np.asarray(probabilities) > threshold
    actual = np.asarray(truth) > 0.5
    if len(actual) == 0:
        return {"output_accuracy": float("nan"), "exact_match": float("nan"), "macro_f1": float("nan")}
    tp = (predicted & actual).sum(axis=0)
    fp = (predicted & ~actual).sum(axis=0)
    fn = (~predicted & actual).sum(axis=0)
    return {
        "output_accuracy": float((predicted == actual).mean()),
        "exact_match": float((predicted == actual).all(axis=1).mean()),
        "macro_f1": macro_f1_from_counts(tp, fp, fn),
    }


def macro_f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Return the mean F1 over classes with tp + fp + fn > 0, or NaN when there is none."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    defined = denominator > 0
    if not defined.any():
        return float("nan")
    return float(np.mean(2 * tp[defined] / denominator[defined]))


# ---------------------------------------------------------------------------------------------
# The vertebra stage


@dataclass
class VertebraStage:
    """Outcome of stage 1a/1b for one fold."""

    model: nn.Module
    predictions: pd.DataFrame  # final model's raw probabilities: key columns and C1..C7, every study
    labels: pd.DataFrame  # visibility for the fracture targets, same rows; raw when ssl.rounds is 0
    metrics: dict


@dataclass
class _Context:
    config: ExperimentConfig
    cache: object
    run_dir: Path
    device: torch.device
    seed: int
    vertebra_labels: pd.DataFrame
    valid_table: SliceTable | None
    valid_targets: np.ndarray | None

    @property
    def vcfg(self):
        return self.config.vertebra

    @property
    def in_chans(self) -> int:
        return 2 * self.vcfg.context_slices + 1


def run_vertebra_stage(
    config: ExperimentConfig,
    cache,
    run_dir: Path,
    device: torch.device,
    seed: int,
    *,
    labelled: Sequence[str],
    unlabelled: Sequence[str],
    valid_segmented: Sequence[str],
    all_studies: Sequence[str],
    vertebra_labels: pd.DataFrame,
) -> VertebraStage:
    """Train the vertebra model with ssl.rounds self-training rounds and label every study.

    `labelled` are the training studies with true labels and `unlabelled` the training
    studies that students train on with pseudo-labels. `valid_segmented` are the held-out
    segmented studies for the validation loss and metrics, and `all_studies` the studies of
    the final labels. Writes
    vertebra.pt (the final model), vertebra_round<r>.pt for earlier rounds, the pseudo-label
    sets and pseudo_labels.csv (the final set without the studies that have true labels).
    """
    if not labelled:
        raise ValueError("the vertebra model needs at least one labelled (segmented) training study")
    ssl = config.ssl
    valid_table = SliceTable(cache.slices, list(valid_segmented)) if valid_segmented else None
    valid_targets = _vertebra_targets(valid_table, vertebra_labels) if valid_table is not None else None
    context = _Context(config, cache, Path(run_dir), device, seed, vertebra_labels, valid_table, valid_targets)
    logger.info(
        "Vertebra stage: %d labelled, %d unlabelled training studies, %d self-training round(s)",
        len(labelled),
        len(unlabelled),
        ssl.rounds,
    )

    model, round_metrics = _teacher(context, list(labelled))
    rounds = [round_metrics]
    unlabelled_table = SliceTable(cache.slices, list(unlabelled)) if unlabelled else None
    weights_path = _weights_path(context, model, 0)
    for round_index in range(1, ssl.rounds + 1):
        if unlabelled_table is None or ssl.pseudo_weight == 0:
            reason = "no unlabelled training study" if unlabelled_table is None else "ssl.pseudo_weight is 0"
            logger.warning("Round %d trains on the labelled studies only: %s", round_index, reason)
            pseudo, summary = None, {"slices": 0}
        else:
            predictions = _predict_frame(context, model, unlabelled_table, f"pseudo-labels round {round_index - 1}")
            pseudo, summary = build_pseudo_labels(predictions, ssl)
            save_pseudo_label_set(
                context.run_dir, round_index - 1, pseudo, weights_path, config, {**summary, "trains_round": round_index}
            )
            logger.info("Round %d pseudo-labels: %s", round_index - 1, json.dumps(summary, default=float))
        model, round_metrics = _student(context, model, list(labelled), pseudo, round_index)
        round_metrics["pseudo_labels"] = summary
        rounds.append(round_metrics)
        weights_path = _weights_path(context, model, round_index)

    all_table = SliceTable(cache.slices, list(all_studies))
    predictions = _predict_frame(context, model, all_table, "final vertebra labels")
    if ssl.rounds == 0:
        labels = predictions[KEY_COLUMNS + LABEL_COLUMNS].copy()
        summary = {"slices": int(len(labels))}
    else:
        labels, summary = build_pseudo_labels(predictions, ssl)
        labels = labels.drop(columns="weight")
    true_label_studies = set(labelled) | set(valid_segmented)
    final = labels[~labels["StudyInstanceUID"].isin(true_label_studies)]
    final_with_weight = final.assign(weight=1.0) if "weight" not in final.columns else final
    save_pseudo_label_set(context.run_dir, ssl.rounds, final_with_weight, weights_path, config, {**summary, "trains_round": None})
    if is_main_process():
        atomic_write_csv(final, context.run_dir / "pseudo_labels.csv", float_format="%.5f")

    metrics = {key: rounds[-1][key] for key in ("train_loss", "valid_loss", "optimizer_steps") if key in rounds[-1]}
    for key in ("valid_slice_accuracy", "valid_exact_match", "valid_macro_f1"):
        if key in rounds[-1]:
            metrics[key] = rounds[-1][key]
    metrics.update(labelled_studies=len(labelled), unlabelled_studies=len(unlabelled), rounds=rounds)
    return VertebraStage(model, predictions[KEY_COLUMNS + LABEL_COLUMNS], labels, metrics)


def _new_model(context: _Context) -> nn.Module:
    vcfg = context.vcfg
    return create_slice_model(vcfg.backbone, context.in_chans, len(VERTEBRAE), vcfg.pretrained_path)


def _teacher(context: _Context, labelled: list[str]) -> tuple[nn.Module, dict]:
    """Return the round-0 model: loaded from ssl.teacher_weights, or trained on the labelled studies."""
    config, vcfg = context.config, context.vcfg
    model = _new_model(context)
    start = time.time()
    metrics: dict = {"round": 0, "labelled_slices": 0, "pseudo_slices": 0}
    if config.ssl.teacher_weights:
        path = Path(config.ssl.teacher_weights)
        if not path.is_file():
            raise FileNotFoundError(f"ssl.teacher_weights not found: {path}; point it at a vertebra.pt or leave it empty")
        meta = load_weights(model, path)
        if meta.get("in_chans") != context.in_chans or meta.get("num_outputs") != len(VERTEBRAE):
            raise ValueError(
                f"{path}: weights for in_chans={meta.get('in_chans')}, num_outputs={meta.get('num_outputs')}; "
                f"this config needs in_chans={context.in_chans}, num_outputs={len(VERTEBRAE)}"
            )
        logger.info("Round 0 teacher loaded from %s (trained with config %s)", path, meta.get("config_hash"))
        metrics["teacher_weights"] = str(path)
    else:
        table = SliceTable(context.cache.slices, labelled)
        targets = _vertebra_targets(table, context.vertebra_labels)
        train_set = table.dataset(context.cache, vcfg, targets, augment=True, seed=context.seed)
        result = _train(context, model, train_set, vcfg, context.seed, 0)
        metrics.update(train_loss=result.train_loss, valid_loss=result.valid_loss, optimizer_steps=result.optimizer_steps)
        metrics["labelled_slices"] = len(table)
    metrics.update(_valid_metrics(context, model))
    metrics["seconds"] = time.time() - start
    return model, metrics


def _student(context: _Context, teacher: nn.Module, labelled: list[str], pseudo: pd.DataFrame | None, round_index: int) -> tuple[nn.Module, dict]:
    """Train the student of `round_index` on the true labels plus the pseudo-labels."""
    config, ssl = context.config, context.config.ssl
    vcfg = dataclasses.replace(context.vcfg, epochs=ssl.student_epochs or context.vcfg.epochs)
    start = time.time()
    labelled_table = SliceTable(context.cache.slices, labelled)
    labelled_targets = _vertebra_targets(labelled_table, context.vertebra_labels)
    studies = list(labelled)
    targets = [labelled_targets]
    weights = [np.ones_like(labelled_targets)]
    if pseudo is not None and len(pseudo):
        pseudo_uids = list(dict.fromkeys(pseudo["StudyInstanceUID"]))
        pseudo_table = SliceTable(context.cache.slices, pseudo_uids)
        aligned = pseudo_table.frame.merge(pseudo, on=KEY_COLUMNS, how="left")
        if aligned[LABEL_COLUMNS].isna().any().any():
            raise ValueError(f"round {round_index}: the pseudo-label set lacks slices of its studies; the cache changed during the run")
        studies += pseudo_uids
        targets.append(aligned[LABEL_COLUMNS].to_numpy(np.float32))
        weights.append(np.repeat(aligned["weight"].to_numpy(np.float32)[:, None], len(VERTEBRAE), axis=1))
    table = SliceTable(context.cache.slices, studies)
    all_targets, all_weights = np.concatenate(targets), np.concatenate(weights)
    n_labelled = len(labelled_table)
    seed = context.seed + 1000 * round_index
    train_set = table.dataset(context.cache, vcfg, all_targets, all_weights, augment=True, seed=seed)
    sampler = _pseudo_sampler(n_labelled, all_weights[n_labelled:, 0], ssl.pseudo_ratio, seed)

    if ssl.student_init == "teacher":
        model = copy.deepcopy(teacher)
    else:
        model = _new_model(context)
    result = _train(context, model, train_set, vcfg, seed, round_index, sampler)
    n_pseudo_used = int((all_weights[n_labelled:, 0] > 0).sum())
    metrics = {
        "round": round_index,
        "train_loss": result.train_loss,
        "valid_loss": result.valid_loss,
        "optimizer_steps": result.optimizer_steps,
        "labelled_slices": n_labelled,
        "pseudo_slices": n_pseudo_used,
    }
    metrics.update(_valid_metrics(context, model))
    metrics["seconds"] = time.time() - start
    return model, metrics


def _pseudo_sampler(n_labelled: int, pseudo_weights: np.ndarray, ratio: float, seed: int):
    """Return a per-epoch index picker over the labelled slices and the pseudo-labelled ones.

    Each epoch takes every labelled slice and a new random draw of at most `ratio` pseudo-labelled
    slices of nonzero weight per labelled slice. Ratio 0 takes every such slice.
    """
    usable = n_labelled + np.flatnonzero(pseudo_weights > 0)
    if ratio > 0:
        n_pick = min(len(usable), max(1, int(round(ratio * n_labelled))))
    else:
        n_pick = len(usable)
    labelled = np.arange(n_labelled)

    def pick(epoch: int) -> np.ndarray:
        if n_pick == len(usable):
            chosen = usable
        else:
            chosen = np.random.default_rng((seed, epoch)).choice(usable, size=n_pick, replace=False)
        return np.sort(np.concatenate([labelled, chosen]))

    return pick


def _valid_set(context: _Context):
    if context.valid_table is None:
        return None
    return context.valid_table.dataset(context.cache, context.vcfg, context.valid_targets)


def _valid_metrics(context: _Context, model: nn.Module) -> dict:
    if context.valid_table is None:
        return {}
    vcfg = context.vcfg
    probabilities = predict_probabilities(
        model, _valid_set(context), vcfg.batch_size, vcfg.num_workers, context.device, "vertebra valid", context.config.predict.tta_hflip
    )
    scores = vertebra_metrics(probabilities, context.valid_targets)
    return {
        "valid_slice_accuracy": scores["output_accuracy"],
        "valid_exact_match": scores["exact_match"],
        "valid_macro_f1": scores["macro_f1"],
    }


def _predict_frame(context: _Context, model: nn.Module, table: SliceTable, label: str) -> pd.DataFrame:
    """Return key columns, z and C1..C7 probabilities of every slice of `table`."""
    vcfg = context.vcfg
    dataset = table.dataset(context.cache, vcfg, None)
    probabilities = predict_probabilities(
        model, dataset, vcfg.batch_size, vcfg.num_workers, context.device, label, context.config.predict.tta_hflip
    )
    frame = table.frame.copy()
    slices = context.cache.slices
    if "z" in slices.columns:
        frame = frame.merge(slices[["StudyInstanceUID", "slice_number", "z"]], on=["StudyInstanceUID", "slice_number"], how="left")
    frame[LABEL_COLUMNS] = probabilities
    return frame


def _stage_name(context: _Context, round_index: int) -> str:
    """Return the weights name of a round's model: vertebra for the last round, else vertebra_round<r>."""
    return "vertebra" if round_index == context.config.ssl.rounds else f"vertebra_round{round_index}"


def _weights_meta(context: _Context, round_index: int) -> dict:
    return {"in_chans": context.in_chans, "num_outputs": len(VERTEBRAE), "round": round_index}


def _train(context: _Context, model: nn.Module, train_set, vcfg, seed: int, round_index: int, sampler=None):
    """Fit a round's model as a resumable stage of the run folder (run_dir/<stage>.pt)."""
    return train_stage(
        model,
        train_set,
        _valid_set(context),
        vcfg,
        context.device,
        seed,
        _stage_name(context, round_index),
        sampler,
        run_dir=context.run_dir,
        config_hash=context.config.hash(),
        weights_meta=_weights_meta(context, round_index),
    )


def _weights_path(context: _Context, model: nn.Module, round_index: int) -> Path:
    """Return the weights file of a round's model, saving it when training did not (a loaded teacher)."""
    path = context.run_dir / f"{_stage_name(context, round_index)}.pt"
    if round_index == 0 and context.config.ssl.teacher_weights and is_main_process():
        save_weights(model, path, context.config.hash(), _weights_meta(context, round_index))
    return path


# ---------------------------------------------------------------------------------------------
# Fracture-target refinement


def box_slice_mask(frame: pd.DataFrame, boxes: pd.DataFrame) -> np.ndarray:
    """Return True for the rows of `frame` (StudyInstanceUID, slice_number) with a fracture box."""
    if len(boxes) == 0:
        return np.zeros(len(frame), dtype=bool)
    keys = set(zip(boxes["StudyInstanceUID"].astype(str), boxes["slice_number"].astype(int)))
    return np.array([(u, int(s)) in keys for u, s in zip(frame["StudyInstanceUID"], frame["slice_number"])], dtype=bool)


def refine_fracture_targets(
    targets: np.ndarray, predictions: np.ndarray, study_index: np.ndarray, is_box: np.ndarray, floor: float
) -> np.ndarray:
    """Return fracture targets re-weighted by a fracture model's slice predictions.

    `targets` is (n, 7), the study label times visibility, or (n, 14) with visibility first;
    only the fracture part changes. `predictions` contains the model's fracture probabilities
    in the same layout. For each study and vertebra, the positive slices (target > 0) that carry
    no box get target * (floor + (1 - floor) * q), where q is the slice's prediction over the
    largest prediction among the group's positive slices. Box slices and negatives stay as
    they are, so the slice the model finds most fractured keeps its full target.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"fracture refinement floor must lie in [0, 1], got {floor}")
    n_levels = len(VERTEBRAE)
    offset = targets.shape[1] - n_levels
    if offset not in (0, n_levels) or predictions.shape[1] != targets.shape[1] or len(predictions) != len(targets):
        raise ValueError(f"targets {targets.shape} and predictions {predictions.shape} must both be (n, 7) or (n, 14)")
    refined = np.array(targets, dtype=np.float32, copy=True)
    fracture = refined[:, offset:]
    predicted = np.asarray(predictions, dtype=np.float64)[:, offset:]
    study_index = np.asarray(study_index)
    is_box = np.asarray(is_box, dtype=bool)
    for study in np.unique(study_index):
        rows = np.flatnonzero(study_index == study)
        for level in range(n_levels):
            group = rows[fracture[rows, level] > 0]
            if len(group) == 0:
                continue
            peak = predicted[group, level].max()
            share = predicted[group, level] / peak if peak > 0 else np.ones(len(group))
            scale = floor + (1.0 - floor) * share
            keep = is_box[group]
            fracture[group, level] = np.where(keep, fracture[group, level], fracture[group, level] * scale)
    return refined


def fracture_stage_name(round_index: int, rounds: int) -> str:
    """Return the weights name of a fracture round: fracture for the last one, else fracture_round<r>."""
    return "fracture" if round_index == rounds else f"fracture_round{round_index}"


def refine_fracture_stage(
    config: ExperimentConfig,
    cache,
    run_dir: Path,
    device: torch.device,
    seed: int,
    *,
    model: nn.Module,
    table: SliceTable,
    targets: np.ndarray,
    weights: np.ndarray,
    valid_set,
    sampler,
    boxes: pd.DataFrame,
    weights_meta: dict,
):
    """Run ssl.fracture_rounds refinement rounds after the first fracture model.

    In round r the model of round r-1 predicts the training slices, refine_fracture_targets
    re-weights the original targets with those predictions, and a new model trains on them.
    Every round starts from the original weak targets, so refinements do not compound. Returns
    the last model, its FitResult and one summary dict per round.
    """
    fcfg = config.fracture
    rounds = config.ssl.fracture_rounds
    is_box = box_slice_mask(table.frame, boxes)
    positive = targets[:, len(VERTEBRAE) :] > 0
    summaries, result = [], None
    for round_index in range(1, rounds + 1):
        in_sample = predict_probabilities(
            model, table.dataset(cache, fcfg, None), fcfg.batch_size, fcfg.num_workers, device,
            f"fracture refinement {round_index}", config.predict.tta_hflip,
        )
        refined = refine_fracture_targets(targets, in_sample, table.study_index, is_box, config.ssl.fracture_floor)
        round_seed = seed + 2000 * round_index
        train_set = table.dataset(cache, fcfg, refined, weights, augment=True, seed=round_seed)
        model = create_slice_model(fcfg.backbone, weights_meta["in_chans"], weights_meta["num_outputs"], fcfg.pretrained_path)
        result = train_stage(
            model, train_set, valid_set, fcfg, device, round_seed, fracture_stage_name(round_index, rounds), sampler,
            run_dir=run_dir, config_hash=config.hash(), weights_meta={**weights_meta, "round": round_index},
        )
        fracture_part = refined[:, len(VERTEBRAE) :]
        summary = {
            "round": round_index,
            "mean_positive_target": float(fracture_part[positive].mean()) if positive.any() else float("nan"),
            "train_loss": result.train_loss,
            "valid_loss": result.valid_loss,
        }
        logger.info("Fracture refinement round %d: %s", round_index, json.dumps(summary, default=float))
        summaries.append(summary)
    return model, result, summaries
