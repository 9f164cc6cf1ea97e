"""The step loop, one for every stage (stage-1 pre-training, stage-2 SFT, reranker SFT) and every
engine (one process, Ray Train DDP, DeepSpeed); stages differ by their `TrainConfig`, never by code.

- data order: a seeded permutation per epoch over all pairs (`batch_indices`), or with
  `sampling.mode: task_balanced` one task type per batch (sampling.py); either way batch b is a
  pure function of (seed, b), so a resumed run sees exactly the batches of the uninterrupted run;
- schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr` (engines.lr_lambda);
- checkpoints every `checkpoint_every` steps (checkpoint.py); a run resumes from the newest one;
- on N workers rank 0 writes the history, the checkpoints and `final/`.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks.config import ModelConfig, TrainConfig
from tasks.data import Pair, atomic_write_text, load_sources
from tasks.models import Embedder, Reranker, freeze_embeddings, freeze_layers, resolve_model_config
from tasks.training.checkpoint import fsync_tree, list_checkpoints
from tasks.training.engines import Engine, LocalEngine
from tasks.training.history import append_history, plot_history, read_history, step_record, write_history
from tasks.training.sampling import batch_sampler
from tasks.training.steps import config_at_step, embedding_batch, embedding_step, reranker_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    final: Path                      # the trained model folder (loadable by Embedder/Reranker.load)
    checkpoints: list[Path]          # model folders of the kept checkpoints, oldest first
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float = 0.0
    peak_memory_mb: float = 0.0
    resumed_from: int = 0
    skipped: bool = False            # everything was already there


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"training stopped after step {step} (stop_after)")
        self.step = step

    def __reduce__(self):  # crosses processes (Ray Train workers): rebuild it from the step
        return TrainingInterrupted, (self.step,)


# The per-step hook of the Ray Train workers: (the step's metrics, the checkpoint folder this
# worker wrote or None, whether the step was a checkpoint step).
OnStep = Callable[[dict, Path | None, bool], None]


def train_local(cfg: TrainConfig, model_cfg: ModelConfig | str, out_dir: str | Path, *,
                init: str | Path | None = None, pairs: list[Pair] | None = None,
                data_root: str | Path | None = None, progress: bool = True, device=None,
                stop_after: int | None = None) -> TrainResult:
    """`train` in this process (arguments: see `tasks.training.train`)."""
    out_dir = Path(out_dir)
    done = finished_result(out_dir)
    if done is not None:
        return done
    if pairs is None:
        pairs = load_sources(cfg.data, data_root)
    if not pairs:
        raise ValueError(f"{out_dir}: no training pairs (data: {[d.path for d in cfg.data]})")
    torch.manual_seed(cfg.seed)
    engine = LocalEngine(load_model(cfg, model_cfg, init, device), cfg)
    return fit(engine, cfg, pairs, out_dir, batch_size_for(len(pairs), cfg.batch_size, 1, out_dir),
               progress=progress, stop_after=stop_after)


def fit(engine: Engine, cfg: TrainConfig, pairs: list[Pair], out_dir: Path, batch_size: int, *,
        progress: bool = False, stop_after: int | None = None, on_step: OnStep | None = None) -> TrainResult | None:
    """Resume from the newest checkpoint and run the optimizer steps up to `cfg.steps` on `engine`;
    the result on rank 0 (None on the other workers). `stop_after` stops (as if interrupted) after
    that many steps: for tests of resumption. `batch_size` = the global batch."""
    from tqdm.auto import tqdm

    start, history = engine.resume(out_dir)
    writer = engine.rank == 0
    if writer:
        write_history(out_dir, history)  # drop lines of steps after the checkpoint (a crashed run's)
    n = len(pairs)
    batch_of = batch_sampler(cfg.sampling, pairs, batch_size, cfg.seed)
    step_times: list[float] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {out_dir.name}", unit="step")
    with bar:  # closed however the loop ends, so an error line starts on a line of its own
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            engine.zero_grad()
            loss_sum, count, n_pairs = 0.0, 0, 0
            for micro in range(cfg.grad_accum):
                b = step * cfg.grad_accum + micro
                chunk = [pairs[i] for i in batch_of(b)]
                n_pairs += len(chunk)
                sync = micro == cfg.grad_accum - 1  # gradients are all-reduced in the last micro-batch
                if cfg.objective == "embedding":
                    eb = embedding_batch(chunk, cfg.hard_negatives, cfg.seed, b)
                    loss = embedding_step(engine, eb, config_at_step(cfg, step), 1.0 / cfg.grad_accum, sync=sync)
                    count += eb.num_texts
                else:
                    loss, tokens = reranker_step(engine, chunk, cfg, cfg.seed, b, 1.0 / cfg.grad_accum, sync=sync)
                    count += tokens
                loss_sum += loss / cfg.grad_accum
            grad_norm, lr = engine.step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            rec = step_record(cfg, step + 1, loss_sum, lr, grad_norm, dt, n_pairs, count)
            history.append(rec)
            if writer:
                append_history(out_dir, rec)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", pairs_s=f"{n_pairs / dt:.1f}")
            bar.update(1)
            due = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            ckpt = engine.save_checkpoint(out_dir, step + 1, history) if due else None
            if on_step is not None:
                on_step(rec, ckpt, due)
            if stop_after is not None and step + 1 - start >= stop_after and step + 1 < cfg.steps:
                raise TrainingInterrupted(step + 1)
    with engine.full_weights():
        return write_final(engine.model, out_dir, cfg, history, n, step_times, start) if writer else None


def load_model(cfg: TrainConfig, model_cfg: ModelConfig | str, init: str | Path | None, device=None):
    """The model a stage trains, in training mode: `init` if given, else `model_cfg`'s backbone."""
    mcfg = resolve_model_config(init) if init is not None else resolve_model_config(model_cfg)
    cls = Embedder if cfg.objective == "embedding" else Reranker
    model = cls.load(mcfg, device=device, lora=cfg.lora)
    if cfg.freeze_layers:
        freeze_layers(model.backbone, cfg.freeze_layers)
    elif cfg.freeze_embeddings:
        freeze_embeddings(model.backbone)
    too_big = [d for d in cfg.loss.mrl_dims if d > getattr(model, "hidden_size", d)]
    if cfg.objective == "embedding" and too_big:
        raise ValueError(f"loss.mrl_dims {too_big} larger than the model's hidden size {model.hidden_size}")
    model.train()
    return model


