"""Running mteb: which tasks to evaluate, one task through `mteb.evaluate`, reranking of the first
stage's top-k, and the entry point `evaluate_model` (results dict + one JSON per run + table)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import mteb
import numpy as np

from tasks.config import EvalConfig, ModelConfig
from tasks.data import atomic_write_text
from tasks.evaluation.cache import EmbeddingCache, default_embedding_cache
from tasks.evaluation.encoders import as_mteb_encoder, as_mteb_reranker, model_settings
from tasks.evaluation.fingerprints import slug
from tasks.evaluation.local_tasks import beir_task, pair_classification_task, sts_task
from tasks.evaluation.prompts import TaskPrompts
from tasks.models import Embedder, Reranker

log = logging.getLogger(__name__)

# What `evaluate_model` reports before/after reranking (the paper's Table 4 uses nDCG@10).
RERANK_METRICS = ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100")
K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # mteb's AbsTaskRetrieval.k_values
STANDARD_BENCHMARKS = ("MTEB(eng, v2)", "MTEB(cmn, v1)", "MTEB(Multilingual, v2)", "MTEB(Code, v1)")


# ----------------------------------------------------------------------------- hub tasks

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

def build_tasks(cfg: EvalConfig, extra_tasks: Sequence[Any] | None = None, *, seed: int = 0) -> list:
    """The mteb tasks `cfg` names (benchmark, task names, BEIR folders, STS and pair files, the local
    ones subsampled by its max_* sizes), then `extra_tasks` (ready mteb task objects)."""
    out = resolve_tasks(cfg.benchmark, cfg.tasks)
    out += [beir_task(d, max_queries=cfg.max_queries, max_corpus=cfg.max_corpus, seed=seed)
            for d in cfg.task_dirs]
    out += [sts_task(p, max_pairs=cfg.max_pairs, seed=seed) for p in cfg.sts]
    out += [pair_classification_task(p, max_pairs=cfg.max_pairs, seed=seed) for p in cfg.pairclf]
    out += list(extra_tasks or [])
    names = [t.metadata.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two tasks share the name {dupes[0]!r}; results are keyed by task name")
    unknown = sorted(set(cfg.symmetric) - set(names))
    if unknown:
        raise ValueError(f"eval.symmetric names no task of this evaluation: {', '.join(unknown)} "
                         f"(tasks: {', '.join(names)})")
    return out


def evaluate_model(
    model: str | Path | ModelConfig | Embedder | Any,
    cfg: EvalConfig,
    *,
    reranker: str | Path | ModelConfig | Reranker | Any | None = None,
    dim: int | None = None,
    out: str | Path | None = None,
    extra_tasks: Sequence[Any] | None = None,
    prompts: Mapping[str, str] | str | Path | None = None,
    embedding_cache: bool | str | Path | EmbeddingCache = True,
    result_cache: str | Path | None = None,
    revision: str | None = None,
    mlflow_run_id: str | None = None,
    device=None,
    seed: int = 0,
    show: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate an embedding model (and optionally a reranker on its top-k) through mteb.

    model: saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2`, `st:<path>`,
      hub name, ModelConfig, live Embedder, or any mteb encoder.
    cfg: what to evaluate on and how (tasks, benchmark, task_dirs, sts, pairclf, max_* sizes,
      batch_size, rerank_top_k); local paths are taken as they are. `cfg.dims` is the pipeline's
      list: one call scores one dimension, `dim`.
    reranker: rerank the top `cfg.rerank_top_k` of every retrieval task; adds `<task>/rerank` entries.
    dim: MRL dimension (emb[:, :dim], re-normalised); None = the model's full size.
    extra_tasks: ready mteb task objects (e.g. a `beir_task(...)` with its own name), after cfg's.
    revision: identifies the checkpoint for mteb (default: a fingerprint of the model's files);
      an MLflow run id is a good choice. prompts: overrides of conf/task_prompts.json.
    embedding_cache: True = <Q3E_CACHE_DIR>/embeddings, a folder or an EmbeddingCache, False = off.
    result_cache: a folder for mteb's own ResultCache (off by default: our JSON is the record).
    Returns {task: {metric: value, ..., "main_score": value}}; writes `out` (JSON, atomically; default
    runs/eval/<model>-<revision>.json); logs `eval/<task>/<metric>` to `mlflow_run_id` if given.
    """
    task_list = build_tasks(cfg, extra_tasks, seed=seed)
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
    encoder = as_mteb_encoder(model, prompts=table, dim=dim, batch_size=cfg.batch_size, cache=cache,
                              device=device, revision=revision, symmetric=cfg.symmetric)
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
                task, encoder, rr, top_k=cfg.rerank_top_k, batch_size=cfg.batch_size)
            types[f"{name}/rerank"] = "Reranking"
        else:
            results[name] = run_task(encoder, task, batch_size=cfg.batch_size, result_cache=result_cache)

    meta = encoder.mteb_model_meta
    record = {
        "model": meta.name, "revision": meta.revision, "dim": dim,
        # the settings the model was scored with (layers kept, max lengths): an untrained backbone
        # is scored as its preset configures it, like every trained model
        "model_settings": model_settings(getattr(encoder, "model", None)),
        "reranker": rr.mteb_model_meta.name if rr is not None else None,
        "reranker_revision": rr.mteb_model_meta.revision if rr is not None else None,
        "rerank_top_k": cfg.rerank_top_k if rr is not None else None,
        "mteb_version": getattr(mteb, "__version__", None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 2),
        "max_queries": cfg.max_queries, "max_corpus": cfg.max_corpus, "max_pairs": cfg.max_pairs,
        "task_types": types,
        "task_descriptions": {t.metadata.name: t.metadata.description for t in task_list},
        # what the encoder prefixed (queries only for retrieval); models without instructions: none
        "instructions": {t.metadata.name: table.for_task(t.metadata) for t in task_list}
        if meta.use_instructions else {},
        "results": results,
    }
    out = Path(out) if out else Path("runs") / "eval" / f"{slug(meta.name)}-{meta.revision[:12]}.json"
    atomic_write_text(out, json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False))
    log.info("wrote %s", out)
    if show:
        print_results(results, types)
    if mlflow_run_id:
        from tasks.tracking import log_eval_results  # MLflow stays at the edge: imported only when asked

        log_eval_results(mlflow_run_id, results, out)
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
