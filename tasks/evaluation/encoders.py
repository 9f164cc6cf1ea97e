"""The models mteb evaluates: MtebEmbedder / MtebReranker around `tasks.models.Embedder` /
`Reranker` (or a SentenceTransformer), and loading them from anything `evaluate_model` accepts."""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from tasks.config import ModelConfig
from tasks.evaluation.cache import EmbeddingCache
from tasks.evaluation.fingerprints import folder_fingerprint, parameters_fingerprint, slug
from tasks.evaluation.prompts import TaskPrompts
from tasks.models import Embedder, Reranker
from tasks.models.backbone import resolve_autocast
from tasks.models.specs import load_sentence_transformer, sentence_transformers_source

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- mteb model wrappers

def _model_meta(name: str, revision: str, *, embed_dim: int | None, n_parameters: int | None,
                max_tokens: int | None, cross_encoder: bool = False, use_instructions: bool = True,
                dim: int | None = None):
    from mteb.models.model_meta import ModelMeta

    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None,
        n_parameters=n_parameters, memory_usage_mb=None, max_tokens=max_tokens, embed_dim=embed_dim,
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch", "Transformers"], similarity_fn_name=None if cross_encoder else "cosine",
        use_instructions=use_instructions, training_datasets=None,
        model_type=["cross-encoder"] if cross_encoder else ["dense"],
        experiment_kwargs={"dim": dim} if dim else None)


def model_context(model) -> int | None:
    """The longest input the backbone of an Embedder / Reranker takes (max_position_embeddings)."""
    return getattr(getattr(getattr(model, "backbone", None), "config", None), "max_position_embeddings", None)


def check_length(key: str, value: int | None, model, source: str) -> None:
    """An eval max length (eval.max_query_length, ...) must fit the model's context."""
    context = model_context(model)
    if value is not None and context is not None and value > context:
        raise ValueError(f"{key} {value} is longer than the model's context: {source} takes at most "
                         f"{context} tokens (max_position_embeddings)")


def _texts(inputs) -> list[str]:
    """mteb 2 hands encoders a DataLoader of batches ({"text": [...], ...})."""
    if isinstance(inputs, (list, tuple)):
        return [str(t) for t in inputs]
    return [t for batch in inputs for t in batch["text"]]


class MtebEmbedder(AbsEncoder):
    """mteb encoder around an `Embedder` (or a `SentenceTransformer`, which gets no instructions).

    `fingerprint` identifies the weights: it is the mteb revision (so mteb's result cache never
    serves another checkpoint's score) and the embedding-cache namespace.
    """

    def __init__(self, model: Embedder | Any, *, name: str, fingerprint: str,
                 prompts: TaskPrompts | None = None, dim: int | None = None, batch_size: int = 32,
                 cache: EmbeddingCache | None = None, show_progress: bool = False,
                 symmetric: Sequence[str] = (), max_query_length: int | None = None,
                 max_doc_length: int | None = None):
        self.model = model
        self.symmetric = set(symmetric)  # task names whose documents get the instruction too
        self.is_st = not isinstance(model, Embedder)
        self.prompts = prompts or TaskPrompts.load()
        self.dim = dim
        self.batch_size = batch_size
        self.cache = cache
        self.fingerprint = fingerprint
        self.show_progress = show_progress
        self.encode_calls = 0  # model forward passes actually run (cache misses)
        n_params = sum(p.numel() for p in model.parameters())
        if self.is_st:
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            hidden, max_tokens = get_dim(), model.max_seq_length
            if max_query_length or max_doc_length:
                log.warning("%s is a SentenceTransformer: it keeps its own max_seq_length %s; "
                            "eval.max_query_length / max_doc_length apply to our models", name, max_tokens)
            self.max_query_length = self.max_doc_length = max_tokens
        else:
            hidden = model.hidden_size
            # eval.max_*_length, else the lengths the model was trained with (its config)
            self.max_query_length = max_query_length or model.cfg.max_query_length
            self.max_doc_length = max_doc_length or model.cfg.max_doc_length
            check_length("eval.max_query_length", max_query_length, model, name)
            check_length("eval.max_doc_length", max_doc_length, model, name)
            max_tokens = max(self.max_query_length, self.max_doc_length)
        if dim is not None and hidden is not None and dim > hidden:
            raise ValueError(f"--dim {dim} is larger than the model's embedding size {hidden}")
        self.mteb_model_meta = _model_meta(
            name if "/" in name else f"q3e/{name}", fingerprint, embed_dim=dim or hidden, n_parameters=n_params,
            max_tokens=max_tokens, use_instructions=not self.is_st, dim=dim)

    def instruction(self, task_metadata, prompt_type) -> str | None:
        if self.is_st or (prompt_type == PromptType.document and task_metadata.name not in self.symmetric):
            return None
        return self.prompts.for_task(task_metadata)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs) -> np.ndarray:
        texts = _texts(inputs)
        instruction = self.instruction(task_metadata, prompt_type)
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        if self.is_st:
            max_length = self.model.max_seq_length
        elif prompt_type == PromptType.query:
            max_length = self.max_query_length
        else:  # documents, and both sides of symmetric tasks (which may be long: clustering P2P)
            max_length = self.max_doc_length
        return self.embed(texts, instruction=instruction, max_length=max_length, batch_size=batch_size)

    def embed(self, texts: Sequence[str], *, instruction: str | None, max_length: int | None,
              batch_size: int | None = None) -> np.ndarray:
        """[len(texts), dim] unit vectors, from the cache when this model has embedded these texts before."""
        batch_size = batch_size or self.batch_size

        def compute() -> np.ndarray:
            self.encode_calls += 1
            if self.is_st:
                emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=self.show_progress)
                if self.dim:
                    emb = emb[:, : self.dim]
                    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
                return emb
            return self.model.encode(list(texts), instruction=instruction, batch_size=batch_size,
                                     dim=self.dim, max_length=max_length, show_progress=self.show_progress)

        if not texts:
            return np.zeros((0, self.mteb_model_meta.embed_dim), dtype=np.float32)
        if self.cache is None:
            return np.asarray(compute(), dtype=np.float32)
        return self.cache.get_or_compute(self.fingerprint, texts, compute, dim=self.dim,
                                         instruction=instruction, max_length=max_length)


