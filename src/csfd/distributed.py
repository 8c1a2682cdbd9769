"""Data-parallel training across processes: process group, rank helpers, sharding, gathering.

`python -m csfd train` started by torchrun (WORLD_SIZE > 1 in the environment) joins a
process group: NCCL when the run uses CUDA GPUs, gloo on the CPU. Without torchrun every helper
here is a no-op for a single process, and no process group is created.

Only rank 0 writes files, logs to train.log and saves checkpoints. Every rank reads the data
cache, so on several nodes the cache must exist on each node.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here; a no-op for a single process."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Return rank `src`'s `value` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def run_on_main(function: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `function` on rank 0 only and return its result on every rank.

    An exception raised on rank 0 is raised on every rank, so no rank waits forever for a
    broadcast that never comes.
    """
    if not is_distributed():
        return function(*args, **kwargs)
    outcome = None
    if is_main_process():
        try:
            outcome = (True, function(*args, **kwargs))
        except Exception as error:  # sent to every rank and raised there, rank 0 included
            outcome = (False, error)
    succeeded, value = broadcast_object(outcome)
    if not succeeded:
        raise value
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_in_order(local: np.ndarray, n_items: int) -> np.ndarray:
    """Reassemble the per-rank outputs of a DistributedSampler(shuffle=False) pass.

    That sampler pads the item list to a multiple of the world size by repeating its first
    items, and rank r gets items r, r + world, r + 2 * world, ... Interleaving the gathered
    parts restores the original order, and cutting at `n_items` drops the padding duplicates.
    """
    if not is_distributed():
        return local
    parts: list = [None] * get_world_size()
    dist.all_gather_object(parts, local)
    per_rank = max(len(part) for part in parts)
    merged = np.empty((per_rank * len(parts), *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        merged[rank :: len(parts)] = part
    return merged[:n_items]


def select_backend(device_name: str, local_rank: int) -> tuple[str, torch.device]:
    """Return the process-group backend and this rank's device for config.device `device_name`."""
    wants_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return "gloo", torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device is set to cuda but no CUDA GPU is available; set device=cpu or device=auto")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return "nccl", torch.device("cuda", local_rank)


@contextmanager
def distributed_session(device_name: str = "auto") -> Iterator[DistributedContext | None]:
    """Join the torchrun process group for the block, or do nothing for a single process.

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the group is
    initialised from them (init_method env://). Ranks other than 0 log only warnings and errors.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield None
        return
    if is_distributed():
        raise RuntimeError("a torch.distributed process group is already initialised in this process")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend, device = select_backend(device_name, local_rank)
    if device.type == "cuda":
        # NOTE: the NCCL path (backend "nccl", one GPU per rank) was not run on a GPU; the
        # tests cover it up to this device selection and the init_process_group call.
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    root = logging.getLogger()
    level = root.level
    if rank != 0:
        root.setLevel(logging.WARNING)
    logger.info("Joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    try:
        yield DistributedContext(rank, local_rank, world_size, backend, device)
    finally:
        root.setLevel(level)
        dist.destroy_process_group()


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """Split the configured (global) batch size evenly over the ranks."""
    if global_batch % world_size:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {world_size} processes; "
            "batch_size is the global batch, so pick a multiple of the process count"
        )
    return global_batch // world_size


class ShardedBatchSampler(Sampler[list[int]]):
    """Shuffled, resumable batches of one epoch, each global batch split over the ranks.

    The epoch order is a permutation drawn from (seed, epoch) alone, so a resumed run can
    start at any batch with `set_start_batch`. Global batch b contains the same items for any
    world size, so one process and several with the same global batch train on the same
    batches. Rank r takes the items r, r + world, ... of each global batch. A rank left
    without an item in a short last batch gets a copy of that batch's first item marked as
    padding (index + n_items), which PaddedItems turns into a zero loss weight, because every
    rank must run the same number of batches.

    A shuffled epoch with at least one full batch drops its short last batch, as drop_last does.
    A short batch can leave a rank a single item, which BatchNorm in training mode rejects when
    the feature map is 1x1. The dropped items change from epoch to epoch.

    torch's DistributedSampler is not used for training. It shards the whole epoch instead of
    each batch, cannot start mid-epoch, and pads with duplicates that get trained twice.
    """

    def __init__(
        self, n_items: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        if global_batch < world_size:
            raise ValueError(f"batch_size {global_batch} is smaller than the {world_size} processes")
        self.n_items = n_items
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= self.n_batches:
            raise ValueError(f"start batch {batch} is outside the epoch's {self.n_batches} batches")
        self.start_batch = batch

    @property
    def n_batches(self) -> int:
        if self.shuffle and self.n_items >= self.global_batch:
            return self.n_items // self.global_batch
        return -(-self.n_items // self.global_batch)

    def global_batch_items(self, batch: int) -> int:
        """Return the number of real items in global batch `batch` (the last may be short)."""
        return min(self.global_batch, self.n_items - batch * self.global_batch)

    def epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_items)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.n_items)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        for batch in range(self.start_batch, self.n_batches):
            chunk = order[batch * self.global_batch : (batch + 1) * self.global_batch]
            share = chunk[self.rank :: self.world_size]
            if len(share) == 0:
                share = chunk[:1] + self.n_items
            yield share.tolist()

    def __len__(self) -> int:
        return self.n_batches - self.start_batch


class PaddedItems(Dataset):
    """`dataset` plus padding indices n..2n-1: copies of items 0..n-1 with zero loss weights."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.n_items = len(dataset)

    def __len__(self) -> int:
        return 2 * self.n_items

    def __getitem__(self, index: int):
        if index < self.n_items:
            return self.dataset[index]
        image, target, weight = self.dataset[index - self.n_items]
        return image, target, torch.zeros_like(weight)
