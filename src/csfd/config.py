"""Typed, frozen experiment configuration loaded from YAML with KEY=value overrides.

An experiment is one YAML file under configs/; its file name (without suffix) is the run's
name unless the file sets `name`. Unknown keys and values of the wrong type are errors that
list the valid keys, in the file and in command-line overrides alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An invalid experiment configuration: unknown key, wrong type or bad value."""


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = "input/rsna-2022-cervical-spine-fracture-detection"
    cache_dir: str = "output/cache/competition"
    folds_csv: str = "output/folds/competition.csv"
    runs_dir: str = "output/runs"
    submission_csv: str = "output/submission.csv"


@dataclass(frozen=True)
class PrepareConfig:
    image_size: int = 384
    # Bone window in HU: centre 400, width 1800 keeps cortex and marrow apart.
    window_center: float = 400.0
    window_width: float = 1800.0
    workers: int = 0  # 0 means all cores
    exclude_studies: tuple[str, ...] = (
        "1.2.826.0.1.3680043.20574",
        "1.2.826.0.1.3680043.29952",
    )
    # What to do with a series that is not a clean volume (duplicate positions, a gap,
    # gantry tilt): "keep" caches it with a warning in the report, "drop" skips it.
    irregular_series: str = "keep"


@dataclass(frozen=True)
class FoldsConfig:
    n_folds: int = 5
    seed: int = 42


@dataclass(frozen=True)
class AugmentConfig:
    rotate_degrees: float = 15.0
    hflip_probability: float = 0.5
    crop_scale_min: float = 0.8  # random resized crop keeps at least this area fraction
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass(frozen=True)
class SliceModelConfig:
    backbone: str = "tf_efficientnet_b0"
    # Local path to pretrained weights (timm state dict); empty means random initialisation.
    pretrained_path: str = ""
    image_size: int = 384
    context_slices: int = 1  # neighbours on each side stacked as channels (2.5D)
    epochs: int = 10
    # Score the validation loss after every this many epochs, and always after the last one.
    valid_every_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_accum_steps: int = 1
    num_workers: int = 4
    # Fracture model only: weight of positive fracture targets in the BCE, and of box slices.
    positive_weight: float = 2.0
    box_weight: float = 4.0
    # Fraction of negative slices kept per epoch (1.0 keeps all).
    negative_keep: float = 1.0
    # Fracture model only. The vertebra model's labels pass through the anatomy step (the
    # ssl.anatomy_* options) before they become visibility targets. A slice shows Ck when that
    # visibility is above visibility_threshold; a negative threshold keeps it soft. Soft
    # visibility spills onto disc and T1 slices, which then become fracture positives.
    anatomy_targets: bool = True
    visibility_threshold: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Save a resumable checkpoint every this many optimiser steps; 0 saves at epoch ends only.
    checkpoint_every_steps: int = 0
    compile: bool = False  # train through torch.compile(model)


@dataclass(frozen=True)
class StackConfig:
    params: dict = field(
        default_factory=lambda: {
            "objective": "binary",
            "learning_rate": 0.03,
            "num_leaves": 7,
            "min_data_in_leaf": 20,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "verbose": -1,
        }
    )
    num_boost_round: int = 1000
    early_stopping_rounds: int = 50
    inner_valid_fraction: float = 0.2
    # Boost from the plain aggregation's log-odds (LightGBM init_score): the boosters learn
    # corrections to it, and a booster stopped at its first trees gives the aggregation back
    # instead of the training prevalence. Helps most when the training folds hold few studies.
    init_from_aggregate: bool = True
    clip_min: float = 0.005
    clip_max: float = 0.995


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 64
    folds: tuple[int, ...] = ()  # empty means every fold found in the run folder
    method: str = "auto"  # "auto" (the better by CV), "stacker" or "aggregate"
    # Test-time augmentation: average each slice model's output with its output on the
    # left-right mirrored slice (twice the inference time). Also used for pseudo-labels and OOF.
    tta_hflip: bool = False
    # Predict every k-th slice (and the last) and interpolate the rest linearly; 1 predicts all.
    slice_stride: int = 1
    # Studies decoded ahead in a background thread while the models run; 0 decodes in turn.
    prefetch: int = 1
    # Deadline guard (csfd.deadline): seconds from the start for the whole prediction; 0 disables it.
    # When the projected time passes it, the remaining studies use `fallback_folds` folds, then the prior.
    time_budget_s: float = 0.0
    fallback_folds: int = 1
    log_interval_s: float = 60.0  # seconds between progress lines with the ETA


