"""Data-parallel training on Ray Train: the step loop of loop.py on N workers (DDP, or DeepSpeed ZeRO-2/3).

Same data order, schedule, seeds, step functions and on-disk layout as one process, so an N-worker
run trains the model a 1-worker run trains on the same global batch (to float rounding); how the
global batch is split, gathered and weighted is in steps.py, what DDP / DeepSpeed change in engines.py.

- checkpoints: rank 0 writes `out_dir/checkpoints/step-N` atomically in the trainer's layout (merge,
  evaluation and resumption read it unchanged). That folder is Ray Train's run folder: the checkpoint
  is registered with `ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)`, no copy. A restarted
  worker group (`distributed.max_failures`) and a rerun both resume from the newest checkpoint;
- metrics: rank 0 appends every step to `metrics.jsonl` (as one process does); workers report to
  Ray Train at checkpoint steps only, and the driver logs the history to MLflow (tasks/tracking.py)
  once the workers are done;
- DeepSpeed (`distributed.deepspeed: zero2 | zero3 | <file.json>`): the JSON (conf/deepspeed/) holds
  the ZeRO settings; batch sizes, precision and clipping are filled in from the TrainConfig at run
  time, and the optimizer and LR schedule stay ours (AdamW + warm-up/cosine, handed to
  `deepspeed.initialize`).

The training function is launched from the driver (`train_distributed`); inside a Ray task that
holds the cluster's CPUs its workers could never be placed (see `tasks.stages.train_resources`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tasks.config import ModelConfig, TrainConfig
from tasks.data import Pair, load_sources
from tasks.training.checkpoint import checkpoint_name
from tasks.training.engines import DDPEngine, DeepSpeedEngine, DeepSpeedUnavailable, deepspeed_config, import_deepspeed
from tasks.training.history import read_history
from tasks.training.loop import TrainingInterrupted, TrainResult, batch_size_for, finished_result, fit, load_model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the worker

def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed already initialised by TorchTrainer)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, CheckpointUploadMode

    cfg: TrainConfig = config["cfg"]
    out_dir = Path(config["out_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    pairs = config["pairs"] if config["pairs"] is not None else load_sources(cfg.data, config["data_root"])
    if not pairs:
        raise ValueError(f"{out_dir}: no training pairs (data: {[d.path for d in cfg.data]})")
    batch_size = batch_size_for(len(pairs), cfg.batch_size, world, out_dir)
    cfg = cfg.model_copy(update={"batch_size": batch_size})

    if cfg.distributed.deepspeed:
        import_deepspeed(cfg)  # before loading a model it could not train
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, config["model_cfg"], config["init"], ray.train.torch.get_device())
    if cfg.distributed.deepspeed:
        ds = deepspeed_config(cfg.distributed.deepspeed, cfg, world, next(model.parameters()).dtype)
        engine = DeepSpeedEngine(model, cfg, ds)
    else:
        engine = DDPEngine(model, cfg)

    def on_step(rec: dict, ckpt: Path | None, due: bool) -> None:
        step = rec["step"]
        if rank == 0 and step % cfg.log_every == 0:
            log.info("%s step %d/%d: loss %.4f, lr %.2e, %.1f pairs/s", out_dir.name, step, cfg.steps,
                     rec["loss"], rec["lr"], rec["pairs_per_s"])
        # Ray Train gets the checkpoint steps only (metrics.jsonl has every step): a report is a barrier
        # of all workers and blocks until the controller, which polls every 2 s, has taken the previous
        # one, so a report per step added ~1.9 s to each 0.06 s step of the micro preset.
        if due:
            ray.train.report(rec, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None,
                             checkpoint_dir_name=checkpoint_name(step),
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    fit(engine, cfg, pairs, out_dir, batch_size, stop_after=config["stop_after"], on_step=on_step)


# ----------------------------------------------------------------------------- the driver

def train_distributed(cfg: TrainConfig, model_cfg: ModelConfig | str, out_dir: str | Path, *,
                      init: str | Path | None = None, pairs: list[Pair] | None = None,
                      data_root: str | Path | None = None, stop_after: int | None = None,
                      ray_address: str | None = None, mlflow_run_id: str | None = None) -> TrainResult:
    """Train one stage on `cfg.distributed.num_workers` Ray Train workers; same arguments and
    result as `tasks.training.train`. Connects to `ray_address` (or RAY_ADDRESS) or starts a local
    Ray unless one is running. With `mlflow_run_id` (a run of the current MLflow store: see
    `tasks.tracking.setup`), this driver logs the per-step metrics (`train/<name>`, every
    `log_every` steps) and the final model folder (artifacts `final/`) to that run once training
    has finished. Call it from the driver, not from inside a Ray task that holds the CPUs its
    workers need."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.distributed import init_ray

    out_dir = Path(out_dir).resolve()
    done = finished_result(out_dir)
    if done is not None:
        return done
    dc = cfg.distributed
    if cfg.batch_size % dc.num_workers:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of distributed.num_workers "
                         f"{dc.num_workers}: every worker takes an equal slice of the global batch")
    if dc.deepspeed:
        deepspeed_config(dc.deepspeed, cfg)  # a missing or invalid JSON fails here, on the driver
    root = str(Path(data_root).resolve()) if data_root else str(Path.cwd())
    if pairs is None:  # catalog sources are streamed here, once, into their JSONL cache: not by every worker
        from tasks.data.catalog import materialise

        for src in cfg.data:
            if src.catalog is not None:
                materialise(src, root, skip_bad_rows=src.skip_bad_lines)
    init_ray(ray_address)
    backend = dc.backend if dc.backend != "auto" else ("nccl" if dc.use_gpu else "gloo")
    config = {
        "cfg": cfg, "model_cfg": _absolute_model(model_cfg), "init": _absolute(init), "out_dir": str(out_dir),
        "pairs": pairs, "data_root": root,
        "stop_after": stop_after, "threads": max(1, int(dc.resources_per_worker.get("CPU", 1))),
    }
    # Ray Train runs the training function in a thread of the worker, and glibc gives a thread its
    # own malloc arena, whose heaps (64 MB at most) are unmapped as soon as they empty: each step's
    # tensors land in fresh pages again (smol preset: 15-30 % more page faults, 1.5-1.8x the kernel
    # time, 3-6 % of a step). With one arena the thread allocates as one process's main thread does.
    worker_env = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                     resources_per_worker=dict(dc.resources_per_worker)),
        # Ray Train's run folder is the trainer's checkpoints/ folder: reported checkpoints are the
        # step-N folders rank 0 wrote there (no copy); pruning is save_checkpoint's (keep_checkpoints).
        run_config=RunConfig(name="checkpoints", storage_path=str(out_dir),
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": worker_env}))
    log.info("%s: Ray Train, %d worker(s), %s%s", out_dir, dc.num_workers,
             f"DeepSpeed {dc.deepspeed}" if dc.deepspeed else f"DDP ({backend})",
             ", gathered in-batch negatives" if dc.gather_negatives and cfg.objective == "embedding" else "")
    _fit(trainer)
    final = out_dir / "final"
    if not (final / "train_summary.json").is_file():
        raise RuntimeError(f"{out_dir}: Ray Train finished but rank 0 wrote no final/train_summary.json")
    summary = json.loads((final / "train_summary.json").read_text())
    result = TrainResult(out_dir, final, [Path(c) for c in summary["checkpoints"]], read_history(out_dir),
                         summary["seconds_per_step"], summary["peak_memory_mb"],
                         resumed_from=summary["resumed_from"])
    if mlflow_run_id:
        from tasks.tracking import log_artifacts, log_history

        log_history(mlflow_run_id, [r for r in result.history if r["step"] % cfg.log_every == 0])
        log_artifacts(mlflow_run_id, final, "final")
    return result


def _fit(trainer) -> None:
    """trainer.fit(), re-raising a worker's own exception (rank 0's first) instead of Ray's wrapper."""
    from ray.train import WorkerGroupError

    try:
        trainer.fit()
    except WorkerGroupError as e:
        rank, err = min(e.worker_failures.items())
        if isinstance(err, (TrainingInterrupted, DeepSpeedUnavailable, ValueError, FileNotFoundError)):
            raise err from e  # (ConfigError is a ValueError)
        raise RuntimeError(f"training worker {rank} failed: {err}") from e


def _absolute(path: str | Path | None) -> str | None:
    """Workers do not share the driver's working directory: relative paths become absolute."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _absolute_model(model_cfg: ModelConfig | str) -> ModelConfig | str:
    if isinstance(model_cfg, ModelConfig):
        return model_cfg.model_copy(update={"backbone": _absolute(model_cfg.backbone)})
    return _absolute(model_cfg)
