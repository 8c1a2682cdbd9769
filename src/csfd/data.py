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


def to_model_input(stack: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a (C, H, W) uint8 stack to the model's size and scale it to float32 in [0, 1]."""
    if stack.shape[1] != image_size or stack.shape[2] != image_size:
        image = cv2.resize(stack.transpose(1, 2, 0), (image_size, image_size), interpolation=cv2.INTER_AREA)
        if image.ndim == 2:
            image = image[:, :, None]
        stack = image.transpose(2, 0, 1)
    return np.ascontiguousarray(stack, dtype=np.float32) / 255.0


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
