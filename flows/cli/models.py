"""`q3e` commands on models: config (the resolved configuration they read), train, merge, encode,
export and eval."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from flows.cli.common import (ConfigOpt, OverridesArg, PresetOpt, app, base_default, catalog_ready,
                              data_ready, fail, resolve_config, setup_logging)


@app.command("config")
def config_cmd(preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
               ablation: Optional[str] = typer.Option(None, help="conf/ablations/<name>.yaml overlay"),
               overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the fully resolved configuration (base + preset + ablation + files + overrides) as YAML."""
    from tasks.config import dump_yaml

    typer.echo(dump_yaml(resolve_config(preset, overrides, files, ablation)))


@app.command("train")
def train_cmd(
    stage: str = typer.Option("stage2", help="which stage's settings to use: stage1, stage2 or reranker"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (checkpoints/, final/, metrics.jsonl); "
                                                      "rerunning resumes from its newest checkpoint"),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help="training data (pairs JSONL or BEIR folder); "
                                                                       "replaces the stage's configured data"),
    init: Optional[Path] = typer.Option(None, help="start from this saved model instead of the backbone"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Train one stage (embedding: improved InfoNCE; reranker: yes/no SFT) and save checkpoints + final model."""
    from tasks.config import DataSource
    from tasks.data import DataError
    from tasks.training import train

    setup_logging()
    cfg = resolve_config(preset, overrides, files)
    if stage not in ("stage1", "stage2", "reranker"):
        raise fail(ValueError(f"--stage must be stage1, stage2 or reranker, got {stage!r}"))
    if not data:
        catalog_ready(cfg)
        data_ready(cfg)
    tcfg = getattr(cfg, stage)
    if data:
        tcfg = tcfg.model_copy(update={"data": [DataSource(path=d) for d in data]})
    model_cfg = cfg.reranker_backbone if tcfg.objective == "reranker" else cfg.model
    if tcfg.distributed.engine == "ray_train":  # the workers run on infra.ray_address (or a local Ray)
        from tasks.distributed import init_ray

        init_ray(cfg.infra.ray_address, cfg.infra.ray_num_cpus)
    try:
        res = train(tcfg, model_cfg, out, init=init)
    except (DataError, ValueError, FileNotFoundError) as e:
        raise fail(e) from None
    first, last = (res.history[0]["loss"], res.history[-1]["loss"]) if res.history else (float("nan"),) * 2
    typer.echo(f"trained {len(res.history)} steps: loss {first:.4f} -> {last:.4f}; "
               f"{res.seconds_per_step:.2f} s/step (median); peak memory {res.peak_memory_mb:.0f} MiB")
    typer.echo(f"model: {res.final}")


@app.command("merge")
def merge_cmd(
    checkpoints: List[Path] = typer.Argument(..., help="two or more model folders (e.g. stage-2 checkpoints)"),
    out: Path = typer.Option(..., "--out", "-o", help="merged model folder (written atomically)"),
    weights: Optional[List[float]] = typer.Option(None, "--weight", "-w", help="one weight per checkpoint (default equal)"),
    base: Optional[Path] = typer.Option(None, help="task-vector variant: slerp the deltas from this model"),
) -> None:
    """Slerp-merge checkpoints tensor by tensor (paper §3.5); linear fallback for near-parallel tensors."""
    from tasks.merge import slerp_merge

    try:
        path = slerp_merge(checkpoints, out, weights=weights or None, base=base)
    except (ValueError, FileNotFoundError) as e:
        raise fail(e) from None
    typer.echo(f"merged {len(checkpoints)} checkpoints -> {path}")


@app.command("encode")
def encode_cmd(
    model: str = typer.Argument(..., help="saved model folder, backbone spec (micro, bundled:smollm2) or hub name"),
    texts: List[str] = typer.Argument(..., help="texts to embed"),
    instruction: Optional[str] = typer.Option(None, help="task instruction: formats texts as queries"),
    dim: Optional[int] = typer.Option(None, help="MRL dimension"),
) -> None:
    """Embed texts and print the cosine similarity matrix (a quick look at a model)."""
    import numpy as np

    from tasks.models import Embedder

    emb = Embedder.load(model).encode(texts, instruction=instruction, dim=dim)
    sims = emb @ emb.T
    typer.echo(f"embeddings: {emb.shape[0]} x {emb.shape[1]}")
    for t, row in zip(texts, sims):
        typer.echo(f"{t[:40]:40s} " + " ".join(f"{x:6.3f}" for x in np.asarray(row)))


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="a saved embedding or reranker model folder"),
    out: Path = typer.Option(..., "--out", "-o", help="export folder"),
) -> None:
    """Re-export a model: embedding -> SentenceTransformer folder; reranker -> causal LM + cross-encoder/."""
    from tasks.models import load_any

    m = load_any(model, device="cpu")
    m.save(out)
    typer.echo(f"exported {type(m).__name__.lower()} -> {out}")


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="embedding model: a saved model folder, micro, bundled:smollm2, "
                                          "bundled:all-minilm-l6-v2, st:<SentenceTransformer path> or a hub name"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="evaluate as `q3e run --preset NAME` "
                                         "does: that preset's eval sets, symmetric sets, dims, rerank settings, "
                                         "max lengths and batch size (a task flag below replaces its sets; a flag "
                                         "given wins)"),
    files: Optional[List[Path]] = typer.Option(None, "--config", "-c", help="extra YAML overlay files for "
                                               "--preset, applied in order"),
    benchmark: Optional[List[str]] = typer.Option(None, "--benchmark", "-b",
                                                  help="mteb benchmark (repeatable), e.g. 'MTEB(eng, v2)', "
                                                       "'MTEB(cmn, v1)', 'MTEB(Multilingual)', 'MTEB(Code, v1)'; "
                                                       "each gets its Mean(Task) and Mean(Type) (needs the hub "
                                                       "for data)"),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="mteb task name, e.g. NFCorpus (repeatable)"),
    task_dir: Optional[List[Path]] = typer.Option(None, "--task-dir", help="local BEIR folder: corpus.jsonl, "
                                                  "queries.jsonl, qrels/test.tsv (repeatable)"),
    sts: Optional[List[Path]] = typer.Option(None, "--sts", help="STS pairs with gold scores: STS-B TSV, SICK txt, "
                                             "'s1<TAB>s2<TAB>score' or JSONL {sentence1, sentence2, score}"),
    pairclf: Optional[List[Path]] = typer.Option(None, "--pairclf", help="labelled pairs 's1<TAB>s2<TAB>0|1' or "
                                                 "JSONL {sentence1, sentence2, label} (repeatable)"),
    symmetric: Optional[List[str]] = typer.Option(None, "--symmetric", help="a local retrieval set that is a "
                                                  "symmetric task (STS laid out as retrieval, e.g. stsb-en-dev): "
                                                  "its documents get the query's instruction too (repeatable)"),
    reranker: Optional[str] = typer.Option(None, "--reranker", help="rerank the embedding model's top-k of every "
                                           "retrieval task with this reranker (saved folder, micro, ...)"),
    rerank_top_k: int = typer.Option(base_default("eval.rerank_top_k"), "--rerank-top-k",
                                     help="documents per query given to the reranker"),
    rerank_type: Optional[List[str]] = typer.Option(None, "--rerank-type", help="an mteb task type the reranker "
                                                    "reranks (repeatable): Retrieval, Reranking, "
                                                    "InstructionRetrieval, InstructionReranking (default "
                                                    "eval.rerank_types)"),
    first_stage: Optional[Path] = typer.Option(None, "--first-stage", help="a first-stage file {task: {qid: "
                                               "{docid: score}}}, e.g. one --save-first-stage wrote: the "
                                               "reranker reranks its top-k instead of the embedding model's"),
    save_first_stage: bool = typer.Option(base_default("eval.save_first_stage"),
                                          "--save-first-stage/--no-save-first-stage",
                                          help="write the embedding model's top --rerank-top-k per query of "
                                               "every reranked task beside the results (<out "
                                               "stem>.first_stage.json), to give as --first-stage later"),
    dim: Optional[int] = typer.Option(None, "--dim", help="MRL dimension: evaluate emb[:, :dim], re-normalised, "
                                      "only (default: the full dimension, then each of the preset's eval.dims "
                                      "as <task>@<dim>)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="result JSON (default runs/eval/<model>-<rev>.json); "
                                       "each of the preset's eval.dims writes <out stem>@<dim>.json beside it"),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", help="subsample BEIR queries (fixed seed)"),
    max_corpus: Optional[int] = typer.Option(None, "--max-corpus", help="subsample BEIR documents; documents "
                                             "judged for the kept queries are always kept"),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="subsample STS / pair-classification pairs"),
    max_query_length: Optional[int] = typer.Option(None, "--max-query-length", help="tokens kept of each query "
                                                   "(default: the model's own max_query_length)"),
    max_doc_length: Optional[int] = typer.Option(None, "--max-doc-length", help="tokens kept of each document "
                                                 "(default: the model's own max_doc_length)"),
    max_rerank_length: Optional[int] = typer.Option(None, "--max-rerank-length", help="tokens of each reranker "
                                                    "input (default: the reranker's own max_rerank_length)"),
    batch_size: int = typer.Option(base_default("eval.batch_size"), "--batch-size", help="texts per forward pass"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSON {task name: instruction} overriding "
                                           "conf/task_prompts.json"),
    mlflow_run_id: Optional[str] = typer.Option(None, "--mlflow-run-id", help="log eval/<task>/<metric> to this "
                                                "existing MLflow run"),
) -> None:
    """Evaluate an embedding model (and optionally a reranker on its top-k) with mteb; print each task's main score,
    and each benchmark's Mean(Task) and Mean(Type).

    Main scores: nDCG@10 (retrieval), Spearman of cosine (STS), max AP (pair classification).
    Examples: q3e eval micro --task-dir data/beir/nq-msmarco-hardneg --max-queries 5 --max-corpus 50;
    q3e eval runs/artifacts/merge/<key>/model --preset smol --reranker runs/artifacts/reranker-merge/<key>/model
    (the default run's evaluation of that model, reranking included)
    """
    from tasks.data import DataError
    from tasks.config import EvalConfig
    from tasks.evaluation.run import evaluation_record
    from tasks.models import ModelLoadError

    setup_logging()
    logging.getLogger("mteb").setLevel(logging.WARNING)  # one INFO line per phase per task otherwise
    named = bool(benchmark or task or task_dir or sts or pairclf)
    if not (named or preset):
        raise fail(ValueError("nothing to evaluate: give --preset, --benchmark, --task, --task-dir, --sts or "
                               "--pairclf"))

    def given(name: str) -> bool:
        # by name: typer's Context reports the ParameterSource of the click it vendors, not of `click`
        source = ctx.get_parameter_source(name)
        return source is not None and source.name != "DEFAULT"

    # eval.<key> <- the flag that sets it, where their names differ
    flag_of = {"rerank_types": "rerank_type"}
    try:
        # the flags name every task set (none of conf's eval sets is added); the rest is conf/base.yaml's,
        # or with --preset that preset's eval section
        fields = dict(benchmark=list(benchmark or []) or None, tasks=task or [],
                      task_dirs=[str(p) for p in task_dir or []], sts=[str(p) for p in sts or []],
                      pairclf=[str(p) for p in pairclf or []], rerank_top_k=rerank_top_k,
                      rerank_types=list(rerank_type or []) or base_default("eval.rerank_types"),
                      first_stage=str(first_stage) if first_stage else None, save_first_stage=save_first_stage,
                      batch_size=batch_size, max_queries=max_queries, max_corpus=max_corpus, max_pairs=max_pairs,
                      max_query_length=max_query_length, max_doc_length=max_doc_length,
                      max_rerank_length=max_rerank_length, symmetric=list(symmetric or []),
                      dims=base_default("eval.dims"))
        if preset:
            pcfg = resolve_config(preset, None, files)
            base = pcfg.eval.model_dump()
            if not named:
                data_ready(pcfg)
            keep = {"benchmark", "tasks", "task_dirs", "sts", "pairclf", "symmetric"} if not named else set()
            keep |= {"dims"} | {k for k in ("rerank_top_k", "rerank_types", "first_stage", "save_first_stage",
                                            "batch_size", "max_queries", "max_corpus", "max_pairs",
                                            "max_query_length", "max_doc_length", "max_rerank_length")
                                if not given(flag_of.get(k, k))}
            if symmetric:
                keep.discard("symmetric")
            fields = {k: (base[k] if k in keep else v) for k, v in fields.items()}
            if named and not symmetric:  # the preset's symmetric sets, where the named sets include them
                fields["symmetric"] = [n for n in base["symmetric"]
                                       if any(Path(d).name == n for d in fields["task_dirs"])]
        cfg = EvalConfig(**fields)
        # --dim: that dimension only; else the full one, then each of eval.dims as <task>@<dim> (as q3e run)
        dims = [(dim, "")] if dim is not None else [(None, ""), *((d, f"@{d}") for d in cfg.dims)]
        results: dict = {}
        benchmarks: dict = {}
        for d, at in dims:
            record = evaluation_record(model, cfg, reranker=reranker, dim=d, prompts=prompts, show=False,
                                       out=out.with_name(f"{out.stem}{at}{out.suffix}") if out and at else out,
                                       mlflow_run_id=None if at else mlflow_run_id)
            scores = {f"{name}{at}": m for name, m in record["results"].items()}
            summaries = {f"{name}{at}": s for name, s in record.get("benchmarks", {}).items()}
            results.update(scores)
            benchmarks.update(summaries)
            if at and mlflow_run_id:  # the extra dims' metrics beside the full dimension's, not over them
                from tasks.tracking import log_eval_results

                log_eval_results(mlflow_run_id, scores, Path(record["file"]), benchmarks=summaries)
    except (DataError, ModelLoadError, ValueError, FileNotFoundError) as e:  # ValueError: also a bad flag
        raise fail(e) from None
    width = max(len(name) for name in results)
    for name, scores in results.items():
        typer.echo(f"{name:{width}s}  main score {scores['main_score']:.4f}")
    for name, s in benchmarks.items():
        typer.echo(_benchmark_line(name, s))


def _benchmark_line(name: str, summary: dict) -> str:
    """One benchmark's means on one line: Mean(Task), Mean(Type), missing tasks, reranked mean."""
    def f(x) -> str:
        return "–" if x is None else f"{x:.4f}"

    line = f"{name}  Mean(Task) {f(summary['mean_task'])}  Mean(Type) {f(summary['mean_type'])}"
    if summary["n_missing"]:
        line += f"  ({summary['n_missing']} of {summary['n_tasks']} tasks missing)"
    rr = summary.get("rerank")
    if rr:
        line += f"  reranked {f(rr['mean_embedder'])} -> {f(rr['mean_reranked'])} ({rr['n_tasks']} tasks)"
    return line
