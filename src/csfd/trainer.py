"""One generic loop that fits a slice model with OneCycleLR and predicts with it.

fit resumes from a checkpoint and runs data-parallel under torchrun (csfd.distributed); with
one process and no checkpoint it is the plain loop. config.batch_size is the global batch:
each of n processes takes batch_size / n items of every batch, so one process and several
train on the same batches with the same schedule.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from csfd.checkpoint import CHECKPOINT_DIR, CheckpointSpec, capture_rng_state, read_finished_stage, restore_rng_state
from csfd.config import SliceModelConfig
from csfd.distributed import (
    all_reduce_sum,
    barrier,
    gather_in_order,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    run_on_main,
)
from csfd.models import save_weights, to_device
from csfd.training_loop import TrainLoop, TrainProgress, autocast, make_loader, optimizer_steps_per_epoch, weighted_bce

# Loader, loss and autocast helpers live in training_loop and are part of this module's API.
__all__ = [
    "FitResult",
    "autocast",
    "evaluate_loss",
    "fit",
    "make_grad_scaler",
    "make_loader",
    "optimizer_steps_per_epoch",
    "predict",
    "resolve_device",
    "seed_everything",
    "train_stage",
    "weighted_bce",
]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Return the device for config.device; under torchrun on GPUs, this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is set to cuda but no CUDA GPU is available; set device=cpu or device=auto")
    if name == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


@dataclass
class FitResult:
    epochs: int
    optimizer_steps: int  # scheduler steps, including those whose update the GradScaler skipped
    train_loss: float
    valid_loss: float | None
    seconds: float
    final_lr: float  # learning rate of the last optimiser step
    planned_steps: int
    skipped_steps: int = 0  # optimiser steps the GradScaler skipped because of inf/nan gradients


def make_grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Return a GradScaler that is enabled only for float16 autocast (CUDA without bfloat16)."""
    enabled = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


