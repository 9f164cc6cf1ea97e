"""Loading: base.yaml + preset + ablation + files + overrides, merged and validated; and the schema's
defaults, installed from conf/base.yaml (the only place a default lives)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from tasks.config.base import CONF_DIR, ConfigError, Strict
from tasks.config.pipeline import (
    AblationConfig,
    DataConfig,
    EvalConfig,
    FilterConfig,
    GeneratorConfig,
    InfraConfig,
    PipelineConfig,
    RetrainConfig,
    SynthConfig,
)
from tasks.config.training import (
    DistributedConfig,
    LoraConfig,
    LossConfig,
    MergeConfig,
    MicroConfig,
    ModelConfig,
    Resources,
    SamplingConfig,
    TrainConfig,
)


# ----------------------------------------------------------------------------- loading

def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """`stage2.loss.temperature=0.02` -> {"stage2": {"loss": {"temperature": 0.02}}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / kind).glob("*.yaml"))


def load_config(
    preset: str = "smol",
    overrides: list[str] | None = None,
    *,
    ablation: str | None = None,
    files: list[str | Path] | None = None,
) -> PipelineConfig:
    """Resolve base + preset + ablation + files + overrides into a validated `PipelineConfig`."""
    sources: list[str] = [str(CONF_DIR / "base.yaml")]
    merged = read_yaml(CONF_DIR / "base.yaml")
    preset_file = CONF_DIR / "presets" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(available('presets'))}")
    merged = deep_merge(merged, read_yaml(preset_file))
    merged["preset"] = preset
    sources.append(str(preset_file))
    if ablation and ablation != "full":
        abl_file = CONF_DIR / "ablations" / f"{ablation}.yaml"
        if not abl_file.is_file():
            raise ConfigError(f"unknown ablation {ablation!r}; available: {', '.join(available('ablations'))}")
        merged = deep_merge(merged, read_yaml(abl_file))
        sources.append(str(abl_file))
    if ablation:
        merged["ablation"] = ablation
    for f in files or []:
        merged = deep_merge(merged, read_yaml(Path(f)))
        sources.append(str(f))
    for o in overrides or []:
        merged = deep_merge(merged, parse_override(o))
        sources.append(f"override {o!r}")
    return validate(merged, sources)


def validate(data: dict[str, Any], sources: list[str] | None = None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        where = "; ".join(sources or [])
        raise ConfigError(f"invalid configuration (from {where}):\n" + "\n".join(lines)) from None


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- defaults

# conf/base.yaml is the only place a default lives: the classes above carry types and bounds, and
# the defaults of a class built directly in code (`ModelConfig(backbone="micro")`,
# `TrainConfig(steps=4)`) are read from the base.yaml section below. A class used in several
# sections takes the first one's (TrainConfig: stage2's; MergeConfig: merge's). List entries
# (DataSource, DerivedSet) keep their per-entry options' neutral values in code: an entry states
# only what it needs. tests/test_config.py fails when a schema key has no YAML default or the YAML
# has a key the schema lacks.
DEFAULTS_FROM: dict[type[Strict], str] = {
    MicroConfig: "model.micro", LoraConfig: "stage2.lora", ModelConfig: "model", Resources: "stage2.resources",
    LossConfig: "stage2.loss", SamplingConfig: "stage2.sampling", DistributedConfig: "stage2.distributed",
    TrainConfig: "stage2",
    MergeConfig: "merge", GeneratorConfig: "synth.generator", SynthConfig: "synth", FilterConfig: "filter",
    EvalConfig: "eval", DataConfig: "data", InfraConfig: "infra", RetrainConfig: "retrain",
    AblationConfig: "ablations", PipelineConfig: "",
}


def base_defaults() -> dict[str, Any]:
    """conf/base.yaml as a dict."""
    return read_yaml(CONF_DIR / "base.yaml")


def _section(data: dict[str, Any], path: str) -> dict[str, Any]:
    for part in filter(None, path.split(".")):
        data = data[part]
    return data


def _install_defaults() -> None:
    import copy as _copy

    from pydantic_core import PydanticUndefined

    base = base_defaults()
    for cls, path in DEFAULTS_FROM.items():
        section = _section(base, path)
        for name, field in cls.model_fields.items():
            if name not in section:
                continue
            value = section[name]
            if isinstance(value, (list, dict)):  # sections, lists of entries, maps: validated copies
                adapter = TypeAdapter(field.annotation)
                field.default = PydanticUndefined
                field.default_factory = lambda adapter=adapter, value=value: adapter.validate_python(_copy.deepcopy(value))
            else:
                field.default = value
    for cls in DEFAULTS_FROM:  # leaves first: a parent's schema embeds its children's
        cls.model_rebuild(force=True)


_install_defaults()
