"""Trainer: OneCycleLR bookkeeping, 2.5D stacks, datasets and offline model creation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from csfd.config import AugmentConfig, SliceModelConfig
from csfd.data import SliceStackDataset, stack_indices
from csfd.models import create_slice_model
from csfd.trainer import fit, optimizer_steps_per_epoch


class _Weighted(TensorDataset):
    """Images, targets and unit weights, as the trainer expects."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        return image, target, torch.ones_like(target)


def _tiny_config(**overrides) -> SliceModelConfig:
    base = SliceModelConfig(backbone="test_efficientnet", image_size=16, epochs=2, batch_size=4, lr=1e-2, num_workers=0)
    return dataclasses.replace(base, **overrides)


def _toy_dataset(n: int = 12) -> _Weighted:
    generator = torch.Generator().manual_seed(0)
    return _Weighted(torch.rand(n, 3, 16, 16, generator=generator), (torch.rand(n, 2, generator=generator) > 0.5).float())


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_one_cycle_ends_at_last_step(accum):
    # 12 samples, batch 4: 3 batches per epoch.
    config = _tiny_config(grad_accum_steps=accum)
    model = create_slice_model(config.backbone, 3, 2)
    result = fit(model, _toy_dataset(), None, config, torch.device("cpu"), seed=0, label="toy")
    expected_steps = config.epochs * math.ceil(3 / accum)
    assert result.optimizer_steps == expected_steps
    assert result.planned_steps == expected_steps
    # OneCycleLR ends at max_lr / (div_factor * final_div_factor) = lr / 25 / 1e4.
    assert result.final_lr == pytest.approx(config.lr / 25 / 1e4, rel=1e-6)


def test_steps_per_epoch_counts_partial_group():
    assert optimizer_steps_per_epoch(3, 1) == 3
    assert optimizer_steps_per_epoch(3, 2) == 2
    assert optimizer_steps_per_epoch(4, 2) == 2


def test_fit_is_deterministic():
    config = _tiny_config()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_slice_model(config.backbone, 3, 2)
        fit(model, _toy_dataset(), None, config, torch.device("cpu"), seed=0, label="toy")
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_validation_every_k_epochs(monkeypatch):
    from csfd import trainer

    scored = []
    real_evaluate = trainer.evaluate_loss

    def counting_evaluate(model, dataset, config, device):
        scored.append(len(dataset))
        return real_evaluate(model, dataset, config, device)

    weights, results = [], []
    for every in (1, 2):
        monkeypatch.setattr(trainer, "evaluate_loss", counting_evaluate)
        config = _tiny_config(epochs=5, valid_every_epochs=every)
        torch.manual_seed(0)
        model = create_slice_model(config.backbone, 3, 2)
        scored.clear()
        results.append(fit(model, _toy_dataset(), _toy_dataset(8), config, torch.device("cpu"), seed=0, label="toy"))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        # Every epoch, or epochs 2, 4 and the last one (5).
        assert len(scored) == (5 if every == 1 else 3)
    # Skipping validation leaves the training unchanged, so the last epoch's loss is the same.
    assert torch.equal(weights[0], weights[1])
    assert results[0].valid_loss == results[1].valid_loss


def test_stack_indices_clamp_at_ends():
    assert stack_indices(0, 5, 1).tolist() == [0, 0, 1]
    assert stack_indices(4, 5, 1).tolist() == [3, 4, 4]
    assert stack_indices(2, 5, 2).tolist() == [0, 1, 2, 3, 4]


def test_dataset_builds_registered_stacks():
    volume = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)
    dataset = SliceStackDataset(
        lambda i: volume,
        study_index=np.zeros(5, dtype=np.int64),
        position_index=np.arange(5),
        targets=np.zeros((5, 7), dtype=np.float32),
        weights=None,
        context=1,
        image_size=8,
    )
    image, target, weight = dataset[2]
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image * 255, torch.from_numpy(volume[1:4].astype(np.float32)))
    assert target.shape == (7,)
    assert float(weight.sum()) == 7.0
    # Per-item metadata is numpy, not pandas or Python lists (copy-on-write in workers).
    for value in vars(dataset).values():
        assert not hasattr(value, "iloc")
        assert not isinstance(value, list)


