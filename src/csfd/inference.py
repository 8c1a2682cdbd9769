"""Slice models of a run folder applied to one in-memory study volume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from csfd.config import ExperimentConfig, load_config
from csfd.constants import VERTEBRAE
from csfd.data import batch_model_input
from csfd.models import build_timm_model, load_weights, to_device

logger = logging.getLogger(__name__)


@dataclass
class FoldModels:
    fold: int
    config: ExperimentConfig
    vertebra: nn.Module
    fracture: nn.Module


def find_fold_dirs(run_root: Path, folds: tuple[int, ...] = ()) -> list[tuple[int, Path]]:
    """Return (fold, folder) for every fold with both weights, or only those named in `folds`."""
    found = []
    for folder in sorted(run_root.glob("fold*")):
        suffix = folder.name[len("fold") :]
        if not suffix.lstrip("-").isdigit():
            continue
        if (folder / "vertebra.pt").is_file() and (folder / "fracture.pt").is_file():
            found.append((int(suffix), folder))
    if folds:
        missing = sorted(set(folds) - {f for f, _ in found})
        if missing:
            raise FileNotFoundError(f"fold(s) {missing} have no trained weights under {run_root}; train them first")
        found = [(f, d) for f, d in found if f in folds]
    return found


def load_fold_models(run_root: Path, folds: tuple[int, ...] = (), device: torch.device | None = None) -> list[FoldModels]:
    """Rebuild each fold's models from its saved config and weights (no pretrained download)."""
    device = device or torch.device("cpu")
    models = []
    for fold, folder in find_fold_dirs(run_root, folds):
        config = load_config(folder / "config.yaml")
        built = []
        for name, model_config in (("vertebra", config.vertebra), ("fracture", config.fracture)):
            weights = folder / f"{name}.pt"
            meta = torch.load(weights, map_location="cpu", weights_only=True)
            model = build_timm_model(model_config.backbone, meta["in_chans"], meta["num_outputs"])
            load_weights(model, weights)
            logger.info("fold %d: %s model (%s) loaded from %s", fold, name, model_config.backbone, weights)
            built.append(to_device(model, device).eval())
        models.append(FoldModels(fold, config, *built))
    if not models:
        raise FileNotFoundError(f"no trained fold found under {run_root}; run `make train FOLD=k` first")
    return models


def _stacks(volume: np.ndarray, positions: np.ndarray, context: int, image_size: int) -> torch.Tensor:
    # One gather, one uint8 resize pass and one float conversion per batch; the same values as
    # stacking to_model_input slice by slice, which the tests check. Built as (B, S, S, C) and
    # viewed as NCHW: channels_last memory, the models' layout, with no copy.
    nhwc = batch_model_input(volume, np.asarray(positions), context, image_size, channels_last=True)
    return torch.from_numpy(nhwc).permute(0, 3, 1, 2)


def strided_positions(n_slices: int, stride: int) -> np.ndarray:
    """Return the position indices a stride-k prediction runs the models on: 0, k, 2k, ... and the last."""
    if stride < 1:
        raise ValueError(f"slice stride must be 1 or more, got {stride}")
    positions = np.arange(0, n_slices, stride)
    if n_slices > 0 and positions[-1] != n_slices - 1:
        positions = np.append(positions, n_slices - 1)
    return positions


def interpolate_positions(values: np.ndarray, positions: np.ndarray, n_slices: int) -> np.ndarray:
    """Expand (len(positions), k) rows predicted at increasing `positions` to (n_slices, k),
    linear in the position index between them."""
    if len(positions) == n_slices:
        return values
    grid = np.arange(n_slices)
    return np.stack([np.interp(grid, positions, values[:, column]) for column in range(values.shape[1])], axis=1)


def _sigmoid_outputs(model: nn.Module, images: torch.Tensor, device: torch.device) -> np.ndarray:
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
            logits = model(images)
    else:
        logits = model(images)
    return torch.sigmoid(logits.float()).cpu().numpy()


