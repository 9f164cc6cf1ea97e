"""One reading of a model spec for every stage that encodes text (filter, persona retrieval,
evaluation): the project's own Embedder, or a sentence-transformers model.

A spec is a saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2`,
`st:<folder or hub name>`, a sentence-transformers folder (modules.json, no q3e.json), a hub name
or a ModelConfig. Sentence-transformers models were not trained with the recipe's instructions
(`Instruct: ...\\nQuery:`), so they get none: in evaluation and in the filter alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.config import ModelConfig
from tasks.models.backbone import ModelLoadError, bundled_path
from tasks.models.embedder import Embedder
from tasks.models.saved_model import MODEL_CARD


def sentence_transformers_source(spec: Any) -> str | None:
    """The folder or hub name of a sentence-transformers model if `spec` names one, else None (the
    spec is for the project's Embedder)."""
    if isinstance(spec, (ModelConfig, Embedder)):
        return None
    text = str(spec)
    if text.startswith("st:"):
        return text[3:]
    if text.startswith("bundled:"):
        folder, gguf = bundled_path(text.split(":", 1)[1])
        return None if gguf is not None else str(folder)
    path = Path(text).expanduser()
    if (path / "modules.json").is_file() and not (path / MODEL_CARD).is_file():
        return str(path)
    return None


def load_sentence_transformer(source: str, device=None):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(source, device=str(device) if device else None)  # None: its own choice
    except OSError as e:
        raise ModelLoadError(f"{source}: cannot load SentenceTransformer model: {e}") from e


class SentenceTransformerEncoder:
    """A sentence-transformers model behind `Embedder.encode`'s signature (unit vectors; the
    instruction is ignored, see the module docstring)."""

    def __init__(self, source: str, device=None):
        self.model = load_sentence_transformer(source, device)
        self.source = source

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, is_query: bool = False,
               batch_size: int = 32, **_: Any) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


def load_encoder(spec: Any, *, device=None) -> Embedder | SentenceTransformerEncoder:
    """An object with `encode(texts, *, instruction, is_query, batch_size) -> unit vectors` for any spec."""
    if isinstance(spec, Embedder):
        return spec
    source = sentence_transformers_source(spec)
    if source is not None:
        return SentenceTransformerEncoder(source, device)
    return Embedder.load(spec if isinstance(spec, ModelConfig) else str(spec), device=device)


def encoder_id(spec: Any) -> str:
    """A stable name of a spec for caches and manifests."""
    if isinstance(spec, ModelConfig):
        return spec.model_dump_json()
    p = Path(str(spec)).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)
