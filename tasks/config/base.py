"""What every configuration class shares: where conf/ is, the error, the strict base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

CONF_DIR = Path(os.environ.get("Q3E_CONF_DIR", Path(__file__).resolve().parent.parent.parent / "conf"))


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


class Strict(BaseModel):
    # no unknown keys, no inf/nan (`loss.temperature=inf`), no true/false for a number (`steps=true`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)
    # Settings added after stage keys existed, each with the value that computes what the stages did
    # before it: a stage key leaves such a setting out at that value (tasks.stages.stage_key), so a
    # new option left off keeps every earlier run's stages cached.
    KEY_NEUTRAL: ClassVar[dict[str, Any]] = {}

    def key_dump(self) -> dict[str, Any]:
        """model_dump(mode="json") less the KEY_NEUTRAL settings at their neutral value."""
        out = self.model_dump(mode="json")
        for name, neutral in self.KEY_NEUTRAL.items():
            if out.get(name, neutral) == neutral:
                out.pop(name, None)
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info) -> Any:
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in (int, float, int | None, float | None):
            raise ValueError(f"expected a number, not {str(v).lower()}")
        return v


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
