"""The epoch loop behind trainer.fit: batches, loss, optimiser and scheduler steps, checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from csfd.checkpoint import CheckpointSpec, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from csfd.config import SliceModelConfig
from csfd.distributed import (
    PaddedItems,
    ShardedBatchSampler,
    all_reduce_sum,
    get_rank,
    get_world_size,
    is_main_process,
    per_rank_batch_size,
    run_on_main,
)

logger = logging.getLogger(__name__)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, *, sampler=None, batch_sampler=None
) -> DataLoader:
    """Build a DataLoader; `seed` seeds its generator (worker seeds, and the order when shuffling)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    if batch_sampler is not None:
        batching = {"batch_sampler": batch_sampler}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle, "sampler": sampler, "drop_last": False}
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        **batching,
    )


def optimizer_steps_per_epoch(n_batches: int, grad_accum_steps: int) -> int:
    """Return the optimiser steps in an epoch: a last partial accumulation group still steps."""
    return math.ceil(n_batches / grad_accum_steps)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return loss / weights.sum().clamp_min(1e-6)


def autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


@dataclass
class TrainProgress:
    """Position in training; a checkpoint stores it, and a resumed fit starts from it."""

    epoch: int = 0  # finished epochs
    batch: int = 0  # global batches of the current epoch already trained
    step: int = 0  # optimiser steps taken, including those the GradScaler skipped
    skipped_steps: int = 0
    running_loss: float = 0.0  # sum over the epoch's batches of mean loss times batch size
    seen: int = 0  # items behind running_loss
    train_loss: float = math.nan  # mean loss of the last finished epoch
    valid_loss: float | None = None
    last_lr: float = math.nan  # learning rate of the last optimiser step


