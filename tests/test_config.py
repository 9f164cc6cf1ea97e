"""Configuration: presets, overlays, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, available, load_config, parse_override


def test_every_preset_validates():
    assert {"micro", "smol", "qwen3-0.6b", "qwen3-4b", "qwen3-8b"} <= set(available("presets"))
    for name in available("presets"):
        cfg = load_config(name)
        assert cfg.preset == name
    assert load_config("smol").model.backbone == "bundled:smollm2"
    assert load_config("micro").model.backbone == "micro"
    assert load_config("qwen3-0.6b").model.backbone == "Qwen/Qwen3-0.6B-Base"


def test_overrides_are_typed_and_nested():
    cfg = load_config("micro", ["stage2.steps=3", "stage2.loss.temperature=0.02", "stage2.loss.qq=false",
                                "eval.task_dirs=[a, b]"])
    assert cfg.stage2.steps == 3 and cfg.stage2.loss.temperature == 0.02 and cfg.stage2.loss.qq is False
    assert cfg.eval.task_dirs == ["a", "b"]
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, message", [
    ("stage2.nope=1", "stage2.nope: unknown key"),
    ("stage2.steps=many", "stage2.steps: Input should be a valid integer"),
    ("stage2.loss.temperature=-0.5", "stage2.loss.temperature: Input should be greater than 0"),
    ("merge.num_checkpoints=1", "merge.num_checkpoints"),
    ("model.embedding_dim=0", "model.embedding_dim"),
    ("stage2.steps=true", "stage2.steps: Value error, expected a number, not true"),
    ("stage2.loss.temperature=inf", "stage2.loss.temperature: Input should be a finite number"),
    ("stage2.lr=nan", "stage2.lr: Input should be a finite number"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("micro", [override])


def test_unknown_preset_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*micro"):
        load_config("nope")
    bad = tmp_path / "x.yaml"
    bad.write_text("stage2: [1, 2\n")
    with pytest.raises(ConfigError, match="x.yaml: invalid YAML"):
        load_config("micro", files=[bad])
    bad.write_text("stage2:\n  lr: 0.1\n  colour: red\n")
    with pytest.raises(ConfigError, match="stage2.colour: unknown key"):
        load_config("micro", files=[bad])


def test_digest_changes_with_any_setting():
    assert load_config("micro").digest() == load_config("micro").digest()
    assert load_config("micro").digest() != load_config("micro", ["stage2.lr=0.5"]).digest()
    flat = load_config("micro").flat()
    assert flat["stage2.loss.temperature"] == load_config("micro").stage2.loss.temperature
