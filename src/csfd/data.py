"""PyTorch datasets over the prepared slice cache.

Per-item metadata lives in numpy arrays (study index, position index, targets), never in a
pandas frame or a list of strings, so DataLoader workers do not copy it on access. Volumes are
memory-mapped and 2.5D stacks are built by indexing neighbouring slices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from csfd.augment import augment_stack
from csfd.config import AugmentConfig


def stack_indices(position: int, n_slices: int, context: int) -> np.ndarray:
    """Return the slice indices of a 2.5D stack centred on `position`, clamped at the ends."""
    offsets = np.arange(-context, context + 1)
    return np.clip(position + offsets, 0, n_slices - 1)


def _resize_stack(stack: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a (C, H, W) uint8 stack to (C, image_size, image_size) with cv2.INTER_AREA; stays uint8."""
    size = (image_size, image_size)
    if stack.shape[0] > 4:
        # OpenCV 4.13 has INTER_AREA kernels for 1 to 4 channels only. It treats channels
        # independently, so resizing one channel at a time gives the same pixels.
        return np.stack([cv2.resize(channel, size, interpolation=cv2.INTER_AREA) for channel in stack])
    image = cv2.resize(stack.transpose(1, 2, 0), size, interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = image[:, :, None]
    return image.transpose(2, 0, 1)


def _scale_to_unit(stack: np.ndarray) -> np.ndarray:
    """Return uint8 pixels as a new C-contiguous float32 array in [0, 1].

    One float32 array is allocated and divided in place, which gives the same values as
    `stack.astype(np.float32) / 255.0` without its second full-size array.
    """
    image = stack.astype(np.float32, order="C")
    np.divide(image, np.float32(255.0), out=image)
    return image


def to_model_input(stack: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a (C, H, W) uint8 stack to the model's size and scale it to float32 in [0, 1]."""
    if stack.shape[1] != image_size or stack.shape[2] != image_size:
        stack = _resize_stack(stack, image_size)
    return _scale_to_unit(stack)


def batch_model_input(
    volume: np.ndarray, positions: np.ndarray, context: int, image_size: int, channels_last: bool = False
) -> np.ndarray:
    """Return the (B, C, S, S) float32 inputs of the 2.5D stacks centred on `positions`.

    Equal to stacking `to_model_input` of each stack, but the slices are gathered with one
    indexing operation, resized as uint8 and converted to float32 once for the whole batch.
    With `channels_last` the array is (B, S, S, C): the same values, transposed in the float32
    conversion, so that torch can view it as NCHW in channels_last memory without a copy.
    """
    positions = np.asarray(positions, dtype=np.int64)
    offsets = np.arange(-context, context + 1)
    indices = np.clip(positions[:, None] + offsets, 0, len(volume) - 1)
    stacks = np.asarray(volume[indices])  # (B, C, H, W) uint8
    if stacks.shape[2] != image_size or stacks.shape[3] != image_size:
        resized = np.empty((len(positions), len(offsets), image_size, image_size), dtype=np.uint8)
        for item, stack in enumerate(stacks):
            resized[item] = _resize_stack(stack, image_size)
        stacks = resized
    return _scale_to_unit(stacks.transpose(0, 2, 3, 1) if channels_last else stacks)


class SliceStackDataset(Dataset):
    """2.5D slice stacks with per-slice targets and loss weights.

    `volume_of` maps a study index to its (n, S, S) uint8 volume; it is called in the worker,
    so memory maps open lazily there.
    """

    def __init__(
        self,
        volume_of: Callable[[int], np.ndarray],
        study_index: np.ndarray,
        position_index: np.ndarray,
        targets: np.ndarray,
        weights: np.ndarray | None,
        context: int,
        image_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.volume_of = volume_of
        self.study_index = np.asarray(study_index, dtype=np.int64)
        self.position_index = np.asarray(position_index, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.weights = np.ones_like(self.targets) if weights is None else np.asarray(weights, dtype=np.float32)
        self.context = context
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.study_index)

    def __getitem__(self, item: int):
        volume = self.volume_of(int(self.study_index[item]))
        indices = stack_indices(int(self.position_index[item]), volume.shape[0], self.context)
        stack = np.asarray(volume[indices])
        if self.augment is not None:
            # Seeded per epoch and item, so augmentation does not depend on worker scheduling.
            rng = np.random.default_rng((self.seed, self.epoch, item))
            stack = augment_stack(stack, self.augment, rng)
        image = torch.from_numpy(to_model_input(stack, self.image_size))
        return image, torch.from_numpy(self.targets[item]), torch.from_numpy(self.weights[item])


class StudyVolumes:
    """Picklable accessor from a study index to its memory-mapped volume."""

    def __init__(self, cache, study_uids: Sequence[str]) -> None:
        self.cache = cache
        self.study_uids = list(study_uids)

    def __call__(self, index: int) -> np.ndarray:
        return self.cache.volume(self.study_uids[index])
