"""Evaluation (SPEC 4): MTEB tasks, local BEIR/STS/pair-classification sets, and reranking of the
embedding model's top-k, all scored by mteb itself.

The pieces, top to bottom:
  TaskPrompts              task name -> instruction (conf/task_prompts.json + user overrides)
  EmbeddingCache           .npy files keyed by (model fingerprint, dim, instruction, max length, texts)
  MtebEmbedder             an mteb encoder around `tasks.models.Embedder` (or a SentenceTransformer)
  MtebReranker             an mteb cross-encoder around `tasks.models.Reranker`
  beir_task / sts_task / pair_classification_task / resolve_tasks    what to evaluate on
  run_task / evaluate_reranking / score_run                          mteb.evaluate and its metrics
  evaluate_model           the entry point: results dict + one JSON per run + table + MLflow metrics

Retrieval queries get the task instruction and documents none; symmetric tasks (STS, pair
classification, classification, clustering) get it on both sides (SPEC 1). mteb tells the encoder
which side it is encoding through `prompt_type` (query / document / None for symmetric tasks).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import mteb
import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from tasks.config import CONF_DIR, EvalConfig, ModelConfig
from tasks.data import DataError, atomic_write_text, file_mode, iter_jsonl, load_beir
from tasks.models import (
    DEFAULT_INSTRUCTION,
    MODEL_CARD,
    Embedder,
    ModelLoadError,
    Reranker,
    bundled_path,
    cache_dir,
)

log = logging.getLogger(__name__)

PROMPTS_FILE = CONF_DIR / "task_prompts.json"  # Q3E_CONF_DIR moves it with the rest of conf/
# What `evaluate_model` reports before/after reranking (the paper's Table 4 uses nDCG@10).
RERANK_METRICS = ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100")
K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # mteb's AbsTaskRetrieval.k_values


# ----------------------------------------------------------------------------- instructions

class TaskPrompts:
    """Task name -> instruction. Lookup: exact task name, glob key (`CQADupstack*`), the task's own
    mteb prompt, its task type (`Retrieval`, `STS`, ...), then `default`."""

    def __init__(self, table: Mapping[str, str]):
        self.table = {k: v for k, v in table.items() if not k.startswith("_")}
        self.globs = [k for k in self.table if any(c in k for c in "*?[")]

    @classmethod
    def load(cls, overrides: Mapping[str, str] | str | Path | None = None,
             base: str | Path | None = PROMPTS_FILE) -> "TaskPrompts":
        """The bundled table (conf/task_prompts.json) updated with `overrides` (a dict or a JSON file)."""
        table = _read_prompts(Path(base)) if base else {}
        if isinstance(overrides, (str, Path)):
            overrides = _read_prompts(Path(overrides))
        return cls({**table, **(overrides or {})})

    def instruction(self, task_name: str, task_type: str | None = None, task_prompt: Any = None) -> str:
        if task_name in self.table:
            return self.table[task_name]
        for key in self.globs:
            if fnmatch.fnmatchcase(task_name, key):
                return self.table[key]
        if isinstance(task_prompt, dict):
            task_prompt = task_prompt.get("query")
        if isinstance(task_prompt, str) and task_prompt:
            return task_prompt
        if task_type and task_type in self.table:
            return self.table[task_type]
        return self.table.get("default", DEFAULT_INSTRUCTION)

    def for_task(self, metadata) -> str:
        """The instruction for an mteb `TaskMetadata`."""
        return self.instruction(metadata.name, metadata.type, metadata.prompt)


def _read_prompts(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(f"{path}: task prompts file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of task name -> instruction")
    for k, v in data.items():
        if not k.startswith("_") and not isinstance(v, str):
            raise DataError(f"{path}: field {k!r} must be a string instruction, got {type(v).__name__}")
    return data


# ----------------------------------------------------------------------------- fingerprints + cache

_MODEL_FILE = re.compile(r".*\.(json|safetensors|bin|pt|model|txt|gguf)$")


def folder_fingerprint(path: str | Path, extra: str = "") -> str:
    """Hash of a model folder's file names, sizes and mtimes (config, weights, tokenizer, ST modules):
    a retrained or re-merged checkpoint in the same folder gets a new fingerprint, without reading weights."""
    path = Path(path).resolve()
    if path.is_file():
        files = [path]
    else:
        files = [p for p in path.iterdir() if p.is_file() and _MODEL_FILE.match(p.name)]
        files += [p for d in path.iterdir() if d.is_dir() and re.match(r"\d+_", d.name)
                  for p in d.rglob("*") if p.is_file()]
    h = hashlib.sha256(f"{path}|{extra}".encode())
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.relative_to(path.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def parameters_fingerprint(module, extra: str = "") -> str:
    """Hash of a live model's parameter bytes (for an in-memory model that has no folder of its own)."""
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(b)
    return h.hexdigest()


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[-80:] or "model"


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
                 cache: EmbeddingCache | None = None, show_progress: bool = False):
        self.model = model
        self.is_st = not isinstance(model, Embedder)
        self.prompts = prompts or TaskPrompts.load()
        self.dim = dim
        self.batch_size = batch_size
        self.cache = cache
        self.fingerprint = fingerprint
        self.show_progress = show_progress
        self.encode_calls = 0  # model forward passes actually run (cache misses)
        if self.is_st:
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            hidden = get_dim()
            n_params, max_tokens = sum(p.numel() for p in model.parameters()), model.max_seq_length
        else:
            hidden = model.hidden_size
            n_params = sum(p.numel() for p in model.parameters())
            max_tokens = max(model.cfg.max_query_length, model.cfg.max_doc_length)
        if dim is not None and hidden is not None and dim > hidden:
            raise ValueError(f"--dim {dim} is larger than the model's embedding size {hidden}")
        self.mteb_model_meta = _model_meta(
            name if "/" in name else f"q3e/{name}", fingerprint, embed_dim=dim or hidden, n_parameters=n_params,
            max_tokens=max_tokens, use_instructions=not self.is_st, dim=dim)

    def instruction(self, task_metadata, prompt_type) -> str | None:
        if self.is_st or prompt_type == PromptType.document:
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
            max_length = self.model.cfg.max_query_length
        else:  # documents, and both sides of symmetric tasks (which may be long: clustering P2P)
            max_length = self.model.cfg.max_doc_length
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
                 batch_size: int = 16):
        self.model = model
        self.prompts = prompts or TaskPrompts.load()
        self.batch_size = batch_size
        self.predict_calls = 0
        self.mteb_model_meta = _model_meta(
            name if "/" in name else f"q3e/{name}", fingerprint, embed_dim=None,
            n_parameters=sum(p.numel() for p in model.parameters()), max_tokens=model.cfg.max_rerank_length,
            cross_encoder=True)

    def predict(self, inputs1, inputs2, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                **kwargs) -> np.ndarray:
        queries, documents = _texts(inputs1), _texts(inputs2)
        self.predict_calls += 1
        return self.model.score(queries, documents, instruction=self.prompts.for_task(task_metadata),
                                batch_size=self.batch_size)


