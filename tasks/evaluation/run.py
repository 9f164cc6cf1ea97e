"""Running mteb: which tasks to evaluate, one task through `mteb.evaluate`, reranking of a first
stage's top-k (the embedder's own, or a fixed one from a file), and the entry points `evaluate_model`
(results dict + one JSON per run + table) and `evaluation_record` (the whole JSON record)."""

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
from tasks.data import DataError, atomic_write_text
from tasks.evaluation.benchmarks import benchmark_summary, resolve_benchmarks, scoped_score
from tasks.evaluation.cache import EmbeddingCache, default_embedding_cache
from tasks.evaluation.encoders import as_mteb_encoder, as_mteb_reranker, model_settings
from tasks.evaluation.fingerprints import slug
from tasks.evaluation.first_stage import (
    Cells, FirstStage, first_stage_path, read_predictions, rerank_from, truncate_run, write_first_stage,
)
from tasks.evaluation.local_tasks import beir_task, pair_classification_task, sts_task
from tasks.evaluation.prompts import TaskPrompts
from tasks.models import Embedder, Reranker

log = logging.getLogger(__name__)

# What `evaluate_model` reports before/after reranking (the paper's Table 4 uses nDCG@10).
RERANK_METRICS = ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100")
K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # mteb's AbsTaskRetrieval.k_values


# ----------------------------------------------------------------------------- hub tasks

def resolve_tasks(benchmark: str | Sequence[str] | None = None, tasks: Sequence[Any] | None = None) -> list:
    """mteb tasks of one or several named benchmarks (`MTEB(eng, v2)`, `MTEB(cmn, v1)`,
    `MTEB(Multilingual)`, `MTEB(Code, v1)`; a task they share runs once) and/or task names (or ready
    mteb task objects, kept as they are). Metadata only: running a hub task needs its data set (the hub)."""
    names = [benchmark] if isinstance(benchmark, str) else list(benchmark or [])
    out = list(resolve_benchmarks(names).tasks)
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


def evaluate_task(model, task, *, batch_size: int = 32, prediction_folder: str | Path | None = None,
                  result_cache: str | Path | None = None):
    """Evaluate one mteb task with `mteb.evaluate`; its mteb TaskResult."""
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
    return res.task_results[0]


def run_task(model, task, *, batch_size: int = 32, prediction_folder: str | Path | None = None,
             result_cache: str | Path | None = None) -> dict[str, float]:
    """Evaluate one mteb task with `mteb.evaluate` and flatten its scores."""
    return _summarise(evaluate_task(model, task, batch_size=batch_size, prediction_folder=prediction_folder,
                                    result_cache=result_cache))


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


def retrieve_and_rerank(task, encoder, reranker=None, *, top_k: int = 100, batch_size: int = 32,
                        first_stage: FirstStage | None = None, keep_top_k: bool = False,
                        workdir: str | Path | None = None):
    """(the embedder's TaskResult, the reranker's TaskResult or None, the embedder's top_k per query
    as {subset: {split: run}} if keep_top_k else None) of an mteb retrieval task.

    The paper's protocol: retrieve with the embedding model (mteb writes its ranking to a prediction
    file), turn the task into a reranking task over each query's top_k of the first stage, and let
    mteb evaluate the cross-encoder on it. The first stage is the embedder's ranking, or the task's
    run in `first_stage` (one fixed first stage for every reranker, paper Table 4). Either way the
    top_k is taken by `first_stage.truncate_run`, so a saved first stage reranks exactly as the run it
    was saved from. Recall@top_k cannot change by construction."""
    own = keep_top_k or (reranker is not None and first_stage is None)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        first = evaluate_task(encoder, task, batch_size=batch_size, prediction_folder=tmp if own else None)
        ranked = read_predictions(Path(tmp) / task.prediction_file_name) if own else None
    kept = {subset: {split: truncate_run(run, top_k) for split, run in splits.items()}
            for subset, splits in ranked.items()} if keep_top_k and ranked is not None else None
    if reranker is None:
        return first, None, kept
    # mteb's task objects are shared (its benchmarks cache them): leave them as they were
    saved_top_k = task._top_k
    try:
        if not task.data_loaded:
            task.load_data()
        task.convert_v1_dataset_format_to_v2(num_proc=None)  # old-layout tasks: top_ranked lives in task.dataset
        if first_stage is not None:
            cells: Cells = first_stage.cells(task)
            source = {"model_name": first_stage.meta.get("model"), "revision": first_stage.meta.get("revision"),
                      "first_stage": str(first_stage.path)}
        else:
            cells = ranked
            source = {"model_name": encoder.mteb_model_meta.name, "revision": encoder.mteb_model_meta.revision}
        rerank_from(task, cells, top_k, source)
        reranked = evaluate_task(reranker, task, batch_size=batch_size)
    finally:
        task._top_k, task._previous_results_model_meta = saved_top_k, None
        if task.data_loaded:
            task.unload_data()
    return first, reranked, kept