@dataclass(frozen=True)
class KernelConfig:
    """The Kaggle inference kernel and its three datasets (`python -m csfd kernel`, csfd.kernel)."""

    # Kaggle user that owns the datasets and the kernel; empty means $KAGGLE_USERNAME, else a placeholder.
    username: str = ""
    output_dir: str = "output/kaggle"
    code_dataset: str = "csfd-code"
    weights_dataset: str = "csfd-weights"
    wheels_dataset: str = "csfd-wheels"
    kernel_slug: str = "csfd-inference"
    license: str = "CC0-1.0"  # Kaggle license name written to each dataset-metadata.json
    competition: str = "rsna-2022-cervical-spine-fracture-detection"
    # Packages the Kaggle image lacks, fetched as binary wheels for its Python and platform. The
    # version of each is the one installed here (requirements.txt pins them).
    wheel_packages: tuple[str, ...] = (
        "dicomsdl",
        "imagecodecs",
        "pydicom",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
    )
    python_version: str = "3.11"
    # The image's platform; a manylinux_2_N tag also accepts wheels for every older glibc.
    platform: str = "manylinux_2_35_x86_64"
    wheels_dir: str = ""  # a local folder of wheels to copy instead of running pip download
    # Kaggle stops a code-competition kernel after 9 h; this leaves 30 min for start-up and writing.
    time_budget_s: float = 30600.0


@dataclass(frozen=True)
class SSLStudyConfig:
    """The label-fraction study (`python -m csfd ssl-study`): supervised vs semi-supervised."""

    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # shares of the training folds' segmented studies
    seeds: tuple[int, ...] = (0, 1, 2)
    folds: tuple[int, ...] = (0,)
    rounds: int = 1  # self-training rounds of the semi-supervised arm
    bootstrap: int = 2000  # bootstrap resamples of the held-out studies for the intervals
    # Budget choices for every cell: fracture.epochs and ssl.student_epochs; 0 keeps the config's.
    fracture_epochs: int = 5
    student_epochs: int = 10
    # Also run the supervised model fine-tuned on the labelled studies alone for as many
    # optimiser steps as the semi-supervised student (vertebra stage only).
    matched_control: bool = True
    name: str = ""  # study folder under paths.runs_dir; empty means ssl-study-<experiment name>


