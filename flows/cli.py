"""`q3e`: the command line of the pipeline. Every command has --help.

Configuration options shared by most commands:
  --preset NAME        conf/presets/NAME.yaml (micro, smol, qwen3-0.6b, qwen3-4b, qwen3-8b)
  --config FILE        extra YAML overlays (repeatable)
  KEY.SUB=VALUE ...    overrides, e.g. stage2.steps=10 stage2.loss.temperature=0.02
  --debug              (anywhere on the line, or Q3E_DEBUG=1) print the traceback of a failure;
                       without it a failure is one `error:` line and its traceback goes to a file

Commands that start services (run, ablate, rerun, retrain, schedule, synth, filter, train, eval)
start a watchdog first (tasks/reaper.py): the Prefect server and Ray processes they start are
stopped when the command ends, however it ends (a SIGKILL included).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="Train and evaluate Qwen3-Embedding-style embedding and reranker models "
         "(arXiv 2506.05176): synthesis, filtering, contrastive pre-training, SFT, slerp merging, MTEB.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

@functools.cache
def _base_yaml() -> dict:
    from tasks.config import base_defaults

    return base_defaults()


def _default(key: str):
    """A setting's default from conf/base.yaml, the one place defaults live (`eval.batch_size`)."""
    value = _base_yaml()
    for part in key.split("."):
        value = value[part]
    return value


PresetOpt = typer.Option(_default("preset"), "--preset", "-p", help="conf/presets/<name>.yaml: micro, smol, qwen3-0.6b, ...")
ConfigOpt = typer.Option(None, "--config", "-c", help="extra YAML overlay files, applied in order")
OverridesArg = typer.Argument(None, help="overrides key.sub=value, e.g. stage2.steps=10")


DEBUG_ENV = "Q3E_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _NoFailureEcho(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback (and then its state, with the
    exception's text again); `main` reports the failure as one line, so without --debug those
    records are dropped. Everything else Prefect logs passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:  # "Encountered exception during execution" with its traceback
            return False
        return not str(record.msg).startswith("Finished in state Failed")


def _setup_logging(verbose: bool = False) -> None:
    """Log to stderr; start the watchdog that stops this command's services when it ends."""
    from tasks import reaper

    logging.basicConfig(level=logging.DEBUG if verbose or debugging() else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debugging():
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _NoFailureEcho) for f in logger.filters):
                logger.addFilter(_NoFailureEcho())
    reaper.start()


def _config(preset: str, overrides: Optional[List[str]], files: Optional[List[Path]] = None, ablation: str | None = None):
    from tasks.config import ConfigError, load_config

    try:
        cfg = load_config(preset, overrides or [], files=files or [], ablation=ablation)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    # Prefect reads its API URL from the environment: a configured server wins over ephemeral mode.
    if cfg.infra.prefect_api_url and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = cfg.infra.prefect_api_url
    return cfg


def _data_ready(cfg) -> None:
    """On a fresh clone `data/` is not there yet: restore it the way `q3e run` does (dvc pull, else the
    bundled source, then the derived sets), so a preset's data paths resolve."""
    if (Path.cwd() / cfg.data.dir).exists():
        return
    from tasks.lineage import LineageError, ensure_config_data

    try:
        version = ensure_config_data(Path.cwd(), cfg)
    except LineageError as e:
        raise _fail(e) from None
    typer.echo(f"data: restored {cfg.data.dir}/ (version {version[:10]})", err=True)


def _catalog_ready(cfg) -> None:
    """The catalog entries the stages name exist in a valid conf/catalog.yaml: a bad one is one error
    line before any service starts, not a failure at stage 2."""
    from tasks.data import DataError
    from tasks.data.catalog import check_entries

    try:
        check_entries([s.catalog for st in (cfg.stage1, cfg.stage2, cfg.reranker) for s in st.data if s.catalog])
    except DataError as e:
        raise _fail(e) from None


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg="red", err=True)
    return typer.Exit(1)