def predict_volume(
    volume: np.ndarray,
    fold_models: list[FoldModels],
    batch_size: int,
    device: torch.device | None = None,
    slice_stride: int = 1,
    tta_hflip: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (visibility, fracture), each (n_slices, 7), averaged over the fold models.

    With slice_stride k > 1 the models run on every k-th slice and the last one only (each
    still sees its full 2.5D neighbourhood) and the other slices are interpolated linearly.
    `tta_hflip` adds the left-right mirrored slices (test-time augmentation); None takes
    predict.tta_hflip from each fold's saved config.
    """
    device = device or torch.device("cpu")
    positions = strided_positions(len(volume), slice_stride)
    # Models that read the same 2.5D input (context, image size) share each built batch, so a
    # batch is built once for every fold and both models instead of once per model.
    groups: dict[tuple[int, int], list[tuple[str, nn.Module, bool]]] = {}
    for models in fold_models:
        flip = models.config.predict.tta_hflip if tta_hflip is None else tta_hflip
        for kind, model, section in (("vertebra", models.vertebra, models.config.vertebra), ("fracture", models.fracture, models.config.fracture)):
            groups.setdefault((section.context_slices, section.image_size), []).append((kind, model, flip))
    sums = {"vertebra": np.zeros((len(positions), len(VERTEBRAE))), "fracture": np.zeros((len(positions), len(VERTEBRAE)))}
    for (context, image_size), members in groups.items():
        outputs = _run_models([(model, flip) for _, model, flip in members], volume, context, image_size, batch_size, device, positions)
        for (kind, _, _), output in zip(members, outputs):
            sums[kind] += output[:, : len(VERTEBRAE)] if kind == "vertebra" else output[:, len(VERTEBRAE) :]
    visibility = sums["vertebra"] / len(fold_models)
    fracture = sums["fracture"] / len(fold_models)
    return interpolate_positions(visibility, positions, len(volume)), interpolate_positions(fracture, positions, len(volume))


@torch.inference_mode()
def _run_models(
    models: list[tuple[nn.Module, bool]],
    volume: np.ndarray,
    context: int,
    image_size: int,
    batch_size: int,
    device: torch.device,
    positions: np.ndarray,
) -> list[np.ndarray]:
    """Return each (model, tta_hflip)'s sigmoid outputs at `positions`, building every batch once."""
    outputs: list[list[np.ndarray]] = [[] for _ in models]
    for start in range(0, len(positions), batch_size):
        images = _stacks(volume, positions[start : start + batch_size], context, image_size).to(device)
        images = images.contiguous(memory_format=torch.channels_last)
        mirrored = torch.flip(images, dims=(-1,)) if any(flip for _, flip in models) else None
        for index, (model, flip) in enumerate(models):
            probabilities = _sigmoid_outputs(model, images, device)
            if flip:
                probabilities = (probabilities + _sigmoid_outputs(model, mirrored, device)) / 2.0
            outputs[index].append(probabilities)
    return [np.concatenate(parts) for parts in outputs]


def slice_predictions_frame(study_uid: str, slice_numbers: np.ndarray, visibility: np.ndarray, fracture: np.ndarray) -> pd.DataFrame:
    """Return slice predictions in the out-of-fold file's layout."""
    frame = pd.DataFrame(
        {
            "StudyInstanceUID": study_uid,
            "slice_number": np.asarray(slice_numbers, dtype=int),
            "position_index": np.arange(len(slice_numbers)),
        }
    )
    frame[[f"vis_{v}" for v in VERTEBRAE]] = visibility
    frame[[f"frac_{v}" for v in VERTEBRAE]] = fracture
    return frame


def check_same_preparation(fold_models: list[FoldModels]) -> None:
    """Reject fold models whose prepare settings differ: one decoded volume serves them all."""
    reference = fold_models[0].config.prepare
    for models in fold_models[1:]:
        if models.config.prepare != reference:
            raise ValueError(f"fold {models.fold} was trained on another prepare config than fold {fold_models[0].fold}")


def run_folder_of(fold_models: list[FoldModels]) -> Path:
    return Path(fold_models[0].config.paths.runs_dir) / fold_models[0].config.name
