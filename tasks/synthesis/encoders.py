"""The persona retriever of synthesis (a sentence encoder loaded once per process, through the one
spec loader `tasks.models.specs`) and the file that caches its persona matrix."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from tasks.models.specs import encoder_id, load_encoder


@functools.lru_cache(maxsize=1)
def persona_encoder(spec: str):
    """The persona retriever, kept for the next call in the same process (pipelines, tests)."""
    return load_encoder(spec, device="cpu")


def persona_cache(persona_path: Path, retriever: str) -> Path:
    """The .npy file that caches the persona matrix of `persona_path` under `retriever`."""
    from tasks.models import cache_dir

    key = hashlib.sha256(persona_path.read_bytes() + b"|" + encoder_id(retriever).encode()).hexdigest()[:16]
    return cache_dir() / "personas" / f"{key}.npy"