# ----------------------------------------------------------------------------- loading models

@dataclass
class LoadedModel:
    model: Any           # Embedder, Reranker or SentenceTransformer
    name: str
    fingerprint: str


def _is_st_folder(path: Path) -> bool:
    return (path / "modules.json").is_file() and not (path / MODEL_CARD).is_file()


def load_embedding_model(spec: str | Path | ModelConfig | Embedder, *, device=None,
                         revision: str | None = None) -> LoadedModel:
    """A saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2` (SentenceTransformer),
    `st:<path or hub name>` (SentenceTransformer), a hub name, a ModelConfig, or a live Embedder."""
    if isinstance(spec, Embedder):
        return LoadedModel(spec, _slug(Path(spec.source).name or "embedder"),
                           revision or parameters_fingerprint(spec, spec.cfg.model_dump_json()))
    if not isinstance(spec, ModelConfig):
        text = str(spec)
        st_path: str | None = None
        if text.startswith("st:"):
            st_path = text[3:]
        elif text.startswith("bundled:"):
            folder, gguf = bundled_path(text.split(":", 1)[1])
            if gguf is None:
                st_path = str(folder)
        elif Path(text).expanduser().is_dir() and _is_st_folder(Path(text).expanduser()):
            st_path = str(Path(text).expanduser())
        if st_path is not None:
            from sentence_transformers import SentenceTransformer

            try:
                model = SentenceTransformer(st_path, device=str(device) if device else None)
            except OSError as e:
                raise ModelLoadError(f"{st_path}: cannot load SentenceTransformer model: {e}") from e
            fp = revision or (folder_fingerprint(st_path) if Path(st_path).exists() else _slug(st_path))
            name = text.split(":", 1)[1] if ":" in text else Path(st_path).name
            return LoadedModel(model, _slug(name), fp)
    emb = Embedder.load(spec, device=device)
    cfg_json = emb.cfg.model_dump_json(exclude={"backbone"})
    if Path(emb.source).exists():
        fp = folder_fingerprint(emb.source, cfg_json)
    else:  # a hub name: the snapshot's commit identifies the weights
        commit = getattr(emb.backbone.config, "_commit_hash", None) or emb.cfg.revision or "main"
        fp = hashlib.sha256(f"{emb.source}|{commit}|{cfg_json}".encode()).hexdigest()[:16]
    spec_name = spec.backbone if isinstance(spec, ModelConfig) else str(spec)
    name = Path(spec_name).name if Path(spec_name).exists() else spec_name
    return LoadedModel(emb, _slug(name), revision or fp)


