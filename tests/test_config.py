"""Configuration: presets, overlays, overrides, and errors that name the key."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("overrides, message", [
    (["stage2_balances=[{weights: {retrieval: 1}}, {weights: {retrieval: 1.0}}]"],
     "stage2_balances: Value error, a balance is listed twice: {'retrieval': 1.0}"),
    (["stage2_balances=[{weights: {retrieval: -1}}]"], "stage2_balances.0.weights: Value error, sampling weights"),
    (["stage2_balances=[{weights: {}}, {weights: {sts: 1}}]", "merge.weights=[1, 1, 2]"],
     "stage2_balances: Value error, merge.weights has 3 entries, stage2_balances has 2"),
])
def test_stage2_balances_are_distinct_and_get_one_merge_weight_each(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("micro", overrides)
    cfg = load_config("micro", ["stage2_balances=[{weights: {retrieval: 3, sts: 1}}, {weights: {}}]"])
    assert [b.sampling.model_dump() for b in cfg.stage2_balances] == [
        {"mode": "task_balanced", "weights": {"retrieval": 3.0, "sts": 1.0}}, {"mode": "task_balanced", "weights": {}}]


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


# ----------------------------------------------------------------------------- one home for defaults

def _schema_keys(cls, prefix: str = "") -> set[str]:
    """Dotted keys of the schema: nested sections are walked, lists and dicts are leaves."""
    from pydantic import BaseModel

    keys = set()
    for name, field in cls.model_fields.items():
        ann = field.annotation
        sub = None if getattr(ann, "__origin__", None) in (list, dict) else next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and name != "reranker_model":  # reranker_model: null or a whole `model` block
            keys |= _schema_keys(sub, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _yaml_keys(data: dict, schema: set[str], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        key = prefix + k
        keys |= _yaml_keys(v, schema, key + ".") if isinstance(v, dict) and key not in schema else {key}
    return keys


def test_base_yaml_holds_every_setting_of_the_schema_and_nothing_else():
    from tasks.config import PipelineConfig, base_defaults

    schema = _schema_keys(PipelineConfig)
    yaml_keys = _yaml_keys(base_defaults(), schema)
    assert sorted(schema - yaml_keys) == [], "schema keys without a default in conf/base.yaml"
    assert sorted(yaml_keys - schema) == [], "conf/base.yaml keys the schema does not know"
    assert len(schema) > 200


def test_the_schema_carries_types_and_bounds_not_values():
    """No section class of tasks/config/ writes a default: its values come from conf/base.yaml."""
    import ast
    import inspect

    import tasks.config as config

    for cls in config.DEFAULTS_FROM:
        tree = ast.parse(inspect.getsource(cls))
        for node in ast.walk(tree):
            if not isinstance(node, ast.AnnAssign) or node.value is None:
                continue
            call = node.value
            assert isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Field", \
                f"{cls.__name__}.{node.target.id} has a default in code"
            assert not call.args and not any(k.arg in ("default", "default_factory") for k in call.keywords), \
                f"{cls.__name__}.{node.target.id} has a default in code"


def test_a_config_built_in_code_takes_its_defaults_from_base_yaml(tmp_path, monkeypatch):
    """Change a value in a copy of conf/base.yaml: the class default follows it (no second copy)."""
    import subprocess
    import sys

    import tasks.config as config

    base = config.base_defaults()
    assert config.TrainConfig(steps=4).lr == base["stage2"]["lr"]
    assert config.ModelConfig(backbone="micro").max_doc_length == base["model"]["max_doc_length"]
    assert config.TrainConfig(steps=4).data[0].path == base["stage2"]["data"][0]["path"]  # entries validated
    assert config.PipelineConfig().reranker.objective == "reranker"
    assert config.PipelineConfig().model_dump() == config.validate(base).model_dump()

    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(config.CONF_DIR), str(conf)], check=True)
    text = (conf / "base.yaml").read_text().replace("  max_doc_length: 128", "  max_doc_length: 77", 1)
    (conf / "base.yaml").write_text(text)
    code = "from tasks.config import ModelConfig; print(ModelConfig(backbone='micro').max_doc_length)"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "Q3E_CONF_DIR": str(conf)},
                         capture_output=True, text=True, cwd=config.CONF_DIR.parent)
    assert out.stdout.strip() == "77", out.stderr[-2000:]


@pytest.mark.parametrize("preset", ["micro", "smol"])
def test_every_ablation_setting_loads_and_changes_only_its_overlays_keys(preset):
    """Each setting of `ablations.settings` is conf/ablations/<name>.yaml on top of the preset: it
    loads, changes the resolved config, and changes nothing its overlay does not name (tests/test_pipeline.py
    runs some of them end to end, tests/test_losses.py checks each loss switch against the reference)."""
    from tasks.config import load_config
    from tasks.config.base import flatten
    from tasks.config.loading import CONF_DIR, read_yaml

    full = load_config(preset)
    settings = full.ablations.settings
    assert settings[0] == "full"
    assert sorted(settings[1:]) == sorted(p.stem for p in (CONF_DIR / "ablations").glob("*.yaml"))
    base = {k: v for k, v in full.flat().items() if k != "ablation"}
    for name in settings[1:]:
        overlay = flatten(read_yaml(CONF_DIR / "ablations" / f"{name}.yaml"))
        flat = load_config(preset, ablation=name).flat()
        changed = {k for k in base if flat.get(k) != base[k]}
        assert changed, f"{name} changes nothing"
        assert changed <= set(overlay), f"{name} changes {sorted(changed - set(overlay))} that its overlay does not name"
        for key, value in overlay.items():
            assert flat[key] == value, (name, key)
