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
    augment: AugmentConfig = field(default_factory=AugmentConfig)


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
    clip_min: float = 0.005
    clip_max: float = 0.995


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 64
    folds: tuple[int, ...] = ()  # empty means every fold found in the run folder
    method: str = "auto"  # "auto" (the better by CV), "stacker" or "aggregate"


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
    if config.prepare.irregular_series not in ("keep", "drop"):
        raise ConfigError(
            f"prepare.irregular_series: expected 'keep' or 'drop', got {config.prepare.irregular_series!r}"
        )
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
        if model.grad_accum_steps < 1:
            raise ConfigError(f"{section}.grad_accum_steps: expected 1 or more, got {model.grad_accum_steps}")
        if not 0.0 < model.negative_keep <= 1.0:
            raise ConfigError(f"{section}.negative_keep: expected a value in (0, 1], got {model.negative_keep}")


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML, atomically."""
    from csfd.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
