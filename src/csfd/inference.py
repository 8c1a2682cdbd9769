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
from csfd.data import stack_indices, to_model_input
from csfd.models import create_slice_model, load_weights

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
            model = create_slice_model(model_config.backbone, meta["in_chans"], meta["num_outputs"], "")
            load_weights(model, weights)
            built.append(model.to(device).eval())
        models.append(FoldModels(fold, config, *built))
    if not models:
        raise FileNotFoundError(f"no trained fold found under {run_root}; run `make train FOLD=k` first")
    return models


def _stacks(volume: np.ndarray, positions: np.ndarray, context: int, image_size: int) -> torch.Tensor:
    batch = [to_model_input(np.asarray(volume[stack_indices(int(p), len(volume), context)]), image_size) for p in positions]
    return torch.from_numpy(np.stack(batch))


@torch.inference_mode()
def _run_model(model: nn.Module, volume: np.ndarray, context: int, image_size: int, batch_size: int, device: torch.device) -> np.ndarray:
    outputs = []
    for start in range(0, len(volume), batch_size):
        positions = np.arange(start, min(start + batch_size, len(volume)))
        images = _stacks(volume, positions, context, image_size).to(device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
                logits = model(images)
        else:
            logits = model(images)
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(outputs)


def predict_volume(
    volume: np.ndarray, fold_models: list[FoldModels], batch_size: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (visibility, fracture), each (n_slices, 7), averaged over the fold models."""
    device = device or torch.device("cpu")
    visibility = np.zeros((len(volume), len(VERTEBRAE)), dtype=np.float64)
    fracture = np.zeros_like(visibility)
    for models in fold_models:
        vcfg, fcfg = models.config.vertebra, models.config.fracture
        visibility += _run_model(models.vertebra, volume, vcfg.context_slices, vcfg.image_size, batch_size, device)
        fracture_out = _run_model(models.fracture, volume, fcfg.context_slices, fcfg.image_size, batch_size, device)
        fracture += fracture_out[:, len(VERTEBRAE) :]
    return visibility / len(fold_models), fracture / len(fold_models)


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