def fit(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    config: SliceModelConfig,
    device: torch.device,
    seed: int,
    label: str,
    epoch_subsets=None,
    *,
    checkpoint: CheckpointSpec | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> FitResult:
    """Train `model` for config.epochs with AdamW and OneCycleLR stepped per optimiser step.

    `epoch_subsets(epoch) -> indices` optionally picks the items of each epoch (negative-slice
    subsampling); every epoch must have the same length so the schedule's total is known.
    With `checkpoint`, fit continues from the checkpoint file when it exists and saves it every
    `checkpoint.every_steps` optimiser steps and at each epoch end (rank 0 only).
    `grad_scaler` replaces the default GradScaler (tests use an enabled one on the CPU).
    """
    if config.checkpoint_every_steps < 0:
        raise ValueError(f"checkpoint_every_steps: expected 0 or more, got {config.checkpoint_every_steps}")
    to_device(model, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def epoch_dataset(epoch: int) -> Dataset:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        return Subset(train_set, epoch_subsets(epoch)) if epoch_subsets is not None else train_set

    scaler = grad_scaler if grad_scaler is not None else make_grad_scaler(device)
    loop = TrainLoop(model, optimizer, config, device, seed, label, len(epoch_dataset(0)), scaler)
    if checkpoint is not None:
        loop.restore(checkpoint)

    start = time.time()
    for epoch in range(loop.progress.epoch, config.epochs):
        loop.run_epoch(epoch_dataset(epoch), checkpoint)
        loop.progress.valid_loss = None
        if valid_set is not None and _validates_after(epoch, config):
            loop.progress.valid_loss = evaluate_loss(model, valid_set, config, device)
        loop.finish_epoch(checkpoint)
    progress: TrainProgress = loop.progress
    if progress.skipped_steps:
        logger.warning("%s: the GradScaler skipped %d of %d optimiser steps (inf/nan gradients)", label, progress.skipped_steps, progress.step)
    return FitResult(
        config.epochs,
        progress.step,
        progress.train_loss,
        progress.valid_loss,
        time.time() - start,
        progress.last_lr,
        loop.total_steps,
        progress.skipped_steps,
    )


def _validates_after(epoch: int, config: SliceModelConfig) -> bool:
    # The validation loss is only reported, so skipping it leaves the training itself unchanged.
    return (epoch + 1) % config.valid_every_epochs == 0 or epoch + 1 == config.epochs


def train_stage(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    config: SliceModelConfig,
    device: torch.device,
    seed: int,
    label: str,
    epoch_subsets=None,
    *,
    run_dir: Path,
    config_hash: str,
    weights_meta: dict,
) -> FitResult:
    """Fit `model` as the stage `label` of a run folder, or load it if that stage finished.

    Writes run_dir/<label>.pt (the state dict, `weights_meta`, the FitResult and the RNG state
    at the end of training) and, while training, run_dir/checkpoints/<label>.ckpt. A stage is
    finished when <label>.pt has this config hash. Loading it also restores the RNG state, so
    the stages after it start as in an uninterrupted run.
    """
    weights_path = Path(run_dir) / f"{label}.pt"
    finished = run_on_main(read_finished_stage, weights_path, config_hash)
    if finished is not None:
        model.load_state_dict(finished["state_dict"])
        to_device(model, device)
        restore_rng_state(finished["rng"])
        logger.info("Stage %s already finished (%s, config hash %s): loaded it instead of training", label, weights_path, config_hash)
        return FitResult(**finished["fit_result"])

    spec = CheckpointSpec(Path(run_dir) / CHECKPOINT_DIR / f"{label}.ckpt", config.checkpoint_every_steps, config_hash)
    result = fit(model, train_set, valid_set, config, device, seed, label, epoch_subsets, checkpoint=spec)
    if is_main_process():
        meta = {**weights_meta, "fit_result": asdict(result), "rng": capture_rng_state()}
        save_weights(model, weights_path, config_hash, meta)
        # The weights now mark the stage as finished, so its checkpoint is no longer needed.
        spec.path.unlink(missing_ok=True)
    barrier()
    return result


def _inference_sampler(dataset: Dataset):
    """Return None for one process, else this rank's share (DistributedSampler, no shuffling)."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=False, drop_last=False)


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, label: str = "predict") -> np.ndarray:
    """Return sigmoid probabilities for every item of `dataset`, in order.

    Under torchrun each rank predicts its share and every rank returns the gathered whole.
    """
    to_device(model, device).eval()
    loader = make_loader(dataset, batch_size, False, num_workers, 0, sampler=_inference_sampler(dataset))
    outputs = []
    for images, _, _ in tqdm(loader, desc=label, leave=False, mininterval=2.0, disable=not is_main_process()):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            logits = model(images)
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    n_outputs = getattr(model, "num_classes", 0)
    local = np.concatenate(outputs) if outputs else np.zeros((0, n_outputs), dtype=np.float32)
    return gather_in_order(local, len(dataset))


@torch.inference_mode()
def evaluate_loss(model: nn.Module, dataset: Dataset, config: SliceModelConfig, device: torch.device) -> float:
    """Return the weighted BCE over `dataset`; under torchrun the ranks split it and sum."""
    to_device(model, device).eval()
    # Unpadded strided shards: every item counts exactly once in the summed loss.
    sampler = range(get_rank(), len(dataset), get_world_size()) if is_distributed() else None
    loader = make_loader(dataset, config.batch_size, False, config.num_workers, 0, sampler=sampler)
    total, weight = 0.0, 0.0
    for images, targets, weights in loader:
        with autocast(device):
            logits = model(images.to(device).contiguous(memory_format=torch.channels_last))
        targets, weights = targets.to(device), weights.to(device)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, weight=weights, reduction="sum")
        total += float(loss)
        weight += float(weights.sum())
    if is_distributed():
        sums = all_reduce_sum(torch.tensor([total, weight], dtype=torch.float64, device=_collective_device(device)))
        total, weight = float(sums[0]), float(sums[1])
    return total / max(weight, 1e-6)


def _collective_device(device: torch.device) -> torch.device:
    # NCCL reduces only CUDA tensors; gloo reduces CPU tensors.
    return device if device.type == "cuda" else torch.device("cpu")