def test_augmentation_is_seeded_and_changes_pixels():
    rng_volume = np.random.default_rng(0)
    volume = rng_volume.integers(0, 255, size=(3, 32, 32), dtype=np.uint8)
    common = dict(
        study_index=np.zeros(3, dtype=np.int64),
        position_index=np.arange(3),
        targets=np.zeros((3, 1), dtype=np.float32),
        weights=None,
        context=1,
        image_size=32,
        augment=AugmentConfig(rotate_degrees=20, hflip_probability=0.5, crop_scale_min=0.7),
    )
    first = SliceStackDataset(lambda i: volume, seed=1, **common)[1][0]
    second = SliceStackDataset(lambda i: volume, seed=1, **common)[1][0]
    plain = SliceStackDataset(lambda i: volume, **{**common, "augment": None})[1][0]
    assert torch.equal(first, second)
    assert not torch.equal(first, plain)


def test_random_init_needs_no_network(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("INFO"):
        model = create_slice_model("test_efficientnet", 3, 7)
    assert "random weights" in caplog.text
    assert model.eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 7)


def test_local_pretrained_weights_load(tmp_path):
    source = create_slice_model("test_efficientnet", 3, 5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    target = create_slice_model("test_efficientnet", 3, 14, str(path))
    stem_name = next(name for name, _ in source.named_parameters())
    assert torch.equal(dict(source.named_parameters())[stem_name], dict(target.named_parameters())[stem_name])
    assert target.eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 14)


def test_missing_pretrained_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        create_slice_model("test_efficientnet", 3, 7, str(tmp_path / "none.pth"))


def test_unknown_backbone_is_clear():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_slice_model("not_a_model_xyz", 3, 7)


class _InfGradientOnce:
    """A gradient hook that turns the gradient of the `at`-th backward pass into inf."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(grad, float("inf")) if self.calls == self.at else grad


# torch warns when the scheduler steps before any optimiser step, which a skipped first step causes.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
@pytest.mark.parametrize(("accum", "inf_at_backward"), [(1, 2), (2, 3), (3, 1)])
def test_one_cycle_survives_skipped_step(accum, inf_at_backward):
    # An enabled GradScaler on the CPU skips the optimiser step whose gradients contain an inf,
    # as it does with float16 autocast on a GPU. The schedule must still end at its last step.
    config = _tiny_config(grad_accum_steps=accum)
    model = create_slice_model(config.backbone, 3, 2)
    hook = _InfGradientOnce(inf_at_backward)
    first_parameter = next(model.parameters())
    first_parameter.register_hook(hook)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    result = fit(model, _toy_dataset(), None, config, torch.device("cpu"), seed=0, label="toy", grad_scaler=scaler)
    expected_steps = config.epochs * math.ceil(3 / accum)
    assert hook.calls == config.epochs * 3
    assert result.skipped_steps == 1
    assert scaler.get_scale() < 2.0**8
    assert result.optimizer_steps == expected_steps
    assert result.planned_steps == expected_steps
    assert result.final_lr == pytest.approx(config.lr / 25 / 1e4, rel=1e-6)
    assert torch.isfinite(first_parameter).all()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_skipped_step_leaves_weights_unchanged():
    config = _tiny_config(epochs=1, batch_size=10)  # one full batch (the short rest is dropped), one step
    model = create_slice_model(config.backbone, 3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).register_hook(_InfGradientOnce(1))
    result = fit(model, _toy_dataset(), None, config, torch.device("cpu"), seed=0, label="toy", grad_scaler=torch.amp.GradScaler("cpu"))
    assert result.skipped_steps == 1
    assert result.optimizer_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("compile_model", [True, False])
def test_compile_flag_reaches_torch_compile(monkeypatch, compile_model):
    # A real torch.compile takes about a minute on the CPU, so the call is recorded instead.
    compiled = []

    def record(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", record)
    config = _tiny_config(epochs=1, compile=compile_model)
    model = create_slice_model(config.backbone, 3, 2)
    fit(model, _toy_dataset(), None, config, torch.device("cpu"), seed=0, label="toy")
    assert compiled == ([model] if compile_model else [])