def batch_size_for(n: int, batch_size: int, world: int, out_dir: Path) -> int:
    """The global batch: `batch_size` (a multiple of `world`), or the largest multiple of `world`
    <= n when there are fewer pairs (a batch would hold the same pairs several times: in-batch
    negatives gain nothing); each worker takes batch / world."""
    if n >= batch_size:
        return batch_size
    if n < world:
        raise ValueError(f"{out_dir}: {n} training pairs cannot feed {world} workers")
    smaller = n // world * world
    log.warning("%s: only %d training pairs; batch size %d -> %d", out_dir, n, batch_size, smaller)
    return smaller


def finished_result(out_dir: Path) -> TrainResult | None:
    """The result of a training run whose `final/` is complete, else None."""
    final = out_dir / "final"
    if not (final / "train_summary.json").is_file():
        return None
    summary = json.loads((final / "train_summary.json").read_text())
    log.info("%s: already trained (%d steps), nothing to do", out_dir, summary["steps"])
    return TrainResult(out_dir, final, [Path(p) for p in summary["checkpoints"]],
                       read_history(out_dir), summary["seconds_per_step"], summary["peak_memory_mb"],
                       skipped=True)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_final(model, out_dir: Path, cfg: TrainConfig, history: list[dict], n: int,
                step_times: list[float], start: int) -> TrainResult:
    """Write `out_dir/final` (model, loss plot, train_summary.json) atomically; the run's result."""
    write_history(out_dir, history)
    checkpoints = [c / "model" for c in list_checkpoints(out_dir)][-cfg.keep_checkpoints:]
    sps = float(np.median(step_times)) if step_times else 0.0
    peak = _peak_memory_mb(model.device)
    final = out_dir / "final"
    tmp = final.with_name("final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    plot_history(history, tmp / "loss.png", title=out_dir.name)
    atomic_write_text(tmp / "train_summary.json", json.dumps({
        "steps": cfg.steps, "pairs": n, "seconds_per_step": sps, "peak_memory_mb": peak,
        "checkpoints": [str(c) for c in checkpoints], "resumed_from": start,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
    }, indent=2))
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(out_dir)[: -cfg.keep_checkpoints]:  # the stage is complete: keep_checkpoints
        shutil.rmtree(old, ignore_errors=True)
    return TrainResult(out_dir, final, checkpoints, history, sps, peak, resumed_from=start)