@dataclass(frozen=True)
class SSLConfig:
    """Self-training of the vertebra model and refinement of the fracture targets (csfd.ssl)."""

    rounds: int = 0  # self-training rounds; 0 trains on the labelled segmented studies only
    labelled_fraction: float = 1.0  # share of the training folds' segmented studies whose labels are used
    teacher_weights: str = ""  # a vertebra.pt to use as the round-0 model instead of training one
    student_epochs: int = 0  # 0 means vertebra.epochs
    student_init: str = "teacher"  # "teacher" (fine-tune the previous round's model) or "scratch"
    pseudo_ratio: float = 2.0  # pseudo-labelled slices per labelled slice in each epoch; 0 uses all
    hard_labels: bool = False  # 0/1 targets at 0.5 instead of the probabilities
    # A pseudo-labelled slice with any probability strictly between these is uncertain and
    # gets uncertain_weight (0 drops it); every pseudo-labelled slice is scaled by pseudo_weight.
    confidence_low: float = 0.2
    confidence_high: float = 0.8
    uncertain_weight: float = 0.0
    pseudo_weight: float = 1.0
    # Anatomical consistency of C1..C7 along z before pseudo-labels become targets (csfd.anatomy).
    anatomy: bool = True
    anatomy_min_level_mm: float = 7.0  # a vertebra spans at least this many mm of slices
    anatomy_skip_penalty: float = 10.0  # nats per vertebra missing between two others
    anatomy_edge_penalty: float = 10.0  # nats per vertebra missing above or below the scan; 0 for partial scans
    anatomy_identity_noise: float = 0.1  # probability that a visible vertebra is named wrongly
    anatomy_smooth_sigma: float = 0.0  # Gaussian smoothing along z, in slices
    # Fracture-target refinement rounds in stage 1c, and the smallest share of its target that
    # a positive slice keeps.
    fracture_rounds: int = 0
    fracture_floor: float = 0.25
    study: SSLStudyConfig = field(default_factory=SSLStudyConfig)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 42
    device: str = "auto"  # "auto", "cpu" or "cuda"
    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    vertebra: SliceModelConfig = field(default_factory=SliceModelConfig)
    fracture: SliceModelConfig = field(default_factory=SliceModelConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """Return a short digest of the resolved configuration."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def run_dir(self, fold: int | None = None) -> Path:
        root = Path(self.paths.runs_dir) / self.name
        return root if fold is None else root / f"fold{fold}"


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value, annotation, key: str):
    """Check `value` against a field's type; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} keys, got {value!r}")
        return _build(annotation, value, key + ".")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in configs")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {name: _coerce(values[name], hints[name], prefix + name) for name in names if name in values}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "params":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """Turn `a.b.c=value` into {"a": {"b": {"c": value}}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: expected KEY=value, for example fracture.epochs=2")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when `path` is None) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = loaded
        values.setdefault("name", path.stem)
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build(ExperimentConfig, values)
    _validate(config)
    return config


def _validate(config: ExperimentConfig) -> None:
    _validate_prepare(config.prepare)
    if config.folds.n_folds < 2:
        raise ConfigError(f"folds.n_folds: expected at least 2, got {config.folds.n_folds}")
    if config.predict.method not in ("auto", "stacker", "aggregate"):
        raise ConfigError(f"predict.method: expected auto, stacker or aggregate, got {config.predict.method!r}")
    if config.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {config.device!r}")
    if not 0.0 < config.stack.clip_min < config.stack.clip_max < 1.0:
        raise ConfigError("stack.clip_min and stack.clip_max must satisfy 0 < clip_min < clip_max < 1")
    for section in ("vertebra", "fracture"):
        model = getattr(config, section)
        if model.context_slices < 0:
            raise ConfigError(f"{section}.context_slices: expected 0 or more, got {model.context_slices}")
        if model.valid_every_epochs < 1:
            raise ConfigError(f"{section}.valid_every_epochs: expected 1 or more, got {model.valid_every_epochs}")
        if model.grad_accum_steps < 1:
            raise ConfigError(f"{section}.grad_accum_steps: expected 1 or more, got {model.grad_accum_steps}")
        if model.visibility_threshold >= 1.0:
            raise ConfigError(f"{section}.visibility_threshold: expected a value below 1 (negative keeps soft visibility), got {model.visibility_threshold}")
        if not 0.0 < model.negative_keep <= 1.0:
            raise ConfigError(f"{section}.negative_keep: expected a value in (0, 1], got {model.negative_keep}")
    _validate_ssl(config.ssl)
    _validate_predict(config.predict)


def _validate_prepare(prepare: PrepareConfig) -> None:
    if prepare.irregular_series not in ("keep", "drop"):
        raise ConfigError(f"prepare.irregular_series: expected 'keep' or 'drop', got {prepare.irregular_series!r}")
    if prepare.image_size < 1:
        raise ConfigError(f"prepare.image_size: expected a size of 1 px or more, got {prepare.image_size}")
    if prepare.window_width <= 0:
        raise ConfigError(f"prepare.window_width: expected a positive width in HU, got {prepare.window_width}")
    if prepare.workers < 0:
        raise ConfigError(f"prepare.workers: expected 0 (all cores) or more, got {prepare.workers}")


def _validate_predict(predict: PredictConfig) -> None:
    if predict.slice_stride < 1:
        raise ConfigError(f"predict.slice_stride: expected 1 or more, got {predict.slice_stride}")
    if predict.prefetch < 0:
        raise ConfigError(f"predict.prefetch: expected 0 or more, got {predict.prefetch}")
    if predict.time_budget_s < 0:
        raise ConfigError(f"predict.time_budget_s: expected 0 (no budget) or more seconds, got {predict.time_budget_s}")
    if predict.fallback_folds < 1:
        raise ConfigError(f"predict.fallback_folds: expected 1 or more, got {predict.fallback_folds}")
    if predict.log_interval_s <= 0:
        raise ConfigError(f"predict.log_interval_s: expected a positive number of seconds, got {predict.log_interval_s}")


def _validate_ssl(ssl: SSLConfig) -> None:
    checks = [
        (ssl.rounds >= 0, f"ssl.rounds: expected 0 or more, got {ssl.rounds}"),
        (0.0 < ssl.labelled_fraction <= 1.0, f"ssl.labelled_fraction: expected a value in (0, 1], got {ssl.labelled_fraction}"),
        (ssl.student_epochs >= 0, f"ssl.student_epochs: expected 0 or more, got {ssl.student_epochs}"),
        (ssl.student_init in ("teacher", "scratch"), f"ssl.student_init: expected teacher or scratch, got {ssl.student_init!r}"),
        (ssl.pseudo_ratio >= 0.0, f"ssl.pseudo_ratio: expected 0 or more, got {ssl.pseudo_ratio}"),
        (
            0.0 <= ssl.confidence_low <= 0.5 <= ssl.confidence_high <= 1.0,
            f"ssl.confidence_low and ssl.confidence_high: expected 0 <= low <= 0.5 <= high <= 1, "
            f"got {ssl.confidence_low} and {ssl.confidence_high}",
        ),
        (0.0 <= ssl.uncertain_weight <= 1.0, f"ssl.uncertain_weight: expected a value in [0, 1], got {ssl.uncertain_weight}"),
        (ssl.pseudo_weight >= 0.0, f"ssl.pseudo_weight: expected 0 or more, got {ssl.pseudo_weight}"),
        (ssl.anatomy_min_level_mm >= 0.0, f"ssl.anatomy_min_level_mm: expected 0 or more, got {ssl.anatomy_min_level_mm}"),
        (ssl.anatomy_skip_penalty >= 0.0, f"ssl.anatomy_skip_penalty: expected 0 or more, got {ssl.anatomy_skip_penalty}"),
        (ssl.anatomy_edge_penalty >= 0.0, f"ssl.anatomy_edge_penalty: expected 0 or more, got {ssl.anatomy_edge_penalty}"),
        (
            0.0 <= ssl.anatomy_identity_noise < 1.0,
            f"ssl.anatomy_identity_noise: expected a value in [0, 1), got {ssl.anatomy_identity_noise}",
        ),
        (ssl.anatomy_smooth_sigma >= 0.0, f"ssl.anatomy_smooth_sigma: expected 0 or more, got {ssl.anatomy_smooth_sigma}"),
        (ssl.fracture_rounds >= 0, f"ssl.fracture_rounds: expected 0 or more, got {ssl.fracture_rounds}"),
        (0.0 <= ssl.fracture_floor <= 1.0, f"ssl.fracture_floor: expected a value in [0, 1], got {ssl.fracture_floor}"),
    ]
    study = ssl.study
    checks += [
        (
            len(study.fractions) > 0 and all(0.0 < f <= 1.0 for f in study.fractions),
            f"ssl.study.fractions: expected one or more values in (0, 1], got {list(study.fractions)}",
        ),
        (len(study.seeds) > 0, "ssl.study.seeds: expected at least one seed"),
        (len(study.folds) > 0 and all(f >= 0 for f in study.folds), f"ssl.study.folds: expected fold indices >= 0, got {list(study.folds)}"),
        (study.rounds >= 1, f"ssl.study.rounds: expected 1 or more, got {study.rounds}"),
        (study.bootstrap >= 100, f"ssl.study.bootstrap: expected at least 100 resamples, got {study.bootstrap}"),
        (study.fracture_epochs >= 0, f"ssl.study.fracture_epochs: expected 0 or more, got {study.fracture_epochs}"),
        (study.student_epochs >= 0, f"ssl.study.student_epochs: expected 0 or more, got {study.student_epochs}"),
    ]
    for valid, message in checks:
        if not valid:
            raise ConfigError(message)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML, atomically."""
    from csfd.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