@app.command("config")
def config_cmd(preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
               ablation: Optional[str] = typer.Option(None, help="conf/ablations/<name>.yaml overlay"),
               overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the fully resolved configuration (base + preset + ablation + files + overrides) as YAML."""
    from tasks.config import dump_yaml

    typer.echo(dump_yaml(_config(preset, overrides, files, ablation)))


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

    _setup_logging()
    cfg = _config(preset, overrides, files)
    if stage not in ("stage1", "stage2", "reranker"):
        raise _fail(ValueError(f"--stage must be stage1, stage2 or reranker, got {stage!r}"))
    if not data:
        _catalog_ready(cfg)
        _data_ready(cfg)
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
        raise _fail(e) from None
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
        raise _fail(e) from None
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
    rerank_top_k: int = typer.Option(_default("eval.rerank_top_k"), "--rerank-top-k",
                                     help="documents per query given to the reranker"),
    rerank_type: Optional[List[str]] = typer.Option(None, "--rerank-type", help="an mteb task type the reranker "
                                                    "reranks (repeatable): Retrieval, Reranking, "
                                                    "InstructionRetrieval, InstructionReranking (default "
                                                    "eval.rerank_types)"),
    first_stage: Optional[Path] = typer.Option(None, "--first-stage", help="a first-stage file {task: {qid: "
                                               "{docid: score}}}, e.g. one --save-first-stage wrote: the "
                                               "reranker reranks its top-k instead of the embedding model's"),
    save_first_stage: bool = typer.Option(_default("eval.save_first_stage"),
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
    batch_size: int = typer.Option(_default("eval.batch_size"), "--batch-size", help="texts per forward pass"),
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

    _setup_logging()
    logging.getLogger("mteb").setLevel(logging.WARNING)  # one INFO line per phase per task otherwise
    named = bool(benchmark or task or task_dir or sts or pairclf)
    if not (named or preset):
        raise _fail(ValueError("nothing to evaluate: give --preset, --benchmark, --task, --task-dir, --sts or "
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
                      rerank_types=list(rerank_type or []) or _default("eval.rerank_types"),
                      first_stage=str(first_stage) if first_stage else None, save_first_stage=save_first_stage,
                      batch_size=batch_size, max_queries=max_queries, max_corpus=max_corpus, max_pairs=max_pairs,
                      max_query_length=max_query_length, max_doc_length=max_doc_length,
                      max_rerank_length=max_rerank_length, symmetric=list(symmetric or []),
                      dims=_default("eval.dims"))
        if preset:
            pcfg = _config(preset, None, files)
            base = pcfg.eval.model_dump()
            if not named:
                _data_ready(pcfg)
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
        raise _fail(e) from None
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


@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="output folder: shard-*.jsonl, rejected/, stats.json; "
                                                      "rerunning it generates only the missing shards"),
    passages: Optional[List[Path]] = typer.Option(None, "--passages", help="passage JSONL (BEIR corpus.jsonl or "
                                                  "records with text/passage); repeatable; replaces synth.passages"),
    personas: Optional[Path] = typer.Option(None, "--personas", help="persona file, one per line "
                                            "(default synth.personas)"),
    num_passages: Optional[int] = typer.Option(None, "--num-passages", "-n", help="use the first N passages"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Ray actors, each loading the generator once"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default "
                                              "infra.ray_address, then $RAY_ADDRESS, else a local instance)"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Synthesise training pairs with an LLM (paper §3.3, A.1): retrieval (persona configuration, then
    query generation), bitext, STS and classification, mixed by synth.kinds.

    Example: q3e synth -o runs/synth -n 16 --passages ../shared/data/passages/en-nq-msmarco.jsonl
    --personas ../shared/data/personas/personahub-5k.txt synth.generator.max_new_tokens=64
    """
    from pydantic import ValidationError

    from tasks.config import SynthConfig
    from tasks.data import DataError
    from tasks.distributed import init_ray, place_actors
    from tasks.models import ModelLoadError
    from tasks.synthesis.generators import GeneratorError
    from tasks.synthesis.run import synthesize

    _setup_logging()
    cfg = _config(preset, overrides, files)
    if not passages:
        _data_ready(cfg)
    update = {k: v for k, v in {"passages": [str(p) for p in passages] if passages else None,
                                "personas": str(personas) if personas else None,
                                "num_passages": num_passages, "workers": workers}.items() if v is not None}
    address = ray_address or cfg.infra.ray_address
    try:
        scfg = SynthConfig.model_validate(cfg.synth.model_dump() | update)
        init_ray(address, cfg.infra.ray_num_cpus)
        res = synthesize(scfg, out, placement=place_actors(scfg, "synth", address=address), progress=True)
    except (ValidationError, DataError, ModelLoadError, GeneratorError, ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    typer.echo(f"{res.stats['accepted']} pairs accepted, {res.stats['rejected']} rejected, "
               f"{len(res.shards)} shards -> {out} (stats.json, rejected/)")


@app.command("filter")
def filter_cmd(
    pairs: Path = typer.Argument(..., help="folder of synthetic shards (the --out of q3e synth)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: kept shard-*.jsonl, dropped/, report.json, "
                                                      "scores.png; rerunning it scores only the missing shards"),
    embedder: Optional[str] = typer.Option(None, "--embedder", "-e", help="scoring model: a saved model folder (the "
                                           "stage-1 model), micro, bundled:smollm2, bundled:all-minilm-l6-v2 or a "
                                           "sentence-transformers folder (default filter.embedder)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="keep pairs with cosine > this "
                                              "(default filter.threshold, 0.7)"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Ray actors, each loading the model once"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default "
                                              "infra.ray_address, then $RAY_ADDRESS, else a local instance)"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Filter synthetic pairs (paper §3.3): keep those whose cos(query with its instruction, document)
    under the scoring model is above the threshold."""
    from pydantic import ValidationError

    from tasks.config import FilterConfig
    from tasks.data import DataError
    from tasks.distributed import init_ray, place_actors
    from tasks.filter import filter_pairs
    from tasks.models import ModelLoadError

    _setup_logging()
    cfg = _config(preset, overrides, files)
    update = {k: v for k, v in {"threshold": threshold, "workers": workers}.items() if v is not None}
    address = ray_address or cfg.infra.ray_address
    try:
        fcfg = FilterConfig.model_validate(cfg.filter.model_dump() | update)
        init_ray(address, cfg.infra.ray_num_cpus)
        res = filter_pairs(fcfg, pairs, out, embedder=embedder or fcfg.embedder,
                           placement=place_actors(fcfg, "filter", address=address), progress=True)
    except (ValidationError, DataError, ModelLoadError, ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    r = res.report
    typer.echo(f"kept {r['kept']} of {r['total']} pairs (cos > {r['threshold']:g}) -> {out} "
               f"(report.json, {res.histogram.name})")


# --- commands of the other stages are registered below (synth, filter, eval, run, ...) ---


# --- the pipeline: run, runs compare, lineage ---

def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    scores = summary["scores"]
    tasks_ = sorted({t for s in scores.values() for t in s})
    table = Table(title=f"main scores ({summary['preset']}, {summary['ablation']})")
    table.add_column("model")
    for t in tasks_:
        table.add_column(t, justify="right", overflow="fold")
    for name, s in scores.items():
        table.add_row(name + (" (final)" if name == summary["final_model"] else ""),
                      *[f"{s[t]:.4f}" if t in s else "" for t in tasks_])
    console.print(table)
    checks = summary.get("checks") or []
    if checks:
        ct = Table(title="stage checks (each model against the one it was made from)")
        for col in ("check", "on", "score", "input", "result"):
            ct.add_column(col, justify="right" if col in ("score", "input") else "left")
        for c in checks:
            ct.add_row(f"{c['model']} {'≥' if c['op'] == '>=' else '>'} {c['baseline']}", c["task"],
                       f"{c['score']:.4f}", f"{c['baseline_score']:.4f}",
                       "pass" if c["passed"] else "[bold red]FAIL[/bold red]")
        console.print(ct)
    st = Table(title="stages")
    for col in ("stage", "cached", "wall s", "compute s"):
        st.add_column(col, justify="right" if col.endswith("s") else "left")
    for t in summary["stages"]:
        st.add_row(t["stage"], "yes" if t["cached"] else "", f"{t['wall_s']:.1f}", f"{t['compute_s']:.1f}")
    console.print(st)
    console.print(f"total {summary['wall_s']:.0f} s, stage compute {summary['compute_s']:.0f} s, "
                  f"orchestration overhead {summary['overhead_s']:.0f} s")
    uri = summary["tracking_uri"]
    console.print(f"MLflow run [bold]{summary['run_id']}[/bold]; open the results with:\n"
                  f"  .venv/bin/mlflow ui --backend-store-uri {uri}")


@app.command("run")
def run_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    ablation: Optional[str] = typer.Option(None, help="conf/ablations/<name>.yaml overlay (no-synthetic, ...)"),
    project: Path = typer.Option(Path("."), help="project folder: data/, data.dvc, datasets/, runs/"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Run the whole pipeline (the main job): data -> synthesis -> stage 1 -> filtering -> stage 2 ->
    slerp merge -> reranker -> evaluation, as a Prefect flow with Ray tasks, tracked in MLflow and DVC.

    Stages whose inputs did not change are reused; a failed run resumes at the stage that failed."""
    _setup_logging()
    _catalog_ready(_config(preset, overrides, files, ablation))  # validate before starting any service
    from flows.pipeline import pipeline

    summary = pipeline(preset=preset, overrides=list(overrides or []), ablation=ablation,
                       config_files=[str(f) for f in files or []], project_dir=str(project))
    _print_summary(summary)


@app.command("ablate")
def ablate_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only these settings (repeatable)"),
    project: Path = typer.Option(Path("."), help="project folder"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Run the ablation sweep (paper Table 5: full, no-merge, no-synthetic, only-synthetic, plus the loss
    ablations) under one MLflow parent run and print the Table-5-shaped comparison with each setting's
    difference to `full`. Each setting is conf/ablations/<name>.yaml; add your own there."""
    _setup_logging()
    _config(preset, overrides, files)
    from flows.ablate import ablate

    res = ablate(preset=preset, only=list(only or []) or None, overrides=list(overrides or []),
                 config_files=[str(f) for f in files or []], project_dir=str(project))
    typer.echo(res["markdown"])
    typer.echo(f"table, bar chart and summaries: {res['dir']} (MLflow run {res['run_id']})")


@app.command("rerun")
def rerun_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id of a pipeline run"),
    project: Path = typer.Option(Path("."), help="project folder"),
    run_dir: Path = typer.Option(Path(_default("run_dir")), help="run folder of the embedded MLflow store"),
    experiment: str = typer.Option(_default("infra.mlflow_experiment"), help="MLflow experiment name"),
) -> None:
    """Reproduce a run from MLflow: same preset, ablation and resolved configuration (its config.yaml)."""
    _setup_logging()
    from flows.ablate import rerun_args
    from flows.pipeline import pipeline
    from tasks import tracking

    args = rerun_args(run_id, project / run_dir if not run_dir.is_absolute() else run_dir, experiment)
    commit = tracking.git_commit(project.resolve())
    if args["git_commit"] and args["git_commit"] != commit:
        typer.secho(f"warning: run {run_id} was made at commit {args['git_commit']}, this is {commit}", fg="yellow")
    summary = pipeline(preset=args["preset"], ablation=args["ablation"], config_files=args["config_files"],
                       project_dir=str(project))
    if args["dvc_data_md5"] and args["dvc_data_md5"] != summary["data_md5"]:
        typer.secho(f"warning: data version differs: run had {args['dvc_data_md5']}, now {summary['data_md5']}",
                    fg="yellow")
    _print_summary(summary)


@app.command("retrain")
def retrain_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    project: Path = typer.Option(Path("."), help="project folder"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Retrain on the newest data version and promote the new model (registry alias `champion`) only if
    it is not worse than the current champion on the configured metric (retrain.*)."""
    _setup_logging()
    _config(preset, overrides, files)
    from flows.retrain import retrain

    res = retrain(preset=preset, overrides=list(overrides or []), config_files=[str(f) for f in files or []],
                  project_dir=str(project))
    typer.echo(f"{res['decision']}: {res['reason']}")


@app.command("schedule")
def schedule_cmd(
    cron: str = typer.Option(..., help='cron schedule, e.g. "0 3 * * 0" (Sundays 03:00)'),
    preset: str = PresetOpt,
    project: Path = typer.Option(Path("."), help="project folder the scheduled runs use"),
    name: Optional[str] = typer.Option(None, help="deployment name (default retrain-<preset>)"),
    files: Optional[List[Path]] = ConfigOpt,
    register_only: bool = typer.Option(False, "--register-only",
                                       help="register the deployment with the Prefect API and exit "
                                            "(a worker or `prefect deploy` runs it)"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Serve the retraining flow as a Prefect deployment on a cron schedule.

    Without --register-only this process serves the schedule (keep it running). Scheduling needs a
    Prefect server: `prefect server start` locally, or PREFECT_API_URL pointing at yours; to use a
    work pool instead, see infra/prefect/prefect.yaml and `prefect deploy`."""
    _setup_logging()
    _config(preset, overrides, files)
    from flows.retrain import register_schedule

    deployment = register_schedule(cron, preset, list(overrides or []), str(project), name,
                                   config_files=[str(Path(f).resolve()) for f in files or []])
    if register_only:
        dep_id = deployment.apply()
        typer.echo(f"registered deployment {deployment.name!r} ({dep_id}) with cron {cron!r}")
        return
    from prefect import serve

    serve(deployment)


data_app = typer.Typer(help="A preset's training data: local files, BEIR folders and the data catalog "
                              "(conf/catalog.yaml: the paper's Table 6 sets on the hub).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    offline: bool = typer.Option(False, "--offline", help="every catalog source reads its entry's local stand-in "
                                 "(data.catalog_offline=true): no hub needed"),
    samples: int = typer.Option(100, "--samples", "-n", min=1, help="pairs streamed per catalog source (a bounded "
                                "scan; files and BEIR folders are counted whole)"),
    project: Path = typer.Option(Path("."), help="project folder: data/ (restored when missing)"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Check a preset's training data without training: each stage1 / stage2 / reranker source with its
    kind (file, BEIR, catalog), task type, how many pairs it gives and one sample pair.

    Catalog sources are streamed from the hub up to -n pairs (nothing is cached); --offline reads their
    local stand-ins. Example: q3e data check --preset qwen3-0.6b --offline
    """
    from rich.console import Console
    from rich.table import Table

    from tasks.data import DataError, resolve_path
    from tasks.data.sources import check_source
    from tasks.lineage import LineageError, ensure_config_data

    cfg = _config(preset, list(overrides or []) + (["data.catalog_offline=true"] if offline else []), files)
    stages = [(name, getattr(cfg, name)) for name in ("stage1", "stage2", "reranker") if getattr(cfg, name).enabled]
    _catalog_ready(cfg)  # a bad catalog entry is one line before anything is restored or read
    paths = [s for _, st in stages for s in st.data if s.path is not None]
    if paths and not (project / cfg.data.dir).exists():
        try:
            version = ensure_config_data(project, cfg)
        except LineageError as e:
            raise _fail(e) from None
        typer.echo(f"data: restored {cfg.data.dir}/ (version {version[:10]})", err=True)
    rows = []
    try:
        for name, st in stages:
            for src in st.data:
                c = check_source(src, project, max_pairs=samples)
                rows.append((name, _source_label(src), c.kind, ", ".join(c.tasks), _pairs_label(c), _sample(c.first)))
            synthetic = _synthetic_row(cfg, name, project, samples)
            if synthetic:
                rows.append((name, *synthetic))
    except DataError as e:
        raise _fail(e) from None
    table = Table(title=f"training data of {preset}" + (" (catalog: local stand-ins)" if offline else ""))
    for i, col in enumerate(("stage", "source", "kind", "task", "pairs", "sample")):
        # a source is never cut (its first line is the whole path or entry name); task types fold
        widest = max((len(r[i].splitlines()[0]) for r in rows if r[i]), default=0) if col == "source" else None
        table.add_column(col, justify="right" if col == "pairs" else "left", no_wrap=col == "sample",
                         min_width=widest, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if cfg.synth.reuse and not resolve_path(cfg.synth.reuse, project).exists():
        typer.echo(f"note: synth.reuse {cfg.synth.reuse} not found under {project}: the run would synthesise")


def _cut(text: str, n: int) -> str:
    """`text` on one line, at most n characters (an ellipsis where it was cut)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _source_label(src) -> str:
    name = src.catalog + (" (stand-in)" if src.offline else "") if src.catalog else src.path
    name = name if len(name) <= 40 else "…" + name[-39:]
    return name + (f" limit {src.limit:,}" if src.limit else "")


def _pairs_label(c) -> str:
    if c.complete:
        return f"{c.pairs:,}"
    if c.limit and c.pairs >= c.limit:
        return f"{c.pairs:,} (limit)"
    return f"streaming: >={c.pairs:,} in {c.rows:,} rows"


def _sample(pair) -> str:
    if pair is None:
        return "(no pairs)"
    return f"{_cut(pair.query, 32)} -> {_cut(pair.positive, 40)} [{len(pair.negatives)} neg]"


def _synthetic_row(cfg, stage: str, project: Path, samples: int) -> tuple[str, ...] | None:
    """The synthetic pairs the pipeline adds to a stage (stage 1: all; stage 2, reranker: the filtered)."""
    from tasks.config import DataSource
    from tasks.data import resolve_path
    from tasks.data.sources import check_source

    if not cfg.synth.enabled or (stage != "stage1" and not cfg.filter.enabled):
        return None
    if stage != "stage1":
        return ("filtered synthetic pairs (made by the run)", "synthetic", ", ".join(cfg.synth.kinds), "-", "")
    reuse = cfg.synth.reuse and resolve_path(cfg.synth.reuse, project)
    if not reuse or not reuse.is_dir():
        return ("synthetic pairs (made by the run)", "synthetic", ", ".join(cfg.synth.kinds), "-", "")
    c = check_source(DataSource(path=str(reuse)), max_pairs=10**9)
    return (f"{cfg.synth.reuse} (synth.reuse)", "synthetic", ", ".join(c.tasks), _pairs_label(c),
            _sample(c.first))


runs_app = typer.Typer(help="Compare pipeline runs recorded in MLflow.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("compare")
def runs_compare_cmd(
    experiment: str = typer.Option(_default("infra.mlflow_experiment"), help="MLflow experiment name"),
    filter_string: str = typer.Option("", "--filter", help="MLflow search filter, e.g. \"tags.preset = 'smol'\""),
    run_dir: Path = typer.Option(Path(_default("run_dir")), help="run folder of the embedded MLflow store"),
    out: Path = typer.Option(Path("runs/compare"), help="writes <out>.csv and <out>.md"),
    metric_prefix: str = typer.Option("final/", help="which metrics become columns"),
) -> None:
    """Print the comparison table of pipeline runs (mlflow.search_runs) and write it as CSV and Markdown."""
    from tasks import tracking

    tracking.setup(run_dir, experiment)
    df = tracking.comparison_table(experiment, filter_string, metric_prefix)
    if df.empty:
        typer.echo("no runs found")
        raise typer.Exit(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    md = df.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else df.to_string(index=False)
    out.with_suffix(".md").write_text(md + "\n")
    typer.echo(md)
    typer.echo(f"\nwritten: {out.with_suffix('.csv')}, {out.with_suffix('.md')}")


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


@app.command("lineage")
def lineage_cmd(
    run_id: str = typer.Argument(..., help="an MLflow pipeline run id"),
    run_dir: Path = typer.Option(Path(_default("run_dir")), help="run folder of the embedded MLflow store"),
    experiment: str = typer.Option(_default("infra.mlflow_experiment"), help="MLflow experiment name"),
) -> None:
    """Print where a run's models came from: git commit, config hash, DVC versions of the input data
    and of the generated data sets, and each stage's artifact folder and content key."""
    import mlflow

    from tasks import tracking

    tracking.setup(run_dir, experiment)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise _fail(ValueError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}: {e}")) from None
    t = run.data.tags
    typer.echo(f"run {run_id} ({run.info.run_name}), status {run.info.status}")
    for key in ("preset", "ablation", "git_commit", "config_hash", "dvc_data_md5", "dvc_synthetic_md5",
                "dvc_filtered_md5", "model_uri.embedding", "model_uri.reranker"):
        if key in t:
            typer.echo(f"  {key:20s} {t[key]}")
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    for c in children:
        ct = c.data.tags
        typer.echo(f"  stage {ct.get('stage', c.info.run_name):16s} key {ct.get('stage_key', '')} "
                   f"{'(cached) ' if ct.get('cached') == 'true' else ''}{ct.get('artifact_dir', '')}")


# Typer keeps the line breaks of a help text's later paragraphs: each paragraph is one string here.
REPORT_HELP = "\n\n".join([
    "Print the Markdown report of pipeline runs from their summary.json alone (no MLflow), to paste or --out "
    "into README.md and docs/: the numbers then come from a command at a known commit.",
    "One run: header (run id, preset, ablation, git commit, config hash, data version, date, the command that "
    "reproduces it), main score of every model per task, stage checks (stage 1 >= backbone, stage 2 >= stage 1, "
    "merged >= stage 2, reranker > final embedder), synthesis acceptance, wall time per stage.",
    "Several runs (one configuration over seeds): mean ± std per model and task; runs of different commits, "
    "data versions or configurations other than their seeds are refused.",
    "Example: q3e report --latest --out docs/results-smol.md",
    "--ablations: the ids are `q3e ablate` sweep ids (their MLflow parent runs; each sweep wrote "
    "<run-dir>/ablations/<sweep id>/summaries.json), one sweep per seed, e.g. each run with stage1.seed=S "
    "stage2.seed=S reranker.seed=S: each setting's final-model scores as mean ± std over the sweeps, its "
    "difference to full paired by seed, the per-seed means, and whether the paper's ordering only-synthetic < "
    "no-synthetic < no-merge < full holds beyond the noise (|mean difference| > 2 standard errors). --plot "
    "PATH also draws the settings over seeds as a bar chart (PNG).",
    "Example: q3e report --ablations SWEEP_0 SWEEP_1 SWEEP_2 --out docs/ablations-smol.md "
    "--plot docs/ablations-smol.png",
])


@app.command("report", help=REPORT_HELP)
def report_cmd(
    run_ids: Optional[List[str]] = typer.Argument(None, help="MLflow run id(s) of pipeline runs; several = one "
                                                  "configuration over seeds; with --ablations: sweep ids"),
    latest: bool = typer.Option(False, "--latest", help="report the run whose summary.json was written last"),
    run_dir: Path = typer.Option(Path(_default("run_dir")), "--run-dir", help="the runs' run_dir: summaries are "
                                 "<run-dir>/runs/<run id>/summary.json"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the Markdown to this file (atomically) "
                                       "instead of stdout"),
    ablations: bool = typer.Option(False, "--ablations", help="the ids are `q3e ablate` sweep ids, one sweep per "
                                   "seed: each setting over seeds and the paper's ordering"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="with --ablations: also write a bar chart (PNG) of "
                                        "the settings over seeds to this file"),
) -> None:
    """Markdown report of one run, of one configuration over seeds, or of ablation sweeps over seeds
    (see REPORT_HELP)."""
    from tasks.data import atomic_write_text
    from tasks.ablation import report_ablation_seeds
    from tasks.report import ReportError, latest_run_id, load_summary, load_sweep, report_seeds, run_report

    try:
        if ablations and latest:
            raise ReportError("--latest picks one run, not sweeps: with --ablations give the sweep ids")
        if plot is not None and not ablations:
            raise ReportError("--plot draws ablation sweeps over seeds: use it with --ablations")
        if latest and run_ids:
            raise ReportError("give run ids or --latest, not both")
        ids = [latest_run_id(run_dir)] if latest else list(run_ids or [])
        if not ids:
            raise ReportError("give two or more sweep ids" if ablations else "give one or more run ids, or --latest")
        if ablations:
            sweeps = [load_sweep(run_dir, sid) for sid in ids]
            text = report_ablation_seeds(sweeps, ids)
        else:
            summaries = [load_summary(run_dir, rid) for rid in ids]
            text = run_report(summaries[0]) if len(summaries) == 1 else report_seeds(summaries)
    except ReportError as e:
        raise _fail(e) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}")
    if plot is not None:
        from tasks.ablation import plot_ablation_seeds

        preset = next(iter(sweeps[0].values()))["preset"]
        plot_ablation_seeds(sweeps, plot, title=f"ablations ({preset}) over {len(sweeps)} seeds")
        typer.echo(f"wrote {plot}", err=out is None)  # not into the Markdown on stdout


def one_line(e: BaseException) -> str:
    """`error:` text of an exception: the project's own errors by their message (it names the file
    and field), anything else with its type; on one line."""
    text = " ".join(str(e).split()) or repr(e)
    return text if type(e).__module__.startswith(("tasks.", "flows.")) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """The `q3e` console entry: runs a command; a failure is one `error:` line on stderr (exit 1)
    and its traceback is written to a file the line names, or printed with --debug / Q3E_DEBUG=1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    try:
        app(args=args, prog_name="q3e")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        typer.secho("error: interrupted; rerun the same command to resume where it stopped", fg="red", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line
        if debugging():
            raise
        fd, path = tempfile.mkstemp(prefix="q3e-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(e)))
        typer.secho(f"error: {one_line(e)} (traceback: {path}; --debug prints it)", fg="red", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