class MtebReranker:
    """mteb cross-encoder (`predict(queries, documents)`) around a yes/no `Reranker` (SPEC 1).
    Not an AbsEncoder on purpose: mteb must see a CrossEncoderProtocol, not an encoder."""

    def __init__(self, model: Reranker, *, name: str, fingerprint: str, prompts: TaskPrompts | None = None,
                 batch_size: int = 16, max_length: int | None = None, both_orders: Sequence[str] = ()):
        self.model = model
        self.both_orders = set(both_orders)  # task names scored as the mean of s(a, b) and s(b, a)
        self.prompts = prompts or TaskPrompts.load()
        self.batch_size = batch_size
        self.predict_calls = 0
        self.max_length = max_length or model.cfg.max_rerank_length  # eval.max_rerank_length, else trained
        check_length("eval.max_rerank_length", max_length, model, name)
        self.mteb_model_meta = _model_meta(
            name if "/" in name else f"q3e/{name}", fingerprint, embed_dim=None,
            n_parameters=sum(p.numel() for p in model.parameters()), max_tokens=self.max_length,
            cross_encoder=True)

    def predict(self, inputs1, inputs2, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                **kwargs) -> np.ndarray:
        queries, documents = _texts(inputs1), _texts(inputs2)
        self.predict_calls += 1
        score = lambda a, b: self.model.score(a, b, instruction=self.prompts.for_task(task_metadata),
                                              batch_size=self.batch_size, max_length=self.max_length)
        if task_metadata.name not in self.both_orders:
            return score(queries, documents)
        # a symmetric task has no query side: its relevance is symmetric in the two texts, while a
        # yes/no judgement of (a, b) is not (a premise "meets" its entailed generalisation)
        return (score(queries, documents) + score(documents, queries)) / 2


# ----------------------------------------------------------------------------- loading models

@dataclass
class LoadedModel:
    model: Any           # Embedder, Reranker or SentenceTransformer
    name: str
    fingerprint: str


def with_autocast(model, autocast: str | None):
    """`model` (an Embedder or Reranker) encoding under `autocast` (eval.autocast; None, or `auto` on a
    device without native bf16 = its own model.autocast). A live model is copied, not changed: the copy
    shares its weights."""
    autocast = resolve_autocast(autocast, model.device)
    if autocast is None or model.cfg.autocast == autocast:
        return model
    model = copy.copy(model)
    model.cfg = model.cfg.model_copy(update={"autocast": autocast})
    return model


