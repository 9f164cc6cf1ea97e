"""Engines: what differs between training in one process, on N DDP workers and under DeepSpeed.

The step functions (steps.py) and the step loop (loop.py) are written once against this interface:

    rank, world                     this worker and the number of workers (0, 1 in one process)
    model                           the bare Embedder / Reranker (tokenizer, config, save)
    forward(input_ids, mask)        a pass with gradient, through the DDP / DeepSpeed wrapper
    synced(sync)                    context: gradients are all-reduced in a backward run inside it
                                    only when sync (DDP's no_sync, DeepSpeed's accumulation boundary)
    backward(out, grad)             out.backward(grad), or the DeepSpeed engine's backward
    gather(local, sizes)            every worker's rows, the gradient reaching the local ones
    mean_over_workers, sum_over_workers    reductions of what a step reports
    zero_grad(), step()             clip, optimizer step, LR schedule; returns (grad norm, lr)
    resume(out_dir), save_checkpoint(out_dir, step, history), full_weights()

`LocalEngine` is one process and holds the common parts (AdamW, the schedule, clipping, the
checkpoint format); `DDPEngine` and `DeepSpeedEngine` change what their backend changes.
`deepspeed` is imported in the DeepSpeed branch only, never on the CPU path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from tasks.config import CONF_DIR, ConfigError, TrainConfig
from tasks.data import atomic_write_text
from tasks.training.checkpoint import checkpoint_name, list_checkpoints, resume, save_checkpoint
from tasks.training.history import read_history

log = logging.getLogger(__name__)

DEEPSPEED_PRESETS = ("zero2", "zero3")


# ----------------------------------------------------------------------------- optimizer and schedule

def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr`."""
    warmup = int(round(cfg.warmup_ratio * cfg.steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(model, cfg: TrainConfig):
    """(trainable params, AdamW without weight decay on biases/norms, warm-up + cosine LambdaLR)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.adam_betas)
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


# ----------------------------------------------------------------------------- cross-device negatives

def gather_with_grad(local: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Every worker's `local` [m, ...] concatenated in rank order; the gradient reaches `local` only.

    The other workers' rows are copies without gradient; this worker's rows ARE `local` (the usual
    `gathered[rank] = local` trick), so a loss on the result back-propagates into this worker's
    encoder, and each worker's backward covers exactly its own rows. `sizes[r]` = how many of worker
    r's m rows are real (the rest is padding that all_gather's equal shapes need): the result has
    sum(sizes) rows. Needs an initialised torch.distributed process group; `local` must have the
    same shape on every worker.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = list(sizes) if sizes is not None else [local.shape[0]] * world
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for {world} workers")
    if max(sizes) > local.shape[0]:
        raise ValueError(f"sizes {sizes} exceed the {local.shape[0]} rows every worker sends")
    if world == 1 or max(sizes) == 0:  # (all workers see the same sizes: all skip together)
        return local[: sizes[rank]]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[rank] = local
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------- engines

class LocalEngine:
    """One process: the model runs its own passes. With `cfg`, also the optimizer (AdamW + warm-up /
    cosine schedule), clipping and the trainer's checkpoints; without, passes only (the step
    functions called on a bare model)."""

    rank, world = 0, 1

    def __init__(self, model, cfg: TrainConfig | None = None):
        self.model, self.cfg = model, cfg
        if cfg is not None:
            self.params, self.optimizer, self.scheduler = build_optimizer(model, cfg)

    # passes
    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids, mask)

    def synced(self, sync: bool):
        return contextlib.nullcontext()

    def backward(self, out: Tensor, grad: Tensor | None = None) -> None:
        out.backward(grad)

    def gather(self, local: Tensor, sizes: Sequence[int]) -> Tensor:
        return gather_with_grad(local, sizes) if self.world > 1 else local[: sizes[0]]

    def mean_over_workers(self, loss: Tensor, *, same_everywhere: bool) -> float:
        if same_everywhere or self.world == 1:
            return float(loss)
        total = loss.clone()
        dist.all_reduce(total)
        return float(total) / self.world

    def sum_over_workers(self, value: float, count: int) -> tuple[float, int]:
        if self.world == 1:
            return value, count
        out = torch.tensor([value, float(count)], dtype=torch.float64, device=self.model.device)
        dist.all_reduce(out)
        return float(out[0]), int(out[1])

    # the optimizer step
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule; returns (gradient norm, the step's learning rate)."""
        cfg = self.cfg
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)) if cfg.max_grad_norm \
            else float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm, lr

    # checkpoints
    def resume(self, out_dir: Path) -> tuple[int, list[dict]]:
        return resume(self.model, self.optimizer, self.scheduler, out_dir, self.cfg)

    def save_checkpoint(self, out_dir: Path, step: int, history: list[dict]) -> Path | None:
        if self.rank != 0:
            return None
        return save_checkpoint(self.model, self.optimizer, self.scheduler, out_dir, step, self.cfg, history)

    def full_weights(self):
        """Context in which the model holds all of its weights (ZeRO-3 partitions them)."""
        return contextlib.nullcontext()


