"""The Qwen3-Embedding recipe (paper Fig. 2) as one Prefect flow whose heavy work runs on Ray.

    data (DVC) -> synthesis -> stage 1 (weakly supervised, synthetic pairs) -> filtering (cos > 0.7,
    scored by the stage-1 model) -> stage 2 (SFT, labelled + filtered synthetic) -> slerp merge
    -> reranker SFT + merge -> evaluation of backbone, stage 1, stage 2, merged, reranker

With `stage2_balances`, stage 2 is trained once per task balance (concurrent Ray tasks) and the merge
takes their finals (task_slerp from their common start) instead of one run's last checkpoints.

Every stage is a Prefect task over a content-addressed folder (tasks/stages.py): unchanged inputs
are reused, a failed stage resumes from its own checkpoints/shards. The flow connects to Ray once
and decides what runs where: training and evaluation run as Ray tasks with the resources of their
config; synthesis and filtering get a pool of Ray actors sized here, from their config and the
cluster's resources (`place_actors`), and run it on the flow's Ray. MLflow:
one parent run per pipeline run, one nested run per stage, all logged from this driver process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait

from tasks import lineage, report, tracking
from tasks.config import ModelConfig, PipelineConfig, Resources, TrainConfig, flatten, load_config
from tasks.distributed import init_ray, place_actors, run_remote
from tasks.stages import (
    StageDir, eval_key, key_model, merge_stage, stage_dir, stage_key, synth_key, timed, train_key,
    train_resources, train_stage,
)

log = logging.getLogger(__name__)


class _PopenInItsOwnSession(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "start_new_session": True})


class _SubprocessInItsOwnSession(types.ModuleType):
    """The `subprocess` module as Prefect's server module sees it, with Popen starting a new session."""

    Popen = _PopenInItsOwnSession

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def keep_the_temporary_prefect_server_through_ctrl_c() -> None:
    """Ctrl-C in a terminal signals its whole foreground process group. Prefect's temporary API
    server (uvicorn, a child of this driver) stopped at once, and the flow's report of the
    interrupt then retried against the closed port for a minute and ended in "Connection refused"
    instead of the resume hint. Started in its own session the server stays up until the driver
    stops it (Prefect's atexit hook); if the driver dies, the watchdog (tasks/reaper.py) still
    stops it: it follows parent pids, not process groups. Nothing to do with a configured server."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api import server

    if not isinstance(server.subprocess, _SubprocessInItsOwnSession):
        server.subprocess = _SubprocessInItsOwnSession("subprocess")


keep_the_temporary_prefect_server_through_ctrl_c()


@dataclass
class Context:
    """Plain values every stage task needs (no models, no clients)."""

    cfg: PipelineConfig
    root: Path
    artifacts: Path
    datasets: Path
    experiment_id: str
    parent_run_id: str
    data_md5: str
    timings: list[dict] = field(default_factory=list)


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # outside a Prefect run context
        return log


@task(name="stage", cache_policy=NO_CACHE)
def run_stage(ctx: Context, sd: StageDir, fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
              resources: Resources | None = None, params: dict | None = None) -> dict:
    """Reuse `sd` if complete, else run `fn(*args, **kwargs)` (as a Ray task when `resources` is
    given), record its result, and log the stage as a nested MLflow run."""
    logger = run_logger()
    t0 = time.perf_counter()
    result = sd.result()
    cached = result is not None
    if cached:
        logger.info("%s: inputs unchanged (key %s), reusing %s", sd.name, sd.key, sd.path)
    else:
        logger.info("%s: running (key %s) -> %s", sd.name, sd.key, sd.path)
        sd.path.mkdir(parents=True, exist_ok=True)
        if resources is not None:
            out, compute = run_remote(fn, *args, num_cpus=resources.cpus, num_gpus=resources.gpus, **(kwargs or {}))
        else:
            out, compute = timed(fn, *args, **(kwargs or {}))
        result = sd.complete({**out, "compute_s": compute, "key": sd.key, "finished": time.time()})
    wall = time.perf_counter() - t0
    ctx.timings.append({"stage": sd.name, "key": sd.key, "cached": cached, "wall_s": wall,
                        "compute_s": 0.0 if cached else result["compute_s"]})
    _log_stage(ctx, sd, result, cached, params or {})
    return result


def _log_stage(ctx: Context, sd: StageDir, result: dict, cached: bool, params: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(ctx.experiment_id, run_name=sd.name, tags={
        "mlflow.parentRunId": ctx.parent_run_id, "stage": sd.name, "stage_key": sd.key,
        "cached": str(cached).lower(), "artifact_dir": str(sd.path)})
    rid = run.info.run_id
    tracking.log_params(rid, params)
    history = Path(result["history"]) if result.get("history") else None
    if history and history.is_file():
        tracking.log_history(rid, [json.loads(x) for x in history.read_text().splitlines() if x.strip()])
    tracking.log_metrics(rid, {k: v for k, v in _flat_numbers(result.get("metrics", {})).items()})
    tracking.log_metrics(rid, {k: result[k] for k in ("seconds_per_step", "peak_memory_mb", "first_loss",
                                                       "last_loss", "compute_s") if k in result})
    for key in ("loss_plot", "stats", "report", "histogram", "results_json", "table"):
        p = result.get(key)
        if p and Path(p).is_file():
            client.log_artifact(rid, p)
    for key, value in result.items():
        if key.startswith("dvc_"):
            client.set_tag(rid, key, value)
            client.set_tag(ctx.parent_run_id, key, value)
    client.set_terminated(rid)


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


# ----------------------------------------------------------------------------- the stages

def synthesis(ctx: Context) -> dict | None:
    cfg = ctx.cfg
    if not cfg.synth.enabled:
        return None
    from tasks.stages import synth_stage

    key = synth_key(cfg.synth, data=ctx.data_md5, root=ctx.root)
    sd = stage_dir(ctx.datasets, "synthesis", key, folder="synthetic")
    return run_stage.with_options(name=sd.name)(
        ctx, sd, synth_stage, (cfg.synth, str(sd.path)),
        {"data_root": str(ctx.root), "project_root": str(ctx.root), "dvc_remote": cfg.infra.dvc_remote,
         "placement": place_actors(cfg.synth, "synth", address=cfg.infra.ray_address)},
        params=_section(cfg, "synth"))


def catalog_inputs(train: TrainConfig, ctx: Context) -> dict:
    """The content keys of a stage's catalog sources, as stage-key inputs (none without catalog sources,
    so the keys of other stages stay what they were): a catalog entry is named in the config, but what
    it holds is in conf/catalog.yaml (and its stand-in)."""
    from tasks.data.catalog import content_keys

    keys = content_keys(train.data, ctx.root)
    return {"catalog": keys} if keys else {}


def stage1(ctx: Context, synth: dict | None) -> dict | None:
    cfg = ctx.cfg
    if not cfg.stage1.enabled or synth is None:
        return None
    if synth["n_accepted"] == 0:
        run_logger().warning("stage1: synthesis accepted no pairs (see %s); skipping stage 1", synth["stats"])
        return None
    key = train_key("stage1", train=cfg.stage1, model=cfg.model, synth=synth["key"], data=ctx.data_md5,
                    **catalog_inputs(cfg.stage1, ctx))
    sd = stage_dir(ctx.artifacts, "stage1", key)
    return run_stage.with_options(name=sd.name)(
        ctx, sd, train_stage, (cfg.stage1, cfg.model, str(sd.path)),
        {"extra_data": [synth["shards_dir"]], "data_root": str(ctx.root)},
        resources=train_resources(cfg.stage1), params=_section(cfg, "stage1"))


def filtering(ctx: Context, synth: dict | None, s1: dict | None) -> dict | None:
    cfg = ctx.cfg
    if not cfg.filter.enabled or synth is None or synth["n_accepted"] == 0:
        return None
    from tasks.stages import filter_stage

    embedder = cfg.filter.embedder or (s1["final"] if s1 else None)
    if embedder is None:  # no stage-1 model (e.g. stage 1 switched off): score with the backbone
        embedder = cfg.model.backbone
    key = stage_key("filter", filter=cfg.filter, synth=synth["key"], embedder=s1["key"] if s1 and not
                    cfg.filter.embedder else embedder,
                    model=key_model(cfg.model, gpu=cfg.filter.gpus_per_worker > 0))
    sd = stage_dir(ctx.datasets, "filter", key, folder="filtered")
    return run_stage.with_options(name=sd.name)(
        ctx, sd, filter_stage, (cfg.filter, synth["shards_dir"], str(sd.path)),
        {"embedder": embedder, "project_root": str(ctx.root), "dvc_remote": cfg.infra.dvc_remote,
         "placement": place_actors(cfg.filter, "filter", address=cfg.infra.ray_address)},
        params=_section(cfg, "filter"))


def stage2(ctx: Context, s1: dict | None, filtered: dict | None, train: TrainConfig | None = None,
           name: str = "stage2", submit: bool = False) -> dict | PrefectFuture | None:
    """Stage 2 with `train` (default: the stage2 section) in stage2/<key>; `submit`: as a Prefect future."""
    cfg = ctx.cfg
    if not cfg.stage2.enabled:
        return None
    train = cfg.stage2 if train is None else train
    extra = [filtered["kept_dir"]] if filtered and filtered.get("n_kept", 0) > 0 else []
    key = train_key("stage2", train=train, model=cfg.model, init=s1["key"] if s1 else None,
                    filtered=filtered["key"] if filtered else None, data=ctx.data_md5, **catalog_inputs(train, ctx))
    sd = stage_dir(ctx.artifacts, name, key, folder="stage2")
    stage = run_stage.with_options(name=sd.name)
    params = {f"stage2.{k}": v for k, v in flatten(train.model_dump(mode="json")).items()}
    return (stage.submit if submit else stage)(
        ctx, sd, train_stage, (train, cfg.model, str(sd.path)),
        {"init": s1["final"] if s1 else None, "extra_data": extra, "data_root": str(ctx.root)},
        resources=train_resources(train), params=params)


def stage2_balances(ctx: Context, s1: dict | None, filtered: dict | None) -> list[dict]:
    """Stage 2 once per entry of `stage2_balances` (stage2-balance<i>: batches drawn task_balanced with
    the entry's weights), each with its own key, folder and resume. They run as concurrent Ray tasks;
    with ray_train (Ray Train places its own workers) one after the other."""
    cfg = ctx.cfg
    if not cfg.stage2.enabled:
        return []
    trains = [cfg.stage2.model_copy(update={"sampling": b.sampling}) for b in cfg.stage2_balances]
    names = [f"stage2-balance{i}" for i in range(len(trains))]
    if train_resources(cfg.stage2) is None:
        return [stage2(ctx, s1, filtered, train, name) for train, name in zip(trains, names)]
    futures = [stage2(ctx, s1, filtered, train, name, submit=True) for train, name in zip(trains, names)]
    wait(futures)  # every balance finishes (or fails) before a failure is raised
    return [f.result() for f in futures]


def backbone_key(cfg: PipelineConfig) -> str:
    return stage_key("backbone", model=key_model(cfg.model, gpu=cfg.stage2.resources.gpus > 0))


def backbone(ctx: Context) -> dict:
    """The backbone saved as a model folder, keyed as the backbone is evaluated: the start of stage 2
    when stage 1 does not run, so the base a task_slerp merge takes the deltas from."""
    from tasks.stages import backbone_stage

    cfg = ctx.cfg
    sd = stage_dir(ctx.artifacts, "backbone", backbone_key(cfg))
    return run_stage.with_options(name=sd.name)(
        ctx, sd, backbone_stage, (cfg.model, str(sd.path)), resources=cfg.stage2.resources,
        params=_section(cfg, "model"))


def merge_key(name: str, merge_cfg, trained: dict, base: dict | None) -> str:
    """The key of a checkpoint merge: what it merges (the trained stage's key) and, for task_slerp,
    the key of the model the deltas are taken from; never a path, so the same merge in another
    clone or run_dir has the same key."""
    return stage_key(name, merge=merge_cfg, trained=trained["key"],
                     base=base["key"] if base is not None and merge_cfg.method == "task_slerp" else None)


def merging(ctx: Context, trained: dict | None, merge_cfg, name: str, base: dict | None = None) -> dict | None:
    """Slerp of the last `merge_cfg.num_checkpoints` checkpoints of `trained`; with task_slerp, of
    their deltas from `base` (the result of the stage the training started from)."""
    if trained is None or not merge_cfg.enabled:
        return None
    ckpts = trained["checkpoints"][-merge_cfg.num_checkpoints:]
    if len(ckpts) < 2:
        run_logger().warning("%s: only %d checkpoint(s) kept; nothing to merge", name, len(ckpts))
        return None
    sd = stage_dir(ctx.artifacts, name, merge_key(name, merge_cfg, trained, base))
    return run_stage.with_options(name=sd.name)(
        ctx, sd, merge_stage, (ckpts, str(sd.path)),
        {"weights": merge_cfg.weights, "base": base["final"] if base and merge_cfg.method == "task_slerp" else None},
        params={f"{name}.{k}": v for k, v in merge_cfg.model_dump(mode="json").items()})


def balances_merging(ctx: Context, balances: list[dict], s1: dict | None) -> dict | None:
    """The merge of the balances' stage-2 finals (one each, merge.weights one per balance): task_slerp
    of their deltas from their common start (stage 1's final, else the backbone saved as a folder),
    or slerp of the raw weights."""
    cfg = ctx.cfg
    if not cfg.merge.enabled or not balances:
        return None
    if len(balances) < 2:
        run_logger().warning("merge: one stage-2 balance; nothing to merge")
        return None
    base = (s1 or backbone(ctx)) if cfg.merge.method == "task_slerp" else None
    key = stage_key("merge", merge=cfg.merge, trained=[b["key"] for b in balances],
                    base=base["key"] if base else None)
    sd = stage_dir(ctx.artifacts, "merge", key)
    return run_stage.with_options(name=sd.name)(
        ctx, sd, merge_stage, ([b["final"] for b in balances], str(sd.path)),
        {"weights": cfg.merge.weights, "base": base["final"] if base else None},
        params={**_section(cfg, "merge"), "merge.balances": len(balances)})


def reranker(ctx: Context, filtered: dict | None) -> dict | None:
    cfg = ctx.cfg
    if not cfg.reranker.enabled:
        return None
    extra = [filtered["kept_dir"]] if filtered and filtered.get("n_kept", 0) > 0 else []
    key = train_key("reranker", train=cfg.reranker, model=cfg.reranker_backbone,
                    filtered=filtered["key"] if filtered else None, data=ctx.data_md5,
                    **catalog_inputs(cfg.reranker, ctx))
    sd = stage_dir(ctx.artifacts, "reranker", key)
    return run_stage.with_options(name=sd.name)(
        ctx, sd, train_stage, (cfg.reranker, cfg.reranker_backbone, str(sd.path)),
        {"extra_data": extra, "data_root": str(ctx.root)},
        resources=train_resources(cfg.reranker), params=_section(cfg, "reranker"))


def _model_label(model: str | ModelConfig) -> str:
    """A model folder as it is, an untrained backbone (a ModelConfig) by its backbone name."""
    return model.backbone if isinstance(model, ModelConfig) else str(model)


def evaluation(ctx: Context, name: str, model: str | ModelConfig, model_key: str,
               reranker_model: str | None = None, reranker_key: str | None = None) -> dict:
    from tasks.stages import eval_stage

    cfg = ctx.cfg
    # the task instructions and a fixed first stage are part of what is measured: editing
    # conf/task_prompts.json or the eval.first_stage file re-evaluates
    key = eval_key(cfg.eval, model=model_key, reranker=reranker_key, data=ctx.data_md5, root=ctx.root)
    sd = stage_dir(ctx.artifacts, f"eval-{name}", key)
    return run_stage.with_options(name=sd.name)(
        ctx, sd, eval_stage, (model, cfg.eval, str(sd.path)),
        {"reranker": reranker_model, "data_root": str(ctx.root), "label": name},
        resources=cfg.eval.resources, params={"model": _model_label(model), **_section(cfg, "eval")})


def _section(cfg: PipelineConfig, name: str) -> dict:
    return {k: v for k, v in cfg.flat().items() if k.startswith(name + ".")}


# ----------------------------------------------------------------------------- the flow

@flow(name="qwen3-embedding-pipeline", log_prints=True)
def pipeline(preset: str = "smol", overrides: list[str] | None = None, ablation: str | None = None,
             config_files: list[str] | None = None, project_dir: str = ".",
             parent_run_id: str | None = None) -> dict:
    """Run the whole recipe; returns the run summary (also written to <run_dir>/runs/<run id>/summary.json)."""
    import mlflow

    t_start = time.perf_counter()
    cfg = load_config(preset, overrides or [], ablation=ablation, files=config_files or [])
    root = Path(project_dir).resolve()
    run_dir = root / cfg.run_dir
    logger = run_logger()

    data_md5 = lineage.ensure_config_data(root, cfg)
    experiment_id = tracking.setup(run_dir, cfg.infra.mlflow_experiment, cfg.infra.mlflow_tracking_uri)
    init_ray(cfg.infra.ray_address, cfg.infra.ray_num_cpus)

    client = mlflow.MlflowClient()
    tags = {"preset": cfg.preset, "ablation": cfg.ablation, "config_hash": cfg.digest(),
            "git_commit": tracking.git_commit(root), "dvc_data_md5": data_md5, "pipeline": "full"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(tracking.driver_tags())  # a later run marks this one KILLED if its driver dies uncleanly
    machine = tracking.machine()
    tags.update({f"machine.{k}": v for k, v in machine.items()})
    tracking.mark_dead_runs(experiment_id)
    parent = client.create_run(experiment_id, run_name=f"{cfg.preset}-{cfg.ablation}", tags=tags)
    pid = parent.info.run_id
    tracking.log_params(pid, cfg.flat())
    from tasks.config import dump_yaml
    from tasks.data import atomic_write_text

    resolved = atomic_write_text(run_dir / "runs" / pid / "config.yaml", dump_yaml(cfg))
    client.log_artifact(pid, str(resolved))  # `q3e rerun RUN_ID` reruns exactly this
    logger.info("MLflow run %s (experiment %s, %s)", pid, cfg.infra.mlflow_experiment, mlflow.get_tracking_uri())
    ctx = Context(cfg, root, run_dir / "artifacts", root / "datasets", experiment_id, pid, data_md5)
    status = "FAILED"
    try:
        synth = synthesis(ctx)
        s1 = stage1(ctx, synth)
        filtered = filtering(ctx, synth, s1)
        balances = stage2_balances(ctx, s1, filtered) if cfg.stage2_balances else []
        if cfg.stage2_balances:  # "stage2" below is the first balance's model
            s2 = balances[0] if balances else None
            merged = balances_merging(ctx, balances, s1)
        else:
            s2 = stage2(ctx, s1, filtered)
            start = (s1 or backbone(ctx)) if cfg.merge.method == "task_slerp" else None  # where stage 2 began
            merged = merging(ctx, s2, cfg.merge, "merge", base=start)
        rr = reranker(ctx, filtered)
        rr_merged = merging(ctx, rr, cfg.reranker_merge, "reranker-merge")

        # the backbone is scored as the preset configures it (layers kept, max lengths), through the
        # same path as every trained model
        models: dict[str, tuple[str | ModelConfig, str]] = {"backbone": (cfg.model, backbone_key(cfg))}
        for name, res in (("stage1", s1), ("stage2", s2), ("merged", merged)):
            if res:
                models[name] = (res["final"], res["key"])
        final_name = list(models)[-1]
        evaluated: dict[str, dict] = {}
        for name, (path, key) in models.items():
            evaluated[name] = evaluation(ctx, name, path, key)
        final_rr = rr_merged or rr
        if final_rr:
            path, key = models[final_name]
            evaluated["reranker"] = evaluation(ctx, "reranker", path, key, final_rr["final"], final_rr["key"])
        results = {name: res["results"] for name, res in evaluated.items()}
        benchmarks = {name: res["benchmarks"] for name, res in evaluated.items() if res.get("benchmarks")}

        summary = _summarise(ctx, results, final_name, models, final_rr, t_start, tags=tags, synth=synth,
                             filtered=filtered, overrides=overrides or [], config_files=config_files or [],
                             merged=merged, benchmarks=benchmarks, balances=balances)
        _log_final(ctx, summary, _model_label(models[final_name][0]), final_rr["final"] if final_rr else None)
        status = "FINISHED"
        return summary
    finally:
        client.set_terminated(pid, status=status)


def main_scores(results: dict) -> dict[str, float]:
    """{task: main score} of one model's evaluation (reranking: the reranked nDCG@10)."""
    out = {}
    for task_name, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        if "main_score" in metrics:
            out[task_name] = metrics["main_score"]
    return out


def _summarise(ctx: Context, results: dict, final_name: str, models: dict, final_rr: dict | None,
               t_start: float, *, tags: dict, synth: dict | None, overrides: list[str],
               config_files: list[str], merged: dict | None = None, filtered: dict | None = None,
               benchmarks: dict | None = None, balances: list[dict] | None = None) -> dict:
    """The run's summary.json: everything `q3e report` needs, so a report never asks MLflow."""
    from datetime import datetime, timezone

    total = time.perf_counter() - t_start
    compute = sum(t["compute_s"] for t in ctx.timings)
    table = {name: main_scores(res) for name, res in results.items()}
    flat = ctx.cfg.flat()
    # a merge of stage-2 balances merged their finals: named by stage, not by folder
    stage_of = {b["final"]: f"stage2-balance{i}" for i, b in enumerate(balances or [])}
    summary = {
        "run_id": ctx.parent_run_id, "preset": ctx.cfg.preset, "ablation": ctx.cfg.ablation,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": tags["git_commit"], "config_hash": tags["config_hash"], "dvc_data_md5": tags["dvc_data_md5"],
        "machine": {k.removeprefix("machine."): v for k, v in tags.items() if k.startswith("machine.")},
        "config_hash_without_seeds": report.config_digest_without_seeds(flat), "seeds": report.seeds_of(flat),
        "overrides": list(overrides), "config_files": list(config_files),
        "final_model": final_name, "final_model_path": _model_label(models[final_name][0]),
        "reranker_path": final_rr["final"] if final_rr else None,
        "scores": table, "checks": report.stage_checks(table, final_name), "results": results,
        "merge": {"checkpoints": [stage_of.get(c) or (Path(c).parent.name if Path(c).name == "model"
                                                      else Path(c).name) for c in merged["checkpoints"]],
                  "relative_spread": merged.get("relative_spread")} if merged else None,
        "synthesis": _read_json(synth["stats"]) if synth else None, "train_pairs": _train_pairs(models),
        "filter": _read_json(filtered["report"]) if filtered else None,
        "stages": ctx.timings, "wall_s": total, "compute_s": compute,
        "overhead_s": total - compute, "data_md5": ctx.data_md5,
        "tracking_uri": __import__("mlflow").get_tracking_uri(),
        # per model, Mean(Task) / Mean(Type) of each mteb benchmark (tasks/report.py: Benchmarks)
        "benchmarks": benchmarks or {}, "first_stage": ctx.cfg.eval.first_stage,
    }
    if balances:  # which stage-2 model is which balance ("stage2" in the scores: the first)
        summary["stage2_balances"] = [{"stage": f"stage2-balance{i}", "weights": b.weights, "key": res["key"],
                                       "final": res["final"]}
                                      for i, (b, res) in enumerate(zip(ctx.cfg.stage2_balances, balances))]
    return summary


def _read_json(path: str) -> dict | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def _train_pairs(models: dict) -> dict[str, int]:
    """{stage: training pairs} from each trained model's final/train_summary.json."""
    out = {}
    for name in ("stage1", "stage2"):
        rec = _read_json(str(Path(models[name][0]) / "train_summary.json")) if name in models else None
        if rec and "pairs" in rec:
            out[name] = rec["pairs"]
    return out


def _log_final(ctx: Context, summary: dict, final_model: str, final_reranker: str | None) -> None:
    from tasks.data import atomic_write_text

    pid = ctx.parent_run_id
    metrics = {}
    for name, scores in summary["scores"].items():
        for task_name, value in scores.items():
            metrics[f"eval/{name}/{task_name}"] = value
    for task_name, value in summary["scores"].get(summary["final_model"], {}).items():
        metrics[f"final/{task_name}"] = value
    for task_name, value in summary["scores"].get("reranker", {}).items():
        metrics[f"final/rerank/{task_name}"] = value
    metrics.update({"time/wall_s": summary["wall_s"], "time/compute_s": summary["compute_s"],
                    "time/overhead_s": summary["overhead_s"]})
    metrics.update({f"check/{c['name']}": float(c["passed"]) for c in summary["checks"]})
    tracking.log_metrics(pid, metrics)
    out = ctx.artifacts.parent / "runs" / pid / "summary.json"
    atomic_write_text(out, json.dumps(summary, indent=2, default=str))
    client = __import__("mlflow").MlflowClient()
    client.log_artifact(pid, str(out))
    md = ctx.artifacts.parent / "runs" / pid / "scores.md"
    atomic_write_text(md, scores_markdown(summary))
    client.log_artifact(pid, str(md))
    client.log_artifact(pid, str(atomic_write_text(md.with_name("report.md"), report.run_report(summary))))
    if not Path(final_model).is_dir():  # the untrained backbone: nothing of ours to log
        return
    uris = {"embedding": _logged_model(ctx, Path(final_model), "embedding", "embedding_model")}
    if final_reranker:
        uris["reranker"] = _logged_model(ctx, Path(final_reranker), "reranker", "reranker_model")
    for kind, uri in uris.items():
        client.set_tag(pid, f"model_uri.{kind}", uri)
    summary["model_uris"] = uris


def _logged_model(ctx: Context, model_dir: Path, kind: str, name: str) -> str:
    """Log a model once per content (its stage key) and store: later runs that reuse the stage
    point at the already-logged model instead of copying the weights again."""
    import mlflow

    note = model_dir.parent / f"mlflow-model-{kind}.json"
    uri = mlflow.get_tracking_uri()
    if note.is_file():
        rec = json.loads(note.read_text())
        if rec.get("tracking_uri") == uri:
            return rec["model_uri"]
    model_uri = tracking.log_model(ctx.parent_run_id, model_dir, kind, name)
    from tasks.data import atomic_write_text

    atomic_write_text(note, json.dumps({"tracking_uri": uri, "model_uri": model_uri}))
    return model_uri


def scores_markdown(summary: dict) -> str:
    tasks_ = sorted({t for s in summary["scores"].values() for t in s})
    lines = ["| model | " + " | ".join(tasks_) + " |", "|---|" + "---|" * len(tasks_)]
    for name, scores in summary["scores"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[t]:.4f}" if t in scores else "" for t in tasks_) + " |")
    return "\n".join(lines) + "\n"
