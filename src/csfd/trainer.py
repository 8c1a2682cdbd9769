"""One generic loop that fits a slice model with OneCycleLR and predicts with it."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from csfd.config import SliceModelConfig

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is set to cuda but no CUDA GPU is available; set device=cpu or device=auto")
    return torch.device(name)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
    )


def optimizer_steps_per_epoch(n_batches: int, grad_accum_steps: int) -> int:
    """Return the optimiser steps in an epoch: a last partial accumulation group still steps."""
    return math.ceil(n_batches / grad_accum_steps)


@dataclass
class FitResult:
    epochs: int
    optimizer_steps: int
    train_loss: float
    valid_loss: float | None
    seconds: float
    final_lr: float  # learning rate of the last optimiser step
    planned_steps: int


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return loss / weights.sum().clamp_min(1e-6)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def fit(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    config: SliceModelConfig,
    device: torch.device,
    seed: int,
    label: str,
    epoch_subsets=None,
) -> FitResult:
    """Train `model` for config.epochs with AdamW and OneCycleLR stepped per optimiser step.

    `epoch_subsets(epoch) -> indices` optionally picks the items of each epoch (negative-slice
    subsampling); every epoch must have the same length so the schedule's total is known.
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def epoch_dataset(epoch: int) -> Dataset:
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        return Subset(train_set, epoch_subsets(epoch)) if epoch_subsets is not None else train_set

    first = epoch_dataset(0)
    n_batches = math.ceil(len(first) / config.batch_size)
    steps_per_epoch = optimizer_steps_per_epoch(n_batches, config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.1, anneal_strategy="cos"
    )
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start = time.time()
    step = 0
    lr_used = float("nan")
    train_loss = valid_loss = float("nan")
    for epoch in range(config.epochs):
        dataset = first if epoch == 0 else epoch_dataset(epoch)
        loader = make_loader(dataset, config.batch_size, True, config.num_workers, seed + epoch)
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{label} epoch {epoch + 1}/{config.epochs}", leave=False, mininterval=2.0)
        for batch_index, (images, targets, weights) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            weights = weights.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(images)
            loss = weighted_bce(logits.float(), targets, weights)
            scaler.scale(loss / config.grad_accum_steps).backward()
            last_in_group = (batch_index + 1) % config.grad_accum_steps == 0 or batch_index + 1 == len(loader)
            if last_in_group:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr_used = optimizer.param_groups[0]["lr"]
                # Step the schedule even when the scaler skipped the optimiser step, so that it
                # stays aligned with the planned total and ends exactly at the last step.
                scheduler.step()
                step += 1
            running += float(loss.detach()) * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
        train_loss = running / max(seen, 1)
        valid_loss = evaluate_loss(model, valid_set, config, device) if valid_set is not None else None
        logger.info(
            "%s epoch=%d step=%d lr=%.3e loss=%.5f val_loss=%s",
            label,
            epoch + 1,
            step,
            scheduler.get_last_lr()[0],
            train_loss,
            "n/a" if valid_loss is None else f"{valid_loss:.5f}",
        )
    return FitResult(config.epochs, step, train_loss, valid_loss, time.time() - start, lr_used, total_steps)


@torch.inference_mode()
def predict(model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, label: str = "predict") -> np.ndarray:
    """Return sigmoid probabilities for every item of `dataset`, in order."""
    model.to(device).eval()
    loader = make_loader(dataset, batch_size, False, num_workers, 0)
    outputs = []
    for images, _, _ in tqdm(loader, desc=label, leave=False, mininterval=2.0):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            logits = model(images)
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    n_outputs = getattr(model, "num_classes", 0)
    return np.concatenate(outputs) if outputs else np.zeros((0, n_outputs), dtype=np.float32)


@torch.inference_mode()
def evaluate_loss(model: nn.Module, dataset: Dataset, config: SliceModelConfig, device: torch.device) -> float:
    model.to(device).eval()
    loader = make_loader(dataset, config.batch_size, False, config.num_workers, 0)
    total, weight = 0.0, 0.0
    for images, targets, weights in loader:
        with _autocast(device):
            logits = model(images.to(device))
        targets, weights = targets.to(device), weights.to(device)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, weight=weights, reduction="sum")
        total += float(loss)
        weight += float(weights.sum())
    return total / max(weight, 1e-6)