def load_reranker_model(spec: str | Path | ModelConfig | Reranker, *, device=None) -> LoadedModel:
    if isinstance(spec, Reranker):
        return LoadedModel(spec, _slug(Path(spec.source).name or "reranker"),
                           parameters_fingerprint(spec, spec.cfg.model_dump_json()))
    rr = Reranker.load(spec, device=device)
    fp = (folder_fingerprint(rr.source, rr.cfg.model_dump_json(exclude={"backbone"}))
          if Path(rr.source).exists() else _slug(rr.source))
    spec_name = spec.backbone if isinstance(spec, ModelConfig) else str(spec)
    return LoadedModel(rr, _slug(Path(spec_name).name) + "-reranker", fp)


def _model_settings(model) -> dict | None:
    if not isinstance(model, Embedder):
        return None
    return {"num_layers": model.backbone.config.num_hidden_layers, "max_query_length": model.cfg.max_query_length,
            "max_doc_length": model.cfg.max_doc_length}


def as_mteb_encoder(model, *, prompts: TaskPrompts | None = None, dim: int | None = None,
                    batch_size: int = 32, cache: EmbeddingCache | None = None, device=None,
                    revision: str | None = None):
    """Anything `evaluate_model` accepts -> an mteb encoder. An object that already carries
    `mteb_model_meta` (e.g. a test's oracle encoder) is used as is."""
    if hasattr(model, "mteb_model_meta") and not isinstance(model, (Embedder, Reranker)):
        return model
    loaded = load_embedding_model(model, device=device, revision=revision)
    return MtebEmbedder(loaded.model, name=loaded.name, fingerprint=loaded.fingerprint, prompts=prompts,
                        dim=dim, batch_size=batch_size, cache=cache)


def as_mteb_reranker(model, *, prompts: TaskPrompts | None = None, batch_size: int = 16, device=None):
    if hasattr(model, "mteb_model_meta") and hasattr(model, "predict"):
        return model
    loaded = load_reranker_model(model, device=device)
    return MtebReranker(loaded.model, name=loaded.name, fingerprint=loaded.fingerprint, prompts=prompts,
                        batch_size=batch_size)


# ----------------------------------------------------------------------------- local tasks

