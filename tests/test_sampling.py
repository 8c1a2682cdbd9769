"""Negative-slice subsampling of the fracture model: which slices each epoch trains on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from csfd.config import SliceModelConfig
from csfd.constants import VERTEBRAE
from csfd.data import SliceStackDataset
from csfd.fracture_targets import negative_subsampler
from csfd.trainer import fit, make_loader

N_VERTEBRAE = len(VERTEBRAE)


def fracture_targets(n_positive: int, n_negative: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (targets, positive row indices): (n, 14) rows of visibility C1..C7 then fracture C1..C7.

    Positives have one fracture column at 1; negatives have fracture values at most 0.5 and
    random visibility, so that only the fracture half can tell them apart. Rows are shuffled.
    """
    rng = np.random.default_rng(seed)
    n = n_positive + n_negative
    targets = np.zeros((n, 2 * N_VERTEBRAE), dtype=np.float32)
    targets[:, :N_VERTEBRAE] = rng.integers(0, 2, size=(n, N_VERTEBRAE))
    for row in range(n_positive):
        targets[row, N_VERTEBRAE + rng.integers(0, N_VERTEBRAE)] = 1.0
    # Negatives: zeros, and some exactly at the 0.5 threshold, which still counts as negative.
    targets[n_positive : n_positive + n_negative // 4, N_VERTEBRAE] = 0.5
    order = rng.permutation(n)
    targets = targets[order]
    positives = np.flatnonzero(np.isin(order, np.arange(n_positive)))
    return targets, positives


def test_subsampler_keep_one_returns_none():
    targets, _ = fracture_targets(3, 10)
    assert negative_subsampler(targets, 1.0, seed=0) is None


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.9])
def test_subsampler_keeps_every_positive(keep):
    targets, positives = fracture_targets(7, 40)
    pick = negative_subsampler(targets, keep, seed=0)
    for epoch in range(5):
        chosen = pick(epoch)
        assert set(positives) <= set(chosen.tolist())


@pytest.mark.parametrize("keep, expected_negatives", [(0.1, 4), (0.25, 10), (0.5, 20), (0.9, 36)])
def test_subsampler_fixed_negatives_per_epoch(keep, expected_negatives):
    targets, positives = fracture_targets(7, 40)
    pick = negative_subsampler(targets, keep, seed=0)
    for epoch in range(5):
        chosen = pick(epoch)
        negatives = np.setdiff1d(chosen, positives)
        assert len(negatives) == expected_negatives
        assert len(chosen) == len(positives) + expected_negatives
        assert len(np.unique(chosen)) == len(chosen)
        assert np.all(np.diff(chosen) > 0)


def test_subsampler_threshold_and_visibility():
    # A fracture value of exactly 0.5 is negative, and visibility columns never make a slice positive.
    targets = np.zeros((6, 2 * N_VERTEBRAE), dtype=np.float32)
    targets[:, :N_VERTEBRAE] = 1.0
    targets[0, N_VERTEBRAE + 3] = 0.5
    targets[1, N_VERTEBRAE + 6] = 0.51
    pick = negative_subsampler(targets, 0.2, seed=0)
    chosen = pick(0)
    assert 1 in chosen
    assert len(chosen) == 1 + 1  # the positive, and round(5 * 0.2) = 1 of the 5 negatives


def test_subsampler_differs_between_epochs():
    targets, _ = fracture_targets(5, 100)
    pick = negative_subsampler(targets, 0.3, seed=0)
    picks = [tuple(pick(epoch)) for epoch in range(4)]
    assert len(set(picks)) == 4


def test_subsampler_is_seeded():
    targets, _ = fracture_targets(5, 100)
    first = negative_subsampler(targets, 0.3, seed=11)
    again = negative_subsampler(targets, 0.3, seed=11)
    other = negative_subsampler(targets, 0.3, seed=12)
    for epoch in range(3):
        assert np.array_equal(first(epoch), again(epoch))
    assert not np.array_equal(first(0), other(0))


def test_subsampler_keeps_at_least_one_negative():
    targets, positives = fracture_targets(2, 10)
    chosen = negative_subsampler(targets, 0.01, seed=0)(0)
    assert len(chosen) == len(positives) + 1


def test_subsampler_without_negatives():
    targets, positives = fracture_targets(6, 0)
    chosen = negative_subsampler(targets, 0.5, seed=0)(0)
    assert chosen.tolist() == sorted(positives.tolist())


# ---------------------------------------------------------------------------------------------
# What the loader and the trainer deliver under subsampling


def numbered_dataset(targets: np.ndarray) -> SliceStackDataset:
    """A dataset whose item i is a single-channel 8 x 8 slice filled with the value i."""
    n = len(targets)
    volume = np.repeat(np.arange(n, dtype=np.uint8), 64).reshape(n, 8, 8)
    return SliceStackDataset(lambda _: volume, np.zeros(n, dtype=np.int64), np.arange(n), targets, None,
                             context=0, image_size=8)


def item_numbers(images: torch.Tensor) -> list[int]:
    return torch.round(images[:, 0, 0, 0] * 255).long().tolist()


class RecordingModel(nn.Module):
    """A linear model that records which items each training forward saw."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2 * N_VERTEBRAE)
        self.seen: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += item_numbers(images)
        return self.head(images.mean(dim=(1, 2, 3))[:, None])


def test_loader_workers_deliver_subset():
    targets, _ = fracture_targets(6, 30)
    dataset = numbered_dataset(targets)
    chosen = negative_subsampler(targets, 0.25, seed=3)(0)
    loader = make_loader(Subset(dataset, chosen), batch_size=4, shuffle=True, num_workers=2, seed=0)
    seen, seen_targets = [], []
    for images, batch_targets, weights in loader:
        assert images.shape[1:] == (1, 8, 8)
        assert torch.equal(weights, torch.ones_like(batch_targets))
        seen += item_numbers(images)
        seen_targets.append(batch_targets)
    assert sorted(seen) == chosen.tolist()
    assert len(seen) == len(Subset(dataset, chosen)) == 6 + round(30 * 0.25)
    assert np.array_equal(torch.cat(seen_targets).numpy(), targets[seen])


def test_fit_trains_on_each_epoch_subset():
    targets, _ = fracture_targets(5, 32)
    dataset = numbered_dataset(targets)
    pick = negative_subsampler(targets, 0.25, seed=7)
    config = SliceModelConfig(backbone="none", image_size=8, context_slices=0, epochs=3, batch_size=4, lr=1e-2, num_workers=0)
    model = RecordingModel()
    result = fit(model, dataset, None, config, torch.device("cpu"), seed=0, label="sampling", epoch_subsets=pick)

    # 5 positives and 8 negatives per epoch: 3 full batches of 4, the short last batch dropped.
    per_epoch = (5 + 8) // config.batch_size * config.batch_size
    assert len(model.seen) == config.epochs * per_epoch
    for epoch in range(config.epochs):
        seen = model.seen[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert len(set(seen)) == per_epoch
        assert set(seen) <= set(pick(epoch).tolist())
    assert result.optimizer_steps == config.epochs * math.floor((5 + 8) / config.batch_size)
    assert pick(0).tolist() != pick(1).tolist()