class TrainLoop:
    """Optimiser, OneCycleLR schedule, GradScaler and progress of one fit, epoch by epoch.

    Checkpoints are saved only right after an optimiser step, so no accumulated gradient is
    ever lost. The scheduler steps after every optimiser step, also when the GradScaler skipped
    the update, so the schedule ends exactly at its planned last step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SliceModelConfig,
        device: torch.device,
        seed: int,
        label: str,
        n_items: int,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.device = device
        self.seed = seed
        self.label = label
        self.scaler = scaler
        self.world_size = get_world_size()
        per_rank_batch_size(config.batch_size, self.world_size)
        self.sampler = ShardedBatchSampler(n_items, config.batch_size, get_rank(), self.world_size, seed)
        self.total_steps = config.epochs * optimizer_steps_per_epoch(self.sampler.n_batches, config.grad_accum_steps)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=self.total_steps, pct_start=0.1, anneal_strategy="cos"
        )
        self.progress = TrainProgress()

        self.ddp: DistributedDataParallel | None = None
        self.train_model: nn.Module = model
        if self.world_size > 1:
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.train_model = self.ddp
        if config.compile:
            logger.info("%s: compiling the model with torch.compile", label)
            self.train_model = torch.compile(self.train_model)

    def restore(self, checkpoint: CheckpointSpec) -> None:
        """Continue from the checkpoint file if it exists (read on rank 0, sent to every rank)."""
        payload = run_on_main(load_checkpoint, checkpoint.path, checkpoint.config_hash, self.label)
        if payload is None:
            return
        if payload["total_steps"] != self.total_steps:
            raise ValueError(
                f"{checkpoint.path} plans {payload['total_steps']} optimiser steps, this run {self.total_steps}: "
                "the training data changed since it was written; delete the checkpoint to start over"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler.is_enabled() and payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        self.progress = TrainProgress(**payload["progress"])
        progress = self.progress
        logger.info(
            "Resuming %s from %s: %d of %d epochs done, batch %d of %d, optimiser step %d of %d (saved by %d process(es), now %d)",
            self.label,
            checkpoint.path,
            progress.epoch,
            self.config.epochs,
            progress.batch,
            self.sampler.n_batches,
            progress.step,
            self.total_steps,
            payload["world_size"],
            self.world_size,
        )

    def save(self, checkpoint: CheckpointSpec) -> None:
        """Write the checkpoint (rank 0 only; the others have identical state)."""
        if not is_main_process():
            return
        payload = {
            "label": self.label,
            "config_hash": checkpoint.config_hash,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "progress": asdict(self.progress),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
        }
        save_checkpoint(checkpoint.path, payload)
        logger.debug("%s: checkpoint at epoch %d batch %d step %d", self.label, self.progress.epoch, self.progress.batch, self.progress.step)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Return the loss to back-propagate and the global batch's mean loss.

        With several processes each rank normalises its weighted sum by the weight of the whole
        global batch, times the world size because DDP averages the gradients. The gradient then
        equals that of one process on the same global batch, whatever the weights per rank.
        """
        if self.world_size == 1:
            loss = weighted_bce(logits, targets, weights)
            return loss, float(loss.detach())
        loss_sum = nn.functional.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
        totals = all_reduce_sum(torch.stack([loss_sum.detach(), weights.sum()]))
        weight_total = totals[1].clamp_min(1e-6)
        return loss_sum * self.world_size / weight_total, float(totals[0] / weight_total)

    def _optimizer_step(self) -> None:
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The GradScaler lowers its scale exactly when it skipped the step for inf/nan gradients.
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.progress.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.progress.step += 1

    def run_epoch(self, dataset: Dataset, checkpoint: CheckpointSpec | None) -> None:
        """Train the rest of epoch `progress.epoch` on `dataset`, from batch `progress.batch`."""
        progress, config, device = self.progress, self.config, self.device
        if len(dataset) != self.sampler.n_items:
            raise ValueError(
                f"{self.label}: epoch {progress.epoch} has {len(dataset)} items, epoch 0 had {self.sampler.n_items}; "
                "epoch_subsets must return the same number of items every epoch"
            )
        self.sampler.set_epoch(progress.epoch)
        self.sampler.set_start_batch(progress.batch)
        items = PaddedItems(dataset) if self.world_size > 1 else dataset
        # The batch sampler sets the batches, so make_loader's batch_size and shuffle do not apply.
        loader = make_loader(items, 1, False, config.num_workers, self.seed + progress.epoch, batch_sampler=self.sampler)
        n_batches, first_batch = self.sampler.n_batches, progress.batch
        self.train_model.train()
        bar = tqdm(
            loader,
            desc=f"{self.label} epoch {progress.epoch + 1}/{config.epochs}",
            initial=first_batch,
            total=n_batches,
            leave=False,
            mininterval=2.0,
            disable=not is_main_process(),
        )
        for offset, (images, targets, weights) in enumerate(bar):
            batch = first_batch + offset
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            weights = weights.to(device, non_blocking=True)
            last_in_group = (batch + 1) % config.grad_accum_steps == 0 or batch + 1 == n_batches
            # DDP all-reduces gradients on backward; within an accumulation group only the last must.
            sync = contextlib.nullcontext() if self.ddp is None or last_in_group else self.ddp.no_sync()
            with sync:
                with autocast(device):
                    logits = self.train_model(images)
                loss, batch_mean = self._loss(logits.float(), targets, weights)
                self.scaler.scale(loss / config.grad_accum_steps).backward()
            n_real = self.sampler.global_batch_items(batch)
            progress.running_loss += batch_mean * n_real
            progress.seen += n_real
            progress.batch = batch + 1
            if last_in_group:
                self._optimizer_step()
                every = checkpoint.every_steps if checkpoint is not None else 0
                if every and progress.step % every == 0 and progress.batch < n_batches:
                    self.save(checkpoint)
            bar.set_postfix(loss=f"{progress.running_loss / progress.seen:.4f}", refresh=False)

    def finish_epoch(self, checkpoint: CheckpointSpec | None) -> None:
        """Close the epoch (after validation set progress.valid_loss): log, then checkpoint."""
        progress = self.progress
        progress.train_loss = progress.running_loss / max(progress.seen, 1)
        progress.epoch += 1
        progress.batch = 0
        progress.running_loss = 0.0
        progress.seen = 0
        logger.info(
            "%s epoch=%d step=%d lr=%.3e loss=%.5f val_loss=%s",
            self.label,
            progress.epoch,
            progress.step,
            self.scheduler.get_last_lr()[0],
            progress.train_loss,
            "n/a" if progress.valid_loss is None else f"{progress.valid_loss:.5f}",
        )
        if checkpoint is not None:
            self.save(checkpoint)
