"""The embedding cache: one .npy file per (model fingerprint, dim, instruction, max length, texts),
so re-evaluating a checkpoint on the same texts skips the forward passes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tasks.data import file_mode
from tasks.evaluation.fingerprints import texts_hash
from tasks.models import cache_dir

log = logging.getLogger(__name__)


class EmbeddingCache:
    """`<folder>/<fingerprint>/<key>.npy`, key = hash(dim, instruction, max length, texts).
    Written atomically (tmp file + rename), so concurrent evaluations never read half a file."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def path(self, fingerprint: str, *, dim: int | None, instruction: str | None, max_length: int | None,
             texts: Sequence[str]) -> Path:
        key = json.dumps([dim, instruction, max_length, texts_hash(texts)])
        key = hashlib.sha256(key.encode()).hexdigest()[:24]
        return self.folder / fingerprint / f"{key}.npy"

    def get_or_compute(self, fingerprint: str, texts: Sequence[str], compute: Callable[[], np.ndarray], *,
                       dim: int | None, instruction: str | None, max_length: int | None) -> np.ndarray:
        path = self.path(fingerprint, dim=dim, instruction=instruction, max_length=max_length, texts=texts)
        if path.is_file():
            try:
                emb = np.load(path)
                if emb.shape[0] == len(texts):
                    self.hits += 1
                    return emb
            except (OSError, ValueError):
                log.warning("embedding cache file %s is unreadable; recomputing", path)
        self.misses += 1
        emb = np.ascontiguousarray(compute(), dtype=np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return emb


def default_embedding_cache() -> EmbeddingCache:
    return EmbeddingCache(cache_dir() / "embeddings")
