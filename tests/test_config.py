"""Typed config: defaults, YAML, overrides, and rejection of unknown keys and bad types."""

from __future__ import annotations

from pathlib import Path

import pytest

from csfd.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.name == path.stem


def test_override_sets_nested_value():
    config = load_config(REPO / "configs" / "sample.yaml", ["fracture.epochs=3", "stack.params.num_leaves=5"])
    assert config.fracture.epochs == 3
    assert config.stack.params == {"num_leaves": 5}


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("fracture:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"fracture\.epoch\b.*valid keys.*fracture\.epochs"):
        load_config(path)


def test_unknown_override_rejected():
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["vertebra.backbon=resnet18"])


def test_wrong_type_rejected():
    with pytest.raises(ConfigError, match="fracture.epochs: expected an integer"):
        load_config(None, ["fracture.epochs=two"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["fracture.lr=true"])


def test_invalid_choice_rejected():
    with pytest.raises(ConfigError, match="irregular_series"):
        load_config(None, ["prepare.irregular_series=maybe"])


def test_zero_validation_interval_rejected():
    with pytest.raises(ConfigError, match="vertebra.valid_every_epochs: expected 1 or more, got 0"):
        load_config(None, ["vertebra.valid_every_epochs=0"])


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.seed = 1  # type: ignore[misc]


def test_saved_config_round_trips(tmp_path):
    config = load_config(REPO / "configs" / "sample.yaml", ["seed=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert again.hash() == config.hash()


def test_hash_changes_with_values():
    assert load_config(None, ["seed=1"]).hash() != load_config(None, ["seed=2"]).hash()