def _files_revision(paths: Iterable[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _guess_lang(texts: Iterable[str]) -> str:
    sample = "".join(t for _, t in zip(range(20), texts))
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in sample)
    return "cmn-Hans" if cjk > len(sample) * 0.2 else "eng-Latn"


def _metadata(name: str, type_: str, main_score: str, path: Path, revision: str, lang: str, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, description=description, dataset={"path": str(path), "revision": revision},
                        type=type_, category="t2t", modalities=["text"], eval_splits=["test"],
                        eval_langs=[lang], main_score=main_score)


def _local_task(base: type, metadata, data: Any, **attrs):
    """An instance of a one-off subclass of an mteb AbsTask whose metadata is a class attribute (mteb's
    `unload_data` drops instance-level metadata) and whose `load_data` hands over data read up front."""

    def load_data(self, num_proc=None, **kwargs) -> None:
        if not self.data_loaded:
            self.dataset = {"default": {"test": data() if callable(data) else data}}
            self.data_loaded = True

    cls = type(f"Local{base.__name__.removeprefix('AbsTask')}Task", (base,),
               {"metadata": metadata, "load_data": load_data, **attrs})
    return cls()


def _sample(items: Sequence, n: int | None, seed: int) -> list:
    """A deterministic subsample that keeps the original order."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def beir_task(folder: str | Path, name: str | None = None, split: str = "test", *,
              max_queries: int | None = None, max_corpus: int | None = None, seed: int = 0,
              lang: str | None = None):
    """An mteb retrieval task (main score nDCG@10) from a BEIR folder: corpus.jsonl, queries.jsonl,
    qrels/<split>.tsv. Read now (bad input fails here, naming file:line:field).

    max_queries: keep this many judged queries (a fixed random sample);
    max_corpus: keep every document judged for the kept queries, plus a fixed random sample of the
    others up to this many documents in all (judged documents are never dropped).
    The task name defaults to the folder name (`xquad/en` -> `xquad-en`)."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval

    folder = Path(folder)
    beir = load_beir(folder, split)
    qids = _sample(sorted(beir.qrels), max_queries, seed)
    judged = {cid for q in qids for cid in beir.qrels[q]}
    others = [cid for cid in beir.corpus if cid not in judged]
    n_others = max(0, (max_corpus or len(beir.corpus)) - len(judged))
    if max_corpus is not None and len(judged) > max_corpus:
        log.warning("%s: the %d kept queries judge %d documents, more than max_corpus=%d; keeping them all",
                    folder, len(qids), len(judged), max_corpus)
    keep_docs = judged | set(_sample(others, n_others, seed + 1))
    doc_ids = [cid for cid in beir.corpus if cid in keep_docs]
    name = name or (folder.name if len(folder.name) > 3 else f"{folder.parent.name}-{folder.name}")
    corpus = Dataset.from_dict({"id": doc_ids, "title": [beir.corpus[c][0] for c in doc_ids],
                                "text": [beir.corpus[c][1] for c in doc_ids]})
    queries = Dataset.from_dict({"id": qids, "text": [beir.queries[q] for q in qids]})
    relevant = {q: dict(beir.qrels[q]) for q in qids}
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    meta = _metadata(name, "Retrieval", "ndcg_at_10", folder,
                     _files_revision(files, f"{split}|{max_queries}|{max_corpus}|{seed}"),
                     lang or _guess_lang(beir.queries.values()),
                     f"Local BEIR folder {folder} ({len(qids)} queries, {len(doc_ids)} documents)")

    def data() -> dict:  # mteb mutates relevant_docs/queries in place: hand out fresh copies
        return {"corpus": corpus, "queries": queries, "top_ranked": None,
                "relevant_docs": {q: dict(d) for q, d in relevant.items()}}

    return _local_task(AbsTaskRetrieval, meta, data)


_S1 = ("sentence1", "sentence_a", "s1", "text1", "text_a", "query")
_S2 = ("sentence2", "sentence_b", "s2", "text2", "text_b", "document")
_SCORE = ("score", "relatedness_score", "similarity", "gold", "label")


def _read_pairs_file(path: Path, value_fields: Sequence[str],
                     value_name: str) -> list[tuple[str, str, str, str]]:
    """(sentence1, sentence2, raw value, where) from a TSV (header with named columns, or bare
    `s1 TAB s2 TAB value`) or a JSONL of {sentence1, sentence2, <value>}."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[tuple[str, str, str, str]] = []
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            keys = {k.lower(): k for k in obj}
            fields = []
            for names, label in ((_S1, "sentence1"), (_S2, "sentence2"), (value_fields, value_name)):
                key = next((keys[n] for n in names if n in keys), None)
                if key is None or obj[key] is None:
                    raise DataError(f"{where}: missing field {label!r}")
                fields.append(obj[key])
            s1, s2, value = fields
            for label, s in (("sentence1", s1), ("sentence2", s2)):
                if not isinstance(s, str) or not s.strip():
                    raise DataError(f"{where}: field {label!r} must be a non-empty string")
            rows.append((s1, s2, str(value), where))
        return rows
    lines = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):  # "\n" only: the line numbers editors show
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
    cols = None
    first = [c.strip().lower() for c in lines[0].split("\t")] if lines else []
    if any(c in _S1 for c in first) and any(c in _S2 for c in first):
        value_col = next((first.index(v) for v in value_fields if v in first), None)
        if value_col is None:
            raise DataError(f"{path}:1: header has no {value_name} column (one of {', '.join(value_fields)})")
        cols = (next(first.index(c) for c in _S1 if c in first),
                next(first.index(c) for c in _S2 if c in first), value_col)
        lines = lines[1:]
        start = 2
    else:
        start = 1
    for lineno, line in enumerate(lines, start):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{path}:{lineno}"
        if cols is None:
            if len(parts) != 3:
                raise DataError(f"{where}: expected 3 tab-separated columns sentence1, sentence2, "
                                f"{value_name}; got {len(parts)}")
            c1, c2, cv = 0, 1, 2
        else:
            c1, c2, cv = cols
            if len(parts) <= max(cols):
                raise DataError(f"{where}: expected at least {max(cols) + 1} tab-separated columns, "
                                f"got {len(parts)}")
        for label, c in (("sentence1", c1), ("sentence2", c2)):
            if not parts[c].strip():
                raise DataError(f"{where}: field {label!r} is empty")
        rows.append((parts[c1], parts[c2], parts[cv].strip(), where))
    if not rows:
        raise DataError(f"{path}: no pairs")
    return rows


def sts_task(path: str | Path, name: str | None = None, *, max_pairs: int | None = None, seed: int = 0,
             lang: str | None = None):
    """An mteb STS task (main score: Spearman of cosine similarities) from sentence pairs with gold
    scores: STS-Benchmark TSV (header with sentence1/sentence2/score), SICK (sentence_A/sentence_B/
    relatedness_score), bare `s1 TAB s2 TAB score` (Chinese STS-B .data), or JSONL
    {sentence1, sentence2, score}."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskSTS

    path = Path(path)
    rows = _sample(_read_pairs_file(path, _SCORE, "score"), max_pairs, seed)
    scores = []
    for _, _, raw, where in rows:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: field 'score' must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: field 'score' must be finite, got {raw!r}")
        scores.append(value)
    if len(rows) < 2 or min(scores) == max(scores):
        raise DataError(f"{path}: an STS set needs at least two pairs with different scores")
    ds = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                            "score": scores})
    name = name or _slug(path.stem)
    meta = _metadata(name, "STS", "cosine_spearman", path, _files_revision([path], f"{max_pairs}|{seed}"),
                     lang or _guess_lang(r[0] for r in rows), f"Local STS pairs {path} ({len(rows)} pairs)")
    # Spearman/Pearson do not depend on the score range; min/max only normalise the gold scores.
    return _local_task(AbsTaskSTS, meta, ds, min_score=min(scores), max_score=max(scores))