def evaluate_reranking(task, encoder, reranker, *, top_k: int = 100, batch_size: int = 32,
                       first_stage: FirstStage | None = None,
                       workdir: str | Path | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(embedder scores, reranked scores) of a retrieval task, both computed by mteb; the reranker
    reranks the top_k of `first_stage` if given, else the embedder's (see `retrieve_and_rerank`)."""
    first, reranked, _ = retrieve_and_rerank(task, encoder, reranker, top_k=top_k, batch_size=batch_size,
                                             first_stage=first_stage, workdir=workdir)
    return _summarise(first), _summarise(reranked)


# ----------------------------------------------------------------------------- entry point

def build_tasks(cfg: EvalConfig, extra_tasks: Sequence[Any] | None = None, *, seed: int = 0) -> list:
    """The mteb tasks `cfg` names (benchmarks, task names, BEIR folders, STS and pair files, the local
    ones subsampled by its max_* sizes), then `extra_tasks` (ready mteb task objects)."""
    out = resolve_tasks(cfg.benchmarks, cfg.tasks)
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


def reranks(task, cfg: EvalConfig) -> bool:
    """Whether the reranker reranks this task: a retrieval-like type of `eval.rerank_types` (in mteb
    2 every one of them, FollowIR's InstructionReranking included, is an AbsTaskRetrieval)."""
    from mteb.abstasks import AbsTaskRetrieval

    return task.metadata.type in cfg.rerank_types and isinstance(task, AbsTaskRetrieval)


def evaluation_record(
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
) -> dict[str, Any]:
    """Evaluate an embedding model (and optionally a reranker on a first stage's top-k) through mteb.

    model: saved model folder, `micro`, `bundled:smollm2`, `bundled:all-minilm-l6-v2`, `st:<path>`,
      hub name, ModelConfig, live Embedder, or any mteb encoder.
    cfg: what to evaluate on and how (tasks, benchmarks, task_dirs, sts, pairclf, max_* sizes, max
      lengths, batch_size, rerank_top_k, rerank_types, first_stage); local paths are taken as they
      are. `cfg.dims` is the pipeline's list: one call scores one dimension, `dim`.
    reranker: rerank the top `cfg.rerank_top_k` of every task of `cfg.rerank_types`: the embedder's,
      or those of `cfg.first_stage`; adds `<task>/rerank` entries.
    dim: MRL dimension (emb[:, :dim], re-normalised); None = the model's full size.
    extra_tasks: ready mteb task objects (e.g. a `beir_task(...)` with its own name), after cfg's.
    revision: identifies the checkpoint for mteb (default: a fingerprint of the model's files);
      an MLflow run id is a good choice. prompts: overrides of conf/task_prompts.json.
    embedding_cache: True = <Q3E_CACHE_DIR>/embeddings, a folder or an EmbeddingCache, False = off.
    result_cache: a folder for mteb's own ResultCache (off by default: our JSON is the record).
    Returns the record it writes to `out` (JSON, atomically; default runs/eval/<model>-<revision>.json,
    <model>-<revision>@<dim>.json at a dim), with that path as "file": "results" {task: {metric: value,
    ..., "main_score": value}} (what `evaluate_model` returns), per benchmark Mean(Task) and Mean(Type) under
    "benchmarks"; with `cfg.save_first_stage`, each query's top rerank_top_k beside it
    (`<out stem>.first_stage.json`); logs `eval/<task>/<metric>` and `eval/<benchmark>/mean_task`
    to `mlflow_run_id` if given.
    """
    task_list = build_tasks(cfg, extra_tasks, seed=seed)
    if not task_list:
        raise ValueError("nothing to evaluate: give a benchmark, mteb task names, BEIR task folders, "
                         "STS files or pair-classification files")
    plan = resolve_benchmarks(cfg.benchmarks)
    table = TaskPrompts.load(prompts)
    if isinstance(embedding_cache, EmbeddingCache):
        cache = embedding_cache
    elif embedding_cache is True:
        cache = default_embedding_cache()
    else:
        cache = EmbeddingCache(embedding_cache) if embedding_cache else None
    encoder = as_mteb_encoder(model, prompts=table, dim=dim, batch_size=cfg.batch_size, cache=cache,
                              device=device, revision=revision, symmetric=cfg.symmetric,
                              max_query_length=cfg.max_query_length, max_doc_length=cfg.max_doc_length,
                              autocast=cfg.autocast)
    rr = as_mteb_reranker(reranker, prompts=table, device=device, max_length=cfg.max_rerank_length,
                          autocast=cfg.autocast, both_orders=cfg.symmetric if cfg.rerank_symmetric else ()
                          ) if reranker is not None else None
    first_stage = None
    if cfg.first_stage and rr is None:
        log.warning("eval.first_stage %s is not used: there is no reranker", cfg.first_stage)
    elif cfg.first_stage:
        first_stage = FirstStage.load(cfg.first_stage)
        lacking = [t.metadata.name for t in task_list if reranks(t, cfg) and t.metadata.name not in first_stage.tasks]
        if lacking:  # refused before hours of evaluation, not at the task
            raise DataError(f"{first_stage.path}: no first stage for task(s) {', '.join(lacking)} "
                            f"(the file has: {', '.join(sorted(first_stage.tasks)) or 'no task'})")
    meta = encoder.mteb_model_meta
    at = f"@{dim}" if dim is not None else ""  # a dim's results beside the full dimension's, not over them
    out = Path(out) if out else Path("runs") / "eval" / f"{slug(meta.name)}-{meta.revision[:12]}{at}.json"

    t0 = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    task_results: dict[str, Any] = {}   # mteb TaskResults: a benchmark scores its own subsets/splits
    kept: dict[str, Cells] = {}         # each query's top-k (eval.save_first_stage)
    for task in task_list:
        name, ttype = task.metadata.name, task.metadata.type
        log.info("evaluating %s (%s)", name, ttype)
        types[name] = ttype
        if reranks(task, cfg) and (rr is not None or cfg.save_first_stage):
            first, reranked, top = retrieve_and_rerank(task, encoder, rr, top_k=cfg.rerank_top_k,
                                                       batch_size=cfg.batch_size, first_stage=first_stage,
                                                       keep_top_k=cfg.save_first_stage)
            task_results[name], results[name] = first, _summarise(first)
            if reranked is not None:
                task_results[f"{name}/rerank"], results[f"{name}/rerank"] = reranked, _summarise(reranked)
                types[f"{name}/rerank"] = "Reranking"
            if top is not None:
                kept[name] = top
        else:
            task_results[name] = evaluate_task(encoder, task, batch_size=cfg.batch_size, result_cache=result_cache)
            results[name] = _summarise(task_results[name])

    benchmarks = {}
    for bench, scopes in plan.scopes.items():
        scores = {t: scoped_score(task_results[t], scope) for t, scope in scopes.items() if t in task_results}
        reranked = {t: scoped_score(task_results[f"{t}/rerank"], scope) for t, scope in scopes.items()
                    if f"{t}/rerank" in task_results}
        benchmarks[bench] = benchmark_summary(list(scopes), scores, plan.types, reranked or None)
    saved = None
    if kept:
        saved = write_first_stage(first_stage_path(out), kept, model=meta.name, revision=meta.revision, dim=dim,
                                  k=cfg.rerank_top_k)
        log.info("wrote the first stage (top %d per query) to %s", cfg.rerank_top_k, saved)

    record = {
        "model": meta.name, "revision": meta.revision, "dim": dim,
        # the settings the model was scored with (layers kept, max lengths): an untrained backbone
        # is scored as its preset configures it, like every trained model
        "model_settings": model_settings(getattr(encoder, "model", None), max_query_length=cfg.max_query_length,
                                         max_doc_length=cfg.max_doc_length),
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
    # keys only where used: a default evaluation writes the record it always has
    if rr is not None and cfg.max_rerank_length is not None:
        record["reranker_max_length"] = cfg.max_rerank_length
    if first_stage is not None:
        record["first_stage"] = {"file": str(first_stage.path), **first_stage.meta}
    if saved is not None:
        record["first_stage_file"] = str(saved)
    if benchmarks:
        record["benchmarks"] = benchmarks
    atomic_write_text(out, json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False))
    log.info("wrote %s", out)
    if show:
        print_results(results, types, benchmarks)
    if mlflow_run_id:
        from tasks.tracking import log_eval_results  # MLflow stays at the edge: imported only when asked

        log_eval_results(mlflow_run_id, results, out, benchmarks=benchmarks)
    return {**record, "file": str(out)}


def evaluate_model(model: str | Path | ModelConfig | Embedder | Any, cfg: EvalConfig,
                   **options: Any) -> dict[str, dict[str, float]]:
    """{task: {metric: value, ..., "main_score": value}}: the results of `evaluation_record(model, cfg,
    **options)` (same arguments, same file written)."""
    return evaluation_record(model, cfg, **options)["results"]


def print_results(results: Mapping[str, Mapping[str, float]], types: Mapping[str, str] | None = None,
                  benchmarks: Mapping[str, Mapping[str, Any]] | None = None) -> None:
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
    if benchmarks:
        Console().print(benchmarks_table(benchmarks))


def benchmarks_table(benchmarks: Mapping[str, Mapping[str, Any]]):
    """A rich table: per benchmark Mean(Task), Mean(Type), tasks scored, and after reranking."""
    from rich.table import Table

    def f(x) -> str:
        return "–" if x is None else f"{x:.4f}"

    table = Table(title="benchmarks (mteb)")
    for col in ("benchmark", "Mean(Task)", "Mean(Type)", "tasks", "missing", "reranked"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("benchmark", "missing") else "right")
    for bench, s in benchmarks.items():
        missing = ", ".join(s["missing"][:3]) + (f" +{len(s['missing']) - 3}" if len(s["missing"]) > 3 else "")
        rr = s.get("rerank")
        after = f"{f(rr['mean_embedder'])} -> {f(rr['mean_reranked'])} ({rr['n_tasks']})" if rr else ""
        table.add_row(bench, f(s["mean_task"]), f(s["mean_type"]), f"{s['n_tasks'] - s['n_missing']}/{s['n_tasks']}",
                      missing, after)
    return table
