"""Typed configuration: `conf/*.yaml` overlays validated into pydantic objects.

A run's configuration is built from, in order:
  1. `conf/base.yaml`            every setting with its default,
  2. `conf/presets/<name>.yaml`  the model and the sizes (micro, smol, qwen3-0.6b, ...),
  3. `conf/ablations/<name>.yaml` optional, what an ablation changes,
  4. extra YAML files given with `--config`,
  5. command-line overrides `key.sub=value` (the value is parsed as YAML).
Unknown keys and wrong types are errors that name the key and where it came from.
"""

from tasks.config.base import CONF_DIR, ConfigError, Strict, flatten
from tasks.config.training import (
    DataSource,
    DistributedConfig,
    LoraConfig,
    LossConfig,
    MergeConfig,
    MicroConfig,
    ModelConfig,
    Resources,
    SamplingConfig,
    Stage2Balance,
    TrainConfig,
)
from tasks.config.pipeline import (
    AblationConfig,
    DataConfig,
    DerivedSet,
    EvalConfig,
    FilterConfig,
    GeneratorConfig,
    HubPassages,
    InfraConfig,
    PipelineConfig,
    RetrainConfig,
    SynthConfig,
)
from tasks.config.loading import (
    DEFAULTS_FROM,
    available,
    base_defaults,
    deep_merge,
    dump_yaml,
    load_config,
    parse_override,
    read_yaml,
    validate,
)

__all__ = [
    "CONF_DIR", "ConfigError", "Strict", "flatten",
    "DataSource", "DistributedConfig", "LoraConfig", "LossConfig", "MergeConfig", "MicroConfig", "ModelConfig",
    "Resources", "SamplingConfig", "Stage2Balance", "TrainConfig",
    "AblationConfig", "DataConfig", "DerivedSet", "EvalConfig", "FilterConfig", "GeneratorConfig", "HubPassages",
    "InfraConfig", "PipelineConfig", "RetrainConfig", "SynthConfig",
    "DEFAULTS_FROM", "available", "base_defaults", "deep_merge", "dump_yaml", "load_config", "parse_override",
    "read_yaml", "validate",
]
