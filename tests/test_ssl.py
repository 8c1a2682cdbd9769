"""Self-training pieces: labelled subsets, confidence weights, pseudo-label sets, fracture-target
refinement and test-time flip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from csfd.config import ConfigError, ExperimentConfig, SSLConfig, load_config
from csfd.constants import VERTEBRAE
from csfd.models import save_weights
from csfd.ssl import (
    FlippedImages,
    _pseudo_sampler,
    build_pseudo_labels,
    confidence_weights,
    file_sha256,
    load_pseudo_label_set,
    predict_probabilities,
    pseudo_targets,
    refine_fracture_targets,
    save_pseudo_label_set,
    select_labelled,
    vertebra_metrics,
)

UIDS = [f"1.2.3.{i}" for i in range(12)]


def test_select_labelled_nested_and_sized():
    quarter = select_labelled(UIDS, 0.25, seed=7)
    half = select_labelled(UIDS, 0.5, seed=7)
    everything = select_labelled(UIDS, 1.0, seed=7)
    assert len(quarter) == 3
    assert len(half) == 6
    assert everything == sorted(UIDS)
    assert set(quarter) <= set(half) <= set(everything)
    assert select_labelled(list(reversed(UIDS)), 0.25, seed=7) == quarter
    assert select_labelled(UIDS, 0.25, seed=8) != quarter
    assert len(select_labelled(UIDS, 0.01, seed=0)) == 1
    assert len(select_labelled(UIDS[:5], 0.5, seed=0)) == 3  # ceil(2.5)
    with pytest.raises(ValueError, match="fraction"):
        select_labelled(UIDS, 0.0, seed=0)


def test_confidence_weights_drop_or_downweight():
    p = np.array(
        [
            [0.95, 0.02, 0.01, 0.0, 0.0, 0.0, 0.0],  # confident
            [0.55, 0.40, 0.01, 0.0, 0.0, 0.0, 0.0],  # max probability inside the band
            [0.95, 0.30, 0.01, 0.0, 0.0, 0.0, 0.0],  # confident max, one uncertain output
            [0.10, 0.10, 0.10, 0.1, 0.1, 0.1, 0.1],  # confidently empty
        ]
    )
    drop = SSLConfig(confidence_low=0.2, confidence_high=0.8, uncertain_weight=0.0)
    assert confidence_weights(p, drop).tolist() == [1.0, 0.0, 0.0, 1.0]
    soft = SSLConfig(confidence_low=0.2, confidence_high=0.8, uncertain_weight=0.25, pseudo_weight=0.5)
    assert confidence_weights(p, soft).tolist() == pytest.approx([0.5, 0.125, 0.125, 0.5])
    wide_open = SSLConfig(confidence_low=0.5, confidence_high=0.5)
    assert confidence_weights(p, wide_open).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_hard_and_soft_targets():
    p = np.array([[0.7, 0.5, 0.49, 0.0, 1.0, 0.2, 0.9]])
    assert pseudo_targets(p, hard=True).tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]]
    soft = pseudo_targets(p, hard=False)
    np.testing.assert_allclose(soft, p.astype(np.float32))
    assert soft.dtype == np.float32


def _study_frame(levels, uid="s1", high=0.9, low=0.05) -> pd.DataFrame:
    n = len(levels)
    frame = pd.DataFrame(
        {"StudyInstanceUID": uid, "slice_number": np.arange(1, n + 1), "position_index": np.arange(n), "z": -3.0 * np.arange(n)}
    )
    p = np.full((n, 7), low)
    for i, level in enumerate(levels):
        if level is not None:
            p[i, level] = high
    frame[list(VERTEBRAE)] = p
    return frame


SWAPPED = [None, None] + [0] * 3 + [1] * 3 + [4] * 3 + [3] * 3 + [2] * 3 + [5] * 3 + [6] * 3 + [None, None]


def test_pseudo_labels_pass_anatomy_then_confidence():
    predictions = _study_frame(SWAPPED)
    labels, summary = build_pseudo_labels(predictions, SSLConfig(anatomy=True, hard_labels=True, anatomy_min_level_mm=9.0))
    assert list(labels.columns) == ["StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE, "weight"]
    # The C5 block above C4 becomes C3 in the hard targets.
    assert labels.loc[8:10, "C3"].tolist() == [1.0, 1.0, 1.0]
    assert labels.loc[8:10, "C5"].tolist() == [0.0, 0.0, 0.0]
    assert labels.loc[14:16, "C5"].tolist() == [1.0, 1.0, 1.0]
    assert summary["order_violations_raw"] == 2
    assert summary["order_violations_labels"] == 0
    assert summary["slices"] == len(SWAPPED)
    assert summary["studies"] == 1

    plain, plain_summary = build_pseudo_labels(predictions, SSLConfig(anatomy=False, hard_labels=True))
    assert plain.loc[8:10, "C5"].tolist() == [1.0, 1.0, 1.0]
    assert plain_summary["order_violations_labels"] == 2


def test_pseudo_labels_uncertain_slices_weighted():
    predictions = _study_frame([0, 0, 0, 1, 1, 1])
    predictions.loc[4, "C2"] = 0.5  # an uncertain slice
    config = SSLConfig(anatomy=False, uncertain_weight=0.0)
    labels, summary = build_pseudo_labels(predictions, config)
    assert labels["weight"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert summary["dropped_fraction"] == pytest.approx(1 / 6)
    assert labels.loc[4, "C2"] == pytest.approx(0.5)  # soft targets keep the probability


def test_pseudo_label_set_records_round_and_teacher(tmp_path):
    config = ExperimentConfig()
    teacher = tmp_path / "vertebra_round0.pt"
    save_weights(nn.Linear(2, 2), teacher, config.hash(), {"round": 0})
    labels, summary = build_pseudo_labels(_study_frame([0, 0, 1, 1]), config.ssl)
    csv_path = save_pseudo_label_set(tmp_path, 0, labels, teacher, config, {**summary, "trains_round": 1})
    assert csv_path == tmp_path / "pseudo_labels" / "round0.csv"

    loaded, record = load_pseudo_label_set(tmp_path, 0)
    assert record["round"] == 0
    assert record["trains_round"] == 1
    assert record["teacher_weights"] == "vertebra_round0.pt"
    assert record["teacher_sha256"] == file_sha256(teacher)
    assert record["config_hash"] == config.hash()
    assert list(loaded.columns) == ["StudyInstanceUID", "slice_number", "position_index", *VERTEBRAE, "weight"]
    np.testing.assert_allclose(loaded[list(VERTEBRAE)].to_numpy(), labels[list(VERTEBRAE)].to_numpy(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="round3"):
        load_pseudo_label_set(tmp_path, 3)


def test_pseudo_sampler_keeps_labelled_and_skips_dropped():
    pseudo_weights = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    pick = _pseudo_sampler(n_labelled=3, pseudo_weights=pseudo_weights, ratio=1.0, seed=0)
    usable = {3 + i for i in np.flatnonzero(pseudo_weights > 0)}
    for epoch in range(4):
        chosen = pick(epoch)
        assert set(range(3)) <= set(chosen)
        assert len(chosen) == 6  # 3 labelled + 1.0 * 3 pseudo
        assert set(chosen) - set(range(3)) <= usable
    assert any(not np.array_equal(pick(0), pick(e)) for e in range(1, 6))
    everything = _pseudo_sampler(3, pseudo_weights, ratio=0.0, seed=0)(0)
    assert set(everything) == set(range(3)) | usable


def test_refine_fracture_targets_reweights_positives():
    # One study, eight slices; C2 fractured on slices 2..6 (visible there), slice 5 has a box.
    targets = np.zeros((8, 7), dtype=np.float32)
    targets[2:7, 1] = 1.0
    predictions = np.full((8, 7), 0.05)
    predictions[2:7, 1] = [0.1, 0.8, 0.4, 0.05, 0.2]
    is_box = np.zeros(8, dtype=bool)
    is_box[5] = True
    refined = refine_fracture_targets(targets, predictions, np.zeros(8, dtype=int), is_box, floor=0.25)
    share = np.array([0.1, 0.8, 0.4, 0.05, 0.2]) / 0.8
    expected = 0.25 + 0.75 * share
    expected[3] = 1.0  # the box slice stays a full positive
    np.testing.assert_allclose(refined[2:7, 1], expected, rtol=1e-6)
    assert refined[3, 1] == pytest.approx(1.0)  # the most fractured slice keeps its target
    assert np.all(refined[[0, 1, 7], 1] == 0.0)
    assert np.all(refined[:, [0, 2, 3, 4, 5, 6]] == 0.0)
    np.testing.assert_array_equal(targets[2:7, 1], 1.0)  # the input is not modified


def test_refine_fracture_targets_keeps_visibility_half():
    targets = np.zeros((4, 14), dtype=np.float32)
    targets[:, 0] = 1.0  # C1 visible everywhere
    targets[:, 7] = 1.0  # C1 fractured everywhere
    predictions = np.zeros((4, 14))
    predictions[:, 7] = [0.2, 0.4, 0.8, 0.4]
    refined = refine_fracture_targets(targets, predictions, np.array([0, 0, 1, 1]), np.zeros(4, dtype=bool), floor=0.0)
    np.testing.assert_array_equal(refined[:, 0], 1.0)
    # Each study is normalised by its own largest prediction.
    np.testing.assert_allclose(refined[:, 7], [0.5, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="must both be"):
        refine_fracture_targets(targets, predictions[:, :7], np.zeros(4), np.zeros(4, dtype=bool), 0.0)
    with pytest.raises(ValueError, match="floor"):
        refine_fracture_targets(targets, predictions, np.zeros(4), np.zeros(4, dtype=bool), 1.5)


def test_vertebra_metrics_known_values():
    truth = np.zeros((4, 7))
    truth[[0, 1], 0] = 1
    truth[[2, 3], 1] = 1
    probabilities = truth.copy()
    probabilities[3, 1] = 0.2  # one missed C2 slice
    probabilities[3, 2] = 0.9  # predicted C3 instead
    scores = vertebra_metrics(probabilities, truth)
    assert scores["output_accuracy"] == pytest.approx(26 / 28)
    assert scores["exact_match"] == pytest.approx(3 / 4)
    # F1: C1 = 1, C2 = 2*1/(2+0+1) = 2/3, C3 = 0 (one false positive); others undefined.
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_ssl_config_validation():
    config = load_config(None, ["ssl.rounds=2", "ssl.hard_labels=true", "ssl.study.fractions=[0.5]"])
    assert config.ssl.rounds == 2
    assert config.ssl.hard_labels is True
    assert config.ssl.study.fractions == (0.5,)
    for bad in (
        "ssl.rounds=-1",
        "ssl.labelled_fraction=0",
        "ssl.confidence_low=0.7",
        "ssl.student_init=random",
        "ssl.study.fractions=[1.5]",
        "ssl.study.rounds=0",
        "ssl.fracture_floor=2",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
            load_config(None, [bad])


# ---------------------------------------------------------------------------------------------
# Test-time flip


class _Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int):
        return self.images[item], torch.zeros(1), torch.ones(1)


class _LeftHalf(nn.Module):
    """A model whose output is the mean of the left half of the image: flip-sensitive."""

    num_classes = 1

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        width = images.shape[-1]
        return images[..., : width // 2].mean(dim=(1, 2, 3))[:, None] * 4.0 - 2.0


def test_flip_dataset_mirrors_width():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = FlippedImages(_Images(images))
    assert len(flipped) == 2
    assert torch.equal(flipped[1][0], images[1].flip(-1))


def test_tta_symmetric_input_unchanged():
    row = torch.tensor([0.1, 0.5, 0.9, 0.5, 0.1])
    symmetric = row.expand(2, 3, 4, 5).clone()
    model = _LeftHalf()
    plain = predict_probabilities(model, _Images(symmetric), 2, 0, torch.device("cpu"), "plain", tta_hflip=False)
    flipped = predict_probabilities(model, _Images(symmetric), 2, 0, torch.device("cpu"), "tta", tta_hflip=True)
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


def test_tta_reaches_the_model():
    ramp = torch.linspace(0.0, 1.0, 6).expand(1, 1, 6, 6).clone()
    model = _LeftHalf()
    plain = predict_probabilities(model, _Images(ramp), 1, 0, torch.device("cpu"), "plain", tta_hflip=False)
    assert len(model.seen) == 1
    model.seen.clear()
    averaged = predict_probabilities(model, _Images(ramp), 1, 0, torch.device("cpu"), "tta", tta_hflip=True)
    assert len(model.seen) == 2
    assert torch.equal(model.seen[1], ramp.flip(-1))
    mirrored = torch.sigmoid(ramp.flip(-1)[..., :3].mean() * 4.0 - 2.0).item()
    assert averaged[0, 0] == pytest.approx((plain[0, 0] + mirrored) / 2, rel=1e-6)
    assert averaged[0, 0] != pytest.approx(plain[0, 0])


def test_inference_tta_option_reaches_models():
    from csfd.inference import FoldModels, predict_volume

    class Recorder(nn.Module):
        def __init__(self, outputs: int) -> None:
            super().__init__()
            self.outputs = outputs
            self.calls: list[torch.Tensor] = []

        def forward(self, images):
            self.calls.append(images.clone())
            width = images.shape[-1]
            left = images[..., : width // 2].mean(dim=(1, 2, 3))
            return left[:, None].expand(-1, self.outputs) * 4.0 - 2.0

    config = load_config(None, ["vertebra.image_size=8", "fracture.image_size=8", "vertebra.context_slices=0", "fracture.context_slices=0"])
    volume = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (3, 8, 1))  # brighter to the right
    results = {}
    for flag in (False, True):
        vertebra, fracture = Recorder(7), Recorder(14)
        models = [FoldModels(0, config, vertebra, fracture)]
        results[flag] = predict_volume(volume, models, batch_size=4, tta_hflip=flag)
        assert len(vertebra.calls) == (2 if flag else 1)
        assert len(fracture.calls) == (2 if flag else 1)
        if flag:
            assert torch.equal(vertebra.calls[1], vertebra.calls[0].flip(-1))
    assert not np.allclose(results[True][0], results[False][0])

    # None reads predict.tta_hflip of the fold's saved config.
    saved = dataclasses.replace(config, predict=dataclasses.replace(config.predict, tta_hflip=True))
    vertebra, fracture = Recorder(7), Recorder(14)
    from_config = predict_volume(volume, [FoldModels(0, saved, vertebra, fracture)], batch_size=4)
    assert len(vertebra.calls) == 2
    np.testing.assert_allclose(from_config[0], results[True][0])


def test_pseudo_label_record_is_json(tmp_path):
    config = ExperimentConfig()
    teacher = tmp_path / "elsewhere" / "vertebra.pt"
    save_weights(nn.Linear(1, 1), teacher, config.hash())
    labels, _ = build_pseudo_labels(_study_frame([0, 1]), dataclasses.replace(config.ssl, anatomy=False))
    run_dir = tmp_path / "run"
    save_pseudo_label_set(run_dir, 2, labels, teacher, config, {"trains_round": None})
    record = json.loads((run_dir / "pseudo_labels" / "round2.json").read_text())
    # A teacher outside the run folder keeps its full path.
    assert record["teacher_weights"] == str(teacher)
    assert record["trains_round"] is None