def load_embedding_model(spec: str | Path | ModelConfig | Embedder, *, device=None,
                         revision: str | None = None, autocast: str | None = None) -> LoadedModel:
    """A saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2` (SentenceTransformer),
    `st:<path or hub name>` (SentenceTransformer), a hub name, a ModelConfig, or a live Embedder
    (the spec is read by `tasks.models.specs`, as in the filter). `autocast` (eval.autocast) applies to
    an Embedder; the fingerprint, and so the embedding cache, tells its precisions apart."""
    if isinstance(spec, Embedder):
        spec = with_autocast(spec, autocast)
        return LoadedModel(spec, slug(Path(spec.source).name or "embedder"),
                           revision or parameters_fingerprint(spec, spec.cfg.model_dump_json()))
    st_path = sentence_transformers_source(spec)
    if st_path is not None:
        model = load_sentence_transformer(st_path, device)
        fp = revision or (folder_fingerprint(st_path) if Path(st_path).exists() else slug(st_path))
        text = str(spec)
        name = text.split(":", 1)[1] if ":" in text else Path(st_path).name
        return LoadedModel(model, slug(name), fp)
    emb = with_autocast(Embedder.load(spec, device=device), autocast)
    cfg_json = emb.cfg.model_dump_json(exclude={"backbone"})
    if Path(emb.source).exists():
        fp = folder_fingerprint(emb.source, cfg_json)
    else:  # a hub name: the snapshot's commit identifies the weights
        commit = getattr(emb.backbone.config, "_commit_hash", None) or emb.cfg.revision or "main"
        fp = hashlib.sha256(f"{emb.source}|{commit}|{cfg_json}".encode()).hexdigest()[:16]
    spec_name = spec.backbone if isinstance(spec, ModelConfig) else str(spec)
    name = Path(spec_name).name if Path(spec_name).exists() else spec_name
    return LoadedModel(emb, slug(name), revision or fp)


def load_reranker_model(spec: str | Path | ModelConfig | Reranker, *, device=None,
                        autocast: str | None = None) -> LoadedModel:
    if isinstance(spec, Reranker):
        spec = with_autocast(spec, autocast)
        return LoadedModel(spec, slug(Path(spec.source).name or "reranker"),
                           parameters_fingerprint(spec, spec.cfg.model_dump_json()))
    rr = with_autocast(Reranker.load(spec, device=device), autocast)
    fp = (folder_fingerprint(rr.source, rr.cfg.model_dump_json(exclude={"backbone"}))
          if Path(rr.source).exists() else slug(rr.source))
    spec_name = spec.backbone if isinstance(spec, ModelConfig) else str(spec)
    return LoadedModel(rr, slug(Path(spec_name).name) + "-reranker", fp)


def model_settings(model, *, max_query_length: int | None = None, max_doc_length: int | None = None) -> dict | None:
    """The settings an Embedder is scored with (layers kept, max lengths: the eval.max_*_length given,
    else the model's own; mixed precision, null = float32); None for other models."""
    if not isinstance(model, Embedder):
        return None
    return {"num_layers": model.backbone.config.num_hidden_layers,
            "max_query_length": max_query_length or model.cfg.max_query_length,
            "max_doc_length": max_doc_length or model.cfg.max_doc_length,
            "autocast": model.cfg.autocast}


def as_mteb_encoder(model, *, prompts: TaskPrompts | None = None, dim: int | None = None,
                    batch_size: int = 32, cache: EmbeddingCache | None = None, device=None,
                    revision: str | None = None, symmetric: Sequence[str] = (),
                    max_query_length: int | None = None, max_doc_length: int | None = None,
                    autocast: str | None = None):
    """Anything `evaluate_model` accepts -> an mteb encoder. An object that already carries
    `mteb_model_meta` (e.g. a test's oracle encoder) is used as is."""
    if hasattr(model, "mteb_model_meta") and not isinstance(model, (Embedder, Reranker)):
        return model
    loaded = load_embedding_model(model, device=device, revision=revision, autocast=autocast)
    return MtebEmbedder(loaded.model, name=loaded.name, fingerprint=loaded.fingerprint, prompts=prompts,
                        dim=dim, batch_size=batch_size, cache=cache, symmetric=symmetric,
                        max_query_length=max_query_length, max_doc_length=max_doc_length)


def as_mteb_reranker(model, *, prompts: TaskPrompts | None = None, batch_size: int = 16, device=None,
                     max_length: int | None = None, autocast: str | None = None, both_orders: Sequence[str] = ()):
    if hasattr(model, "mteb_model_meta") and hasattr(model, "predict"):
        return model
    loaded = load_reranker_model(model, device=device, autocast=autocast)
    return MtebReranker(loaded.model, name=loaded.name, fingerprint=loaded.fingerprint, prompts=prompts,
                        batch_size=batch_size, max_length=max_length, both_orders=both_orders)
