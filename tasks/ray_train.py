"""Data-parallel training on Ray Train: the recipe of tasks/train.py on N workers (DDP, or DeepSpeed ZeRO-2/3).

Same data order, schedule, seeds, loss and on-disk layout as the single-process trainer, so an
N-worker run trains the model a 1-worker run trains on the same global batch (to float rounding):

- global batch b = `batch_indices(n, b, batch_size, seed)`, as in tasks/train.py; worker r encodes
  the contiguous slice r of it (batch_size / num_workers items);
- cross-device in-batch negatives (`distributed.gather_negatives`, default on): the query, positive
  and hard-negative embeddings of all workers are all-gathered (`gather_with_grad`) with the worker's
  own slice being its local tensors, so the gradient flows through them, and the improved InfoNCE is
  computed on the GLOBAL batch (false-negative mask and same-positive mask on global indices).
  Every worker computes the same loss and back-propagates it into its own slice only: the sum of
  the workers' gradients is the full gradient, hence the loss is scaled by world_size, because DDP
  (and ZeRO) average gradients across workers. Off = each worker's slice is its own batch (what
  plain DDP gives): N times fewer in-batch negatives;
- GradCache (`mini_batch_size`): the no-grad embeddings are gathered, the gradient of the global
  loss w.r.t. them is taken, and each worker re-encodes its slice chunk by chunk with its share of
  that gradient. Gradients are all-reduced once per optimizer step, in its last backward pass;
- reranker: the examples of the global batch (built as tasks/train.py builds them), one share per
  worker, each example weighted 1 / (examples in the global batch): the shares add up to the loss;
- checkpoints: rank 0 writes `out_dir/checkpoints/step-N` atomically in the trainer's layout (merge,
  evaluation and resumption read it unchanged). That folder is Ray Train's run folder: the checkpoint
  is registered with `ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)`, no copy. A restarted
  worker group (`distributed.max_failures`) and a rerun both resume from the newest checkpoint;
- DeepSpeed (`distributed.deepspeed: zero2 | zero3 | <file.json>`): the JSON (conf/deepspeed/) holds
  the ZeRO settings; batch sizes, precision and clipping are filled in from the TrainConfig at run
  time, and the optimizer and LR schedule stay ours (AdamW + warm-up/cosine, handed to
  `deepspeed.initialize`). `deepspeed` is imported in that branch only.

The training function is launched from the driver (`train_distributed`); inside a Ray task that
holds the cluster's CPUs its workers could never be placed (see `tasks.stages.train_resources`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from tasks.config import CONF_DIR, ConfigError, ModelConfig, TrainConfig
from tasks.data import Pair, atomic_write_text, load_sources
from tasks.losses import reranker_sft_loss
from tasks.models import _pad_left
from tasks.train import (
    EmbeddingBatch, TrainingInterrupted, TrainResult, _append_history, _ckpt_name, _encode_chunks, _read_history,
    batch_indices, build_optimizer, config_at_step, embedding_batch, embedding_loss_from_embeddings, finished_result,
    list_checkpoints, load_model, reranker_examples, resume, save_checkpoint, step_record, write_final,
    write_history,
)

log = logging.getLogger(__name__)

DEEPSPEED_PRESETS = ("zero2", "zero3")


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


def _shard(batch: EmbeddingBatch, lo: int, hi: int) -> EmbeddingBatch:
    return EmbeddingBatch(batch.queries[lo:hi], batch.positives[lo:hi], batch.negatives[lo:hi],
                          batch.same_pos[lo:hi, lo:hi])


def embedding_shard_step(replica: Replica, batch: EmbeddingBatch, cfg: TrainConfig, scale: float, rank: int,
                         world: int, *, sync: bool) -> float:
    """This worker's forward + backward of the global batch `batch`; returns the loss (the global
    batch's with gathered negatives, else the mean of the workers' own-slice losses).

    Every worker runs the same number of forward/backward passes (ZeRO's collectives need it): the
    hard negatives are padded to the largest worker's count with empty texts, dropped after encoding.
    `sync` = this is the optimizer step's last micro-batch: gradients are all-reduced in its last pass.
    """
    model = replica.module
    mc = model.cfg
    per = len(batch.queries) // world
    lo, hi = rank * per, (rank + 1) * per
    neg_counts = [sum(len(x) for x in batch.negatives[r * per:(r + 1) * per]) for r in range(world)]
    local_negs = [t for negs in batch.negatives[lo:hi] for t in negs]
    local_negs += [""] * (max(neg_counts) - len(local_negs))
    groups = [(batch.queries[lo:hi], mc.max_query_length, [per] * world),
              (batch.positives[lo:hi], mc.max_doc_length, [per] * world),
              (local_negs, mc.max_doc_length, neg_counts)]
    gather = cfg.distributed.gather_negatives
    # DDP/ZeRO average the workers' gradients: with gathering each worker holds only its share of
    # the one global loss, so undo the average; without, the average of the own-slice losses is the loss.
    factor = world if gather else 1

    def loss_of(embs: list[Tensor]) -> Tensor:
        sizes = [s for _, _, s in groups]
        if gather:
            return embedding_loss_from_embeddings(*map(gather_with_grad, embs, sizes), batch, cfg)
        return embedding_loss_from_embeddings(*[e[: s[rank]] for e, s in zip(embs, sizes)],
                                              _shard(batch, lo, hi), cfg)

    chunk = cfg.mini_batch_size
    if chunk is None:
        with replica.synced(sync):
            embs = [replica.encode(texts, ml) if texts else _empty(model) for texts, ml, _ in groups]
            loss = loss_of(embs)
            replica.backward(loss * (scale * factor))
        return _mean_over_workers(loss.detach(), world, gather)
    # GradCache: 1) embeddings without graph, 2) loss + grads w.r.t. them, 3) re-encode with graph.
    with torch.no_grad():
        cached = [_encode_chunks(model, texts, ml, chunk) for texts, ml, _ in groups]
    leaves = [c.detach().requires_grad_(True) for c in cached]
    loss = loss_of(leaves)
    grads = torch.autograd.grad(loss * (scale * factor), leaves, allow_unused=True)
    jobs = []
    for (texts, ml, _), leaf, g in zip(groups, leaves, grads):
        g = torch.zeros_like(leaf) if g is None else g  # fillers and unused terms: zero gradient
        jobs += [(texts[i: i + chunk], ml, g[i: i + chunk]) for i in range(0, len(texts), chunk)]
    for j, (texts, ml, g) in enumerate(jobs):
        with replica.synced(sync and j == len(jobs) - 1):
            replica.backward(replica.encode(texts, ml), g)
    return _mean_over_workers(loss.detach(), world, gather)


def _empty(model) -> Tensor:
    return torch.zeros(0, model.hidden_size, device=model.device)


def _mean_over_workers(loss: Tensor, world: int, same_everywhere: bool) -> float:
    if same_everywhere or world == 1:
        return float(loss)
    total = loss.clone()
    dist.all_reduce(total)
    return float(total) / world


def reranker_shard_step(replica: Replica, pairs: Sequence[Pair], cfg: TrainConfig, seed: int, batch: int,
                        scale: float, rank: int, world: int, *, sync: bool) -> tuple[float, int]:
    """This worker's share of the global batch's yes/no SFT loss; returns (the global loss, tokens).

    The examples are the single-process trainer's (`reranker_examples` on the global batch); worker r
    takes the r-th of `world` equal shares, padded with weight-0 copies so that every worker runs the
    same number of passes. Each real example weighs 1 / len(all examples): the shares sum to the mean.
    """
    model = replica.module
    examples, labels = reranker_examples(pairs, cfg.hard_negatives, seed, batch)
    total = len(examples)
    share = -(-total // world)
    mine = list(zip(examples, labels))[rank * share:(rank + 1) * share]
    real = len(mine)
    mine += [(examples[0], labels[0])] * (share - real)  # fillers: forward/backward with weight 0
    chunk = cfg.mini_batch_size or share
    loss_sum = torch.zeros((), device=model.device)
    tokens = 0
    starts = list(range(0, share, chunk))
    for j, i in enumerate(starts):
        part = mine[i: i + chunk]
        ids = [x for (q, d, instr), _ in part for x in model.token_ids([q], [d], instr)]
        input_ids, mask = _pad_left(ids, model.pad_id, model.device)
        m = max(0, min(len(part), real - i))  # real examples in this chunk (fillers come last)
        tokens += int(mask[:m].sum())
        with replica.synced(sync and j == len(starts) - 1):
            logits = replica.logits(input_ids, mask)
            if m:
                y = torch.tensor([lab for _, lab in part[:m]], device=logits.device)
                loss = reranker_sft_loss(logits[:m], y, model.yes_id, model.no_id,
                                         two_token=cfg.two_token) * (m / total)
            else:
                loss = logits.sum() * 0.0
            replica.backward(loss * (scale * world))
        loss_sum += loss.detach()
    out = torch.stack([loss_sum, torch.tensor(float(tokens), device=loss_sum.device)])
    if world > 1:
        dist.all_reduce(out)
    return float(out[0]), int(out[1])


# ----------------------------------------------------------------------------- engines

class DDPReplica:
    """The model under torch DistributedDataParallel (gloo on CPU, nccl on GPU).

    Passes run inside `synced(False)` accumulate gradients locally (DDP's no_sync); the pass run
    inside `synced(True)` all-reduces (averages) them in its backward: one all-reduce per step,
    whatever the number of GradCache chunks and micro-batches."""

    def __init__(self, model, cfg: TrainConfig, out_dir: Path, rank: int):
        from torch.nn.parallel import DistributedDataParallel

        self.module, self.cfg, self.out_dir, self.rank = model, cfg, out_dir, rank
        self.params, self.optimizer, self.scheduler = build_optimizer(model, cfg)
        self.start, self.history = resume(model, self.optimizer, self.scheduler, out_dir, cfg)
        device = model.device
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def synced(self, sync: bool):
        return contextlib.nullcontext() if sync else self.ddp.no_sync()

    def encode(self, texts: list[str], max_length: int) -> Tensor:
        return self.ddp(**self.module.tokenize(texts, max_length))

    def logits(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.ddp(input_ids, mask)

    def backward(self, out: Tensor, grad: Tensor | None = None) -> None:
        out.backward(grad)

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

    def save_checkpoint(self, step: int, history: list[dict]) -> Path | None:
        if self.rank != 0:
            return None
        return save_checkpoint(self.module, self.optimizer, self.scheduler, self.out_dir, step, self.cfg, history)

    def full_weights(self):
        return contextlib.nullcontext()


class DeepSpeedReplica:
    """The model under a DeepSpeed engine (ZeRO-2: optimizer state and gradients partitioned;
    ZeRO-3: parameters too). Every pass goes through the engine, `synced` sets the gradient
    accumulation boundary (ZeRO communicates in every pass, so all workers run the same passes),
    and `step` is the engine's (clipping from `gradient_clipping`, then our LR schedule).

    Checkpoint = the trainer's layout (`model/`, `state.json`) plus `deepspeed/`, the engine's own
    partitioned optimizer state, written by every worker: the run folder must be on storage that all
    workers see, as for any multi-node run of this project."""

    TAG = "state"

    def __init__(self, model, cfg: TrainConfig, out_dir: Path, rank: int, ds_config: dict):
        deepspeed = import_deepspeed(cfg)
        self.module, self.cfg, self.out_dir, self.rank = model, cfg, out_dir, rank
        self.deepspeed = deepspeed
        _, optimizer, scheduler = build_optimizer(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.start, self.history = 0, []
        existing = list_checkpoints(out_dir)
        if existing:
            ckpt = existing[-1]
            path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag=self.TAG)
            if path is None:
                raise RuntimeError(f"{ckpt}: no DeepSpeed state in it (was it written by the DDP engine? "
                                   "resume it with distributed.deepspeed: null)")
            meta = json.loads((ckpt / "state.json").read_text())
            self.start, self.history = meta["step"], _read_history(out_dir)[: meta["history_len"]]
            log.info("%s: resuming from %s (step %d of %d)", out_dir, ckpt.name, self.start, cfg.steps)

    @contextlib.contextmanager
    def synced(self, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def encode(self, texts: list[str], max_length: int) -> Tensor:
        return self.engine(**self.module.tokenize(texts, max_length))

    def logits(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        return self.engine(input_ids, mask)

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
        return self.deepspeed.zero.GatheredParameters(list(self.module.parameters()), enabled=zero3)

    def save_checkpoint(self, step: int, history: list[dict]) -> Path | None:
        final = self.out_dir / "checkpoints" / _ckpt_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag=self.TAG, save_latest=False)
        with self.full_weights():
            if self.rank == 0:
                self.module.save(tmp / "model", extra={"step": step})
        dist.barrier()  # every worker's shard is on disk before the folder becomes visible
        if self.rank != 0:
            return None
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, "history_len": len(history)}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final


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


Replica = DDPReplica | DeepSpeedReplica  # the model as one worker trains it


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


# ----------------------------------------------------------------------------- the worker loop

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
    n = len(pairs)
    batch_size = shard_batch_size(n, cfg.batch_size, world, out_dir)
    cfg = cfg.model_copy(update={"batch_size": batch_size})

    if cfg.distributed.deepspeed:
        import_deepspeed(cfg)  # before loading a model it could not train
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, config["model_cfg"], config["init"], ray.train.torch.get_device())
    if cfg.distributed.deepspeed:
        ds = deepspeed_config(cfg.distributed.deepspeed, cfg, world, next(model.parameters()).dtype)
        replica = DeepSpeedReplica(model, cfg, out_dir, rank, ds)
    else:
        replica = DDPReplica(model, cfg, out_dir, rank)
    start, history = replica.start, replica.history
    writer = rank == 0
    if writer:
        write_history(out_dir, history)  # drop lines of steps after the checkpoint (a crashed run's)
    mlflow_run = _mlflow(config) if writer else None

    step_times: list[float] = []
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        replica.zero_grad()
        loss_sum, count, n_pairs = 0.0, 0, 0
        for micro in range(cfg.grad_accum):
            b = step * cfg.grad_accum + micro
            chunk = [pairs[i] for i in batch_indices(n, b, batch_size, cfg.seed)]
            n_pairs += len(chunk)
            last = micro == cfg.grad_accum - 1
            if cfg.objective == "embedding":
                eb = embedding_batch(chunk, cfg.hard_negatives, cfg.seed, b)
                loss_sum += embedding_shard_step(replica, eb, config_at_step(cfg, step), 1.0 / cfg.grad_accum, rank, world,
                                                 sync=last) / cfg.grad_accum
                count += eb.num_texts
            else:
                loss, tok = reranker_shard_step(replica, chunk, cfg, cfg.seed, b, 1.0 / cfg.grad_accum, rank,
                                                world, sync=last)
                loss_sum += loss / cfg.grad_accum
                count += tok
        grad_norm, lr = replica.step()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        rec = step_record(cfg, step + 1, loss_sum, lr, grad_norm, dt, n_pairs, count)
        history.append(rec)
        if writer:
            _append_history(out_dir, rec)
            if (step + 1) % cfg.log_every == 0:
                log.info("%s step %d/%d: loss %.4f, lr %.2e, %.1f pairs/s", out_dir.name, step + 1, cfg.steps,
                         loss_sum, lr, n_pairs / dt)
                if mlflow_run:
                    mlflow_run.log_metrics({f"train/{k}": v for k, v in rec.items() if k != "step"}, step + 1)
        ckpt_step = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        ckpt = replica.save_checkpoint(step + 1, history) if ckpt_step else None
        ray.train.report(
            rec,
            checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None,
            checkpoint_dir_name=_ckpt_name(step + 1) if ckpt_step else None,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        stop_after = config["stop_after"]
        if stop_after is not None and step + 1 - start >= stop_after and step + 1 < cfg.steps:
            raise TrainingInterrupted(step + 1)

    with replica.full_weights():
        if writer:
            result = write_final(model, out_dir, cfg, history, n, step_times, start)
    if writer and mlflow_run:
        mlflow_run.log_final(result.final)


class _MLflowRun:
    """Rank 0's MLflow logging (one writer: SQLite stores take one)."""

    def __init__(self, run_id: str, tracking_uri: str | None):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from tasks.tracking import log_metrics

        log_metrics(self.run_id, metrics, step)

    def log_final(self, final: Path) -> None:
        import mlflow

        mlflow.MlflowClient().log_artifacts(self.run_id, str(final), artifact_path="final")


def _mlflow(config: dict) -> _MLflowRun | None:
    return _MLflowRun(config["mlflow_run_id"], config["tracking_uri"]) if config["mlflow_run_id"] else None


def shard_batch_size(n: int, batch_size: int, world: int, out_dir: Path) -> int:
    """The global batch: `batch_size` (a multiple of `world`), or the largest multiple of `world`
    <= n when there are fewer pairs (a batch would hold pairs twice); each worker takes batch / world."""
    if n >= batch_size:
        return batch_size
    if n < world:
        raise ValueError(f"{out_dir}: {n} training pairs cannot feed {world} workers")
    smaller = n // world * world
    log.warning("%s: only %d training pairs; batch size %d -> %d", out_dir, n, batch_size, smaller)
    return smaller


# ----------------------------------------------------------------------------- the driver

def train_distributed(cfg: TrainConfig, model_cfg: ModelConfig | str, out_dir: str | Path, *,
                      init: str | Path | None = None, pairs: list[Pair] | None = None,
                      data_root: str | Path | None = None, stop_after: int | None = None,
                      ray_address: str | None = None, mlflow_run_id: str | None = None,
                      tracking_uri: str | None = None) -> TrainResult:
    """Train one stage on `cfg.distributed.num_workers` Ray Train workers; same arguments and
    result as `tasks.train.train`. Connects to `ray_address` (or RAY_ADDRESS) or starts a local
    Ray unless one is running. With `mlflow_run_id`, rank 0 logs the per-step metrics and the
    final model folder (artifacts `final/`) to that run. Call it from the driver, not from inside
    a Ray task that holds the CPUs its workers need."""
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
    init_ray(ray_address)
    backend = dc.backend if dc.backend != "auto" else ("nccl" if dc.use_gpu else "gloo")
    config = {
        "cfg": cfg, "model_cfg": _absolute_model(model_cfg), "init": _absolute(init), "out_dir": str(out_dir),
        "pairs": pairs, "data_root": str(Path(data_root).resolve()) if data_root else str(Path.cwd()),
        "stop_after": stop_after, "threads": max(1, int(dc.resources_per_worker.get("CPU", 1))),
        "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
    }
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                     resources_per_worker=dict(dc.resources_per_worker)),
        # Ray Train's run folder is the trainer's checkpoints/ folder: reported checkpoints are the
        # step-N folders rank 0 wrote there (no copy); pruning is save_checkpoint's (keep_checkpoints).
        run_config=RunConfig(name="checkpoints", storage_path=str(out_dir),
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)))
    log.info("%s: Ray Train, %d worker(s), %s%s", out_dir, dc.num_workers,
             f"DeepSpeed {dc.deepspeed}" if dc.deepspeed else f"DDP ({backend})",
             ", gathered in-batch negatives" if dc.gather_negatives and cfg.objective == "embedding" else "")
    _fit(trainer)
    final = out_dir / "final"
    if not (final / "train_summary.json").is_file():
        raise RuntimeError(f"{out_dir}: Ray Train finished but rank 0 wrote no final/train_summary.json")
    summary = json.loads((final / "train_summary.json").read_text())
    return TrainResult(out_dir, final, [Path(c) for c in summary["checkpoints"]], _read_history(out_dir),
                       summary["seconds_per_step"], summary["peak_memory_mb"], resumed_from=summary["resumed_from"])


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