class DDPEngine(LocalEngine):
    """The model under torch DistributedDataParallel (gloo on CPU, nccl on GPU).

    Passes run inside `synced(False)` accumulate gradients locally (DDP's no_sync); the pass run
    inside `synced(True)` all-reduces (averages) them in its backward: one all-reduce per step,
    whatever the number of GradCache chunks and micro-batches. Rank 0 writes the checkpoints.
    One worker has nothing to all-reduce: it runs as one process does, without the DDP wrapper
    (whose bucket copies cost the micro preset ~10 % of a step)."""

    def __init__(self, model, cfg: TrainConfig):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        device = model.device
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if self.world > 1 else None

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.ddp(input_ids, mask) if self.ddp is not None else self.model(input_ids, mask)

    def synced(self, sync: bool):
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()


class DeepSpeedUnavailable(RuntimeError):
    """`distributed.deepspeed` is set but the deepspeed package cannot be imported on a worker."""


def import_deepspeed(cfg: TrainConfig):
    """The deepspeed module; imported here only, never on the DDP path."""
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedUnavailable(
            f"distributed.deepspeed={cfg.distributed.deepspeed!r} needs the deepspeed package on every "
            f"training worker, and it cannot be imported here ({e}). Install it (pip install deepspeed; GPU "
            "workers) or set distributed.deepspeed: null to train with DDP.") from e
    return deepspeed


class DeepSpeedEngine(LocalEngine):
    """The model under a DeepSpeed engine (ZeRO-2: optimizer state and gradients partitioned;
    ZeRO-3: parameters too). Every pass goes through the engine, `synced` sets the gradient
    accumulation boundary (ZeRO communicates in every pass, so all workers run the same passes),
    and `step` is the engine's (clipping from `gradient_clipping`, then our LR schedule).

    Checkpoint = the trainer's layout (`model/`, `state.json`) plus `deepspeed/`, the engine's own
    partitioned optimizer state, written by every worker: the run folder must be on storage that all
    workers see, as for any multi-node run of this project."""

    TAG = "state"

    def __init__(self, model, cfg: TrainConfig, ds_config: dict):
        self.deepspeed = import_deepspeed(cfg)
        super().__init__(model, cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.engine(input_ids, mask)

    @contextlib.contextmanager
    def synced(self, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, out: Tensor, grad: Tensor | None = None) -> None:
        # engine.backward takes a scalar: sum(out * grad) has the gradient `grad` w.r.t. out
        self.engine.backward(out if grad is None else (out * grad).sum())

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self) -> tuple[float, float]:
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), lr

    def full_weights(self):
        """ZeRO-3 keeps 1/N of each parameter per worker: gather them (all workers) to save the model."""
        zero3 = self.engine.zero_optimization_stage() == 3
        return self.deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=zero3)

    def resume(self, out_dir: Path) -> tuple[int, list[dict]]:
        existing = list_checkpoints(out_dir)
        if not existing:
            return 0, []
        ckpt = existing[-1]
        path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag=self.TAG)
        if path is None:
            raise RuntimeError(f"{ckpt}: no DeepSpeed state in it (was it written by the DDP engine? "
                               "resume it with distributed.deepspeed: null)")
        meta = json.loads((ckpt / "state.json").read_text())
        log.info("%s: resuming from %s (step %d of %d)", out_dir, ckpt.name, meta["step"], self.cfg.steps)
        return meta["step"], read_history(out_dir)[: meta["history_len"]]

    def save_checkpoint(self, out_dir: Path, step: int, history: list[dict]) -> Path | None:
        final = out_dir / "checkpoints" / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag=self.TAG, save_latest=False)
        with self.full_weights():
            if self.rank == 0:
                self.model.save(tmp / "model", extra={"step": step})
        dist.barrier()  # every worker's shard is on disk before the folder becomes visible
        if self.rank != 0:
            return None
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, "history_len": len(history)}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def deepspeed_config(spec: str, cfg: TrainConfig, world: int | None = None,
                     dtype: torch.dtype | None = None) -> dict:
    """The DeepSpeed JSON named by `spec` (zero2 / zero3 = conf/deepspeed/<spec>.json, else a file),
    with what our trainer decides filled in: the per-worker micro-batch (batch_size / world), one
    accumulation step per optimizer step (the trainer accumulates and sets the boundary itself),
    bf16/fp16 from the model's dtype, `gradient_clipping` from max_grad_norm. The optimizer and the
    LR schedule are ours: a JSON with `optimizer` or `scheduler` sections is refused."""
    path = CONF_DIR / "deepspeed" / f"{spec}.json" if spec in DEEPSPEED_PRESETS else Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (distributed.deepspeed={spec!r})")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(ds, dict) or "zero_optimization" not in ds:
        raise ConfigError(f"{path}: expected a DeepSpeed config object with a zero_optimization section")
    ours = [k for k in ("optimizer", "scheduler") if k in ds]
    if ours:
        raise ConfigError(f"{path}: remove {ours}: the optimizer (AdamW) and the LR schedule (warm-up + cosine) "
                          "come from the TrainConfig (lr, weight_decay, warmup_ratio, min_lr_ratio)")
    ds = copy.deepcopy(ds)
    if world is not None:
        ds.pop("train_batch_size", None)
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // world
        ds["gradient_accumulation_steps"] = 1
    if dtype is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == torch.float16}
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0
    return ds


Engine = LocalEngine | DDPEngine | DeepSpeedEngine  # the model as one worker trains it