def pair_classification_task(path: str | Path, name: str | None = None, *, max_pairs: int | None = None,
                             seed: int = 0, lang: str | None = None):
    """An mteb pair-classification task (main score: max average precision over similarity functions)
    from labelled pairs: `s1 TAB s2 TAB label` (label 0/1) or JSONL {sentence1, sentence2, label}."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskPairClassification

    path = Path(path)
    rows = _sample(_read_pairs_file(path, ("label", "labels"), "label"), max_pairs, seed)
    labels = []
    for _, _, raw, where in rows:
        if raw not in ("0", "1", "0.0", "1.0"):
            raise DataError(f"{where}: field 'label' must be 0 or 1, got {raw!r}")
        labels.append(int(float(raw)))
    if len(set(labels)) < 2:
        raise DataError(f"{path}: a pair-classification set needs both labels 0 and 1")
    ds = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                            "labels": labels})
    name = name or _slug(path.stem)
    meta = _metadata(name, "PairClassification", "max_ap", path,
                     _files_revision([path], f"{max_pairs}|{seed}"), lang or _guess_lang(r[0] for r in rows),
                     f"Local labelled pairs {path} ({len(rows)} pairs)")
    return _local_task(AbsTaskPairClassification, meta, ds)


STANDARD_BENCHMARKS = ("MTEB(eng, v2)", "MTEB(cmn, v1)", "MTEB(Multilingual, v2)", "MTEB(Code, v1)")


def resolve_tasks(benchmark: str | None = None, tasks: Sequence[Any] | None = None) -> list:
    """mteb tasks of a named benchmark (`MTEB(eng, v2)`, `MTEB(cmn, v1)`, `MTEB(Multilingual)`,
    `MTEB(Code)`) and/or task names (or ready mteb task objects, kept as they are). Metadata only:
    running a hub task needs its data set (the hub)."""
    out = []
    if benchmark:
        try:
            out.extend(mteb.get_benchmark(benchmark).tasks)
        except KeyError as e:
            raise ValueError(f"unknown benchmark {benchmark!r}: {e.args[0] if e.args else e}; "
                             f"e.g. {', '.join(STANDARD_BENCHMARKS)}") from None
    known = {t.metadata.name for t in out}
    for t in tasks or []:
        if not isinstance(t, str):
            out.append(t)
        elif t not in known:
            try:
                out.extend(mteb.get_tasks(tasks=[t]))
            except KeyError as e:
                raise ValueError(f"unknown mteb task {t!r}: {e.args[0] if e.args else e}") from None
    return out


# ----------------------------------------------------------------------------- running mteb

def _summarise(task_result) -> dict[str, float]:
    """{metric: value averaged over the subsets of the first eval split, "main_score": mteb's main
    score}. mteb's nAUC abstention metrics are left out: dozens per task, NaN on small sets."""
    split = next(iter(task_result.scores))
    per_subset = task_result.scores[split]
    out: dict[str, float] = {}
    keys = [k for k, v in per_subset[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("nauc_")]
    for k in keys:
        value = float(np.mean([s[k] for s in per_subset if isinstance(s.get(k), (int, float))]))
        if math.isfinite(value):
            out[k] = value
    out["main_score"] = float(task_result.get_score(splits=[split]))
    return out


@contextlib.contextmanager
def _quiet_datasets():
    """mteb maps its data sets (`datasets` progress bars per task); silence them, then restore."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def run_task(model, task, *, batch_size: int = 32, prediction_folder: str | Path | None = None,
             result_cache: str | Path | None = None) -> dict[str, float]:
    """Evaluate one mteb task with `mteb.evaluate` and flatten its scores."""
    cache = None
    if result_cache is not None:
        from mteb.cache import ResultCache

        cache = ResultCache(str(result_cache))
    with _quiet_datasets():
        res = mteb.evaluate(model, task, cache=cache,
                            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
                            prediction_folder=prediction_folder, show_progress_bar=False, raise_error=True)
    if res.exceptions:
        raise RuntimeError(f"{task.metadata.name}: {res.exceptions[0].exception}")
    return _summarise(res.task_results[0])


def score_run(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
              k_values: Sequence[int] = K_VALUES) -> dict[str, float]:
    """Score a run {qid: {docid: score}} against qrels {qid: {docid: relevance}} with mteb's own
    retrieval metrics (pytrec_eval nDCG/MAP/recall/P plus mteb's MRR), named as mteb names them
    (`ndcg_at_10`, `map_at_10`, `mrr_at_10`, `recall_at_100`, ...). Queries missing from the run
    score 0; queries without a relevant document are left out (as mteb does)."""
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores, make_score_dict

    k_values = sorted(set(k_values) | {1})  # mteb's score dict reports recall@1 as "accuracy"
    qrels = {q: {d: int(s) for d, s in docs.items()} for q, docs in qrels.items() if docs}
    full_run = {q: {d: float(s) for d, s in run.get(q, {}).items()} for q in qrels}
    res = calculate_retrieval_scores(full_run, qrels, k_values)
    scores = make_score_dict(ndcg=res.ndcg, _map=res.map, recall=res.recall, precision=res.precision,
                             mrr=res.mrr, naucs={}, naucs_mrr={}, hit_rate=res.hit_rate, task_scores={})
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


def rerank_run(run: Mapping[str, Mapping[str, float]],
               score_pairs: Callable[[list[str], list[str]], Sequence[float]],
               top_k: int = 100) -> dict[str, dict[str, float]]:
    """The top_k documents of each query of `run`, rescored by `score_pairs(qids, docids)`."""
    pairs = [(q, d) for q, docs in run.items()
             for d, _ in sorted(docs.items(), key=lambda x: (x[1], x[0]), reverse=True)[:top_k]]
    scores = score_pairs([q for q, _ in pairs], [d for _, d in pairs]) if pairs else []
    out: dict[str, dict[str, float]] = {q: {} for q in run}
    for (q, d), s in zip(pairs, scores):
        out[q][d] = float(s)
    return out


def evaluate_reranking(task, encoder, reranker, *, top_k: int = 100, batch_size: int = 32,
                       workdir: str | Path | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(first-stage scores, reranked scores) of a retrieval task, both computed by mteb.

    The paper's protocol: retrieve with the embedding model (mteb writes its ranking to a prediction
    file), turn the task into a reranking task over each query's top_k (`convert_to_reranking`), and
    let mteb evaluate the cross-encoder on it. Recall@top_k cannot change by construction."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        before = run_task(encoder, task, batch_size=batch_size, prediction_folder=tmp)
        task.convert_to_reranking(tmp, top_k=top_k)
        after = run_task(reranker, task, batch_size=batch_size)
    task.unload_data()
    return before, after


# ----------------------------------------------------------------------------- entry point

def build_tasks(*, tasks: Sequence[Any] | None = None, task_dirs: Sequence[str | Path] | None = None,
                sts: Sequence[str | Path] | None = None, pairclf: Sequence[str | Path] | None = None,
                benchmark: str | None = None, max_queries: int | None = None, max_corpus: int | None = None,
                max_pairs: int | None = None, seed: int = 0) -> list:
    out = resolve_tasks(benchmark, tasks)
    out += [beir_task(d, max_queries=max_queries, max_corpus=max_corpus, seed=seed) for d in task_dirs or []]
    out += [sts_task(p, max_pairs=max_pairs, seed=seed) for p in sts or []]
    out += [pair_classification_task(p, max_pairs=max_pairs, seed=seed) for p in pairclf or []]
    names = [t.metadata.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two tasks share the name {dupes[0]!r}; results are keyed by task name")
    return out


def evaluate_model(
    model: str | Path | ModelConfig | Embedder | Any,
    *,
    tasks: Sequence[Any] | None = None,
    task_dirs: Sequence[str | Path] | None = None,
    sts: Sequence[str | Path] | None = None,
    pairclf: Sequence[str | Path] | None = None,
    benchmark: str | None = None,
    reranker: str | Path | ModelConfig | Reranker | Any | None = None,
    dim: int | None = None,
    out: str | Path | None = None,
    mlflow_run_id: str | None = None,
    prompts: Mapping[str, str] | str | Path | None = None,
    batch_size: int | None = None,
    rerank_top_k: int | None = None,
    max_queries: int | None = None,
    max_corpus: int | None = None,
    max_pairs: int | None = None,
    eval_cfg: EvalConfig | None = None,
    embedding_cache: bool | str | Path | EmbeddingCache = True,
    result_cache: str | Path | None = None,
    revision: str | None = None,
    device=None,
    seed: int = 0,
    show: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate an embedding model (and optionally a reranker on its top-k) through mteb.

    model: saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2`, `st:<path>`,
      hub name, ModelConfig, live Embedder, or any mteb encoder.
    tasks / benchmark: mteb task names or task objects (e.g. a `beir_task(...)`) / benchmark name
      (hub tasks need the hub); task_dirs: BEIR folders; sts / pairclf: local pair files.
      With none of these given, they come from `eval_cfg` (an EvalConfig), as do unset sizes.
    reranker: rerank the top `rerank_top_k` of every retrieval task; adds `<task>/rerank` entries.
    revision: identifies the checkpoint for mteb (default: a fingerprint of the model's files);
      an MLflow run id is a good choice. prompts: overrides of conf/task_prompts.json.
    embedding_cache: True = <Q3E_CACHE_DIR>/embeddings, a folder or an EmbeddingCache, False = off.
    result_cache: a folder for mteb's own ResultCache (off by default: our JSON is the record).
    Returns {task: {metric: value, ..., "main_score": value}}; writes `out` (JSON, atomically; default
    runs/eval/<model>-<revision>.json); logs `eval/<task>/<metric>` to `mlflow_run_id` if given.
    """
    cfg = eval_cfg or EvalConfig(task_dirs=[])
    if tasks is None and task_dirs is None and sts is None and pairclf is None and benchmark is None:
        tasks, task_dirs, benchmark = cfg.tasks, cfg.task_dirs, cfg.benchmark
        sts, pairclf = getattr(cfg, "sts", None), getattr(cfg, "pairclf", None)
    batch_size = batch_size or cfg.batch_size
    rerank_top_k = rerank_top_k or cfg.rerank_top_k
    max_queries = max_queries if max_queries is not None else cfg.max_queries
    max_corpus = max_corpus if max_corpus is not None else cfg.max_corpus
    max_pairs = max_pairs if max_pairs is not None else getattr(cfg, "max_pairs", None)

    task_list = build_tasks(tasks=tasks, task_dirs=task_dirs, sts=sts, pairclf=pairclf, benchmark=benchmark,
                            max_queries=max_queries, max_corpus=max_corpus, max_pairs=max_pairs, seed=seed)
    if not task_list:
        raise ValueError("nothing to evaluate: give a benchmark, mteb task names, BEIR task folders, "
                         "STS files or pair-classification files")
    table = TaskPrompts.load(prompts)
    if isinstance(embedding_cache, EmbeddingCache):
        cache = embedding_cache
    elif embedding_cache is True:
        cache = default_embedding_cache()
    else:
        cache = EmbeddingCache(embedding_cache) if embedding_cache else None
    encoder = as_mteb_encoder(model, prompts=table, dim=dim, batch_size=batch_size, cache=cache,
                              device=device, revision=revision)
    rr = as_mteb_reranker(reranker, prompts=table, device=device) if reranker is not None else None

    t0 = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    for task in task_list:
        name, ttype = task.metadata.name, task.metadata.type
        log.info("evaluating %s (%s)", name, ttype)
        types[name] = ttype
        if rr is not None and ttype == "Retrieval":
            results[name], results[f"{name}/rerank"] = evaluate_reranking(
                task, encoder, rr, top_k=rerank_top_k, batch_size=batch_size)
            types[f"{name}/rerank"] = "Reranking"
        else:
            results[name] = run_task(encoder, task, batch_size=batch_size, result_cache=result_cache)

    meta = encoder.mteb_model_meta
    record = {
        "model": meta.name, "revision": meta.revision, "dim": dim,
        # the settings the model was scored with (layers kept, max lengths): an untrained backbone
        # is scored as its preset configures it, like every trained model
        "model_settings": _model_settings(getattr(encoder, "model", None)),
        "reranker": rr.mteb_model_meta.name if rr is not None else None,
        "reranker_revision": rr.mteb_model_meta.revision if rr is not None else None,
        "rerank_top_k": rerank_top_k if rr is not None else None,
        "mteb_version": getattr(mteb, "__version__", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 2),
        "max_queries": max_queries, "max_corpus": max_corpus, "max_pairs": max_pairs,
        "task_types": types,
        "task_descriptions": {t.metadata.name: t.metadata.description for t in task_list},
        # what the encoder prefixed (queries only for retrieval); models without instructions: none
        "instructions": {t.metadata.name: table.for_task(t.metadata) for t in task_list}
        if meta.use_instructions else {},
        "results": results,
    }
    out = Path(out) if out else Path("runs") / "eval" / f"{_slug(meta.name)}-{meta.revision[:12]}.json"
    atomic_write_text(out, json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False))
    log.info("wrote %s", out)
    if show:
        print_results(results, types)
    if mlflow_run_id:
        log_to_mlflow(mlflow_run_id, results, out)
    return results


def print_results(results: Mapping[str, Mapping[str, float]], types: Mapping[str, str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation (mteb)")
    table.add_column("task", no_wrap=True, min_width=max(len(n) for n in results))
    table.add_column("type", overflow="ellipsis", no_wrap=True, max_width=14)
    for col in ("main", "nDCG@10", "MAP@10", "MRR@10", "R@100"):  # RERANK_METRICS
        table.add_column(col, justify="right", no_wrap=True)
    for name, scores in results.items():
        cells = [f"{scores[m]:.4f}" if m in scores else "" for m in RERANK_METRICS]
        table.add_row(name, (types or {}).get(name, ""), f"{scores['main_score']:.4f}", *cells)
    Console().print(table)


def _metric_key(task: str, metric: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", f"eval/{task}/{metric}")


def log_to_mlflow(run_id: str, results: Mapping[str, Mapping[str, float]],
                  result_file: Path | None = None) -> None:
    """Log `eval/<task>/<metric>` (and the result JSON under `eval/`) to an existing MLflow run;
    never creates one. nAUC abstention metrics are skipped."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(_metric_key(task, m), float(v), now, 0) for task, scores in results.items()
               for m, v in scores.items() if not m.startswith("nauc") and math.isfinite(float(v))]
    client = MlflowClient()
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i: i + 500])
    if result_file is not None:
        client.log_artifact(run_id, str(result_file), artifact_path="eval")
