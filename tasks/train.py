"""One training loop for every stage of the recipe: stage-1 pre-training, stage-2 SFT, reranker SFT.

Stages differ by their `TrainConfig` (data, objective, loss switches, steps), never by code.

- data order: a seeded permutation per epoch over all pairs, so batch b is a pure function of
  (seed, b) and a resumed run sees exactly the batches the uninterrupted run would have;
- schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`;
- checkpoints every `checkpoint_every` steps: model (safetensors, loadable on its own), LoRA
  adapter if any, optimizer/scheduler/RNG state; written into a temporary folder and renamed, so
  a crash mid-write leaves the previous checkpoint intact; `train` resumes from the newest one;
- GradCache (`mini_batch_size`): embeddings are first computed without gradient in chunks, the
  loss gradient w.r.t. the embeddings is taken on the full batch, then each chunk is re-encoded
  with gradient and back-propagated with that cached gradient: the in-batch negatives of a large
  batch at the memory cost of one chunk, with the same loss and gradients.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tasks.config import ModelConfig, TrainConfig
from tasks.data import Pair, atomic_write_text, honour_umask, load_sources
from tasks.diskspace import DiskSpaceError, ensure_free_space
from tasks.losses import mrl_infonce, improved_infonce, reranker_sft_loss
from tasks.models import Embedder, Reranker, _model_config, _pad_left, format_query

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


# ----------------------------------------------------------------------------- data order

def batch_indices(n: int, batch: int, size: int, seed: int) -> list[int]:
    """Indices of batch `batch` (of `size` items) in an endless stream of per-epoch permutations."""
    out = []
    for k in range(batch * size, (batch + 1) * size):
        epoch, pos = divmod(k, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perm[pos]))
    return out


def sample_negatives(pair: Pair, k: int, seed: int, batch: int, slot: int) -> list[str]:
    if k == 0 or not pair.negatives:
        return []
    if len(pair.negatives) <= k:
        return list(pair.negatives)
    rng = np.random.default_rng([seed, batch, slot, 7])
    return [pair.negatives[i] for i in sorted(rng.choice(len(pair.negatives), size=k, replace=False))]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * cfg.steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# ----------------------------------------------------------------------------- losses on a batch

@dataclass
class EmbeddingBatch:
    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    same_pos: torch.Tensor  # [N, N] bool

    @property
    def num_texts(self) -> int:
        return len(self.queries) + len(self.positives) + sum(len(n) for n in self.negatives)


def embedding_batch(pairs: Sequence[Pair], k: int, seed: int, batch: int) -> EmbeddingBatch:
    queries = [format_query(p.query, p.instruction) for p in pairs]
    positives = [format_query(p.positive, p.instruction) if p.symmetric else p.positive for p in pairs]
    # symmetric pairs (STS, bitext): the instruction goes on every document of the pair, hard
    # negatives included; an instruction on the positive only would let the model score the
    # instruction's presence instead of the content
    negatives = [[format_query(n, p.instruction) for n in sample_negatives(p, k, seed, batch, i)] if p.symmetric
                 else sample_negatives(p, k, seed, batch, i) for i, p in enumerate(pairs)]
    ids = {t: i for i, t in enumerate(dict.fromkeys(positives))}
    pid = torch.tensor([ids[t] for t in positives])
    return EmbeddingBatch(queries, positives, negatives, pid[:, None] == pid[None, :])


LENGTH_BUCKET = 8  # texts per forward pass when a training batch is split by length


def embed_by_length(model: Embedder, texts: list[str], max_length: int, bucket: int | None = None) -> torch.Tensor:
    """`model.embed(texts)` with gradient, in forward passes of `bucket` (default LENGTH_BUCKET;
    0 = one pass) texts of similar token count, returned in the input order. Same embeddings and
    gradients up to float rounding, but short texts are not padded to the batch's longest one
    (the smol preset's stage-2 step: 1.6x faster, 8.4 -> 4.9 GB peak)."""
    bucket = LENGTH_BUCKET if bucket is None else bucket
    if not bucket or len(texts) <= bucket:
        return model.embed(texts, max_length)
    ids = model.token_ids(texts, max_length)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    parts = [model(*_pad_left([ids[i] for i in order[s: s + bucket]], model.pad_id, model.device))
             for s in range(0, len(order), bucket)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def _encode_chunks(model: Embedder, texts: list[str], max_length: int, chunk: int | None) -> torch.Tensor:
    if not texts:
        return torch.zeros(0, model.hidden_size, device=model.device)
    chunk = chunk or len(texts)
    return torch.cat([model.embed(texts[i: i + chunk], max_length) for i in range(0, len(texts), chunk)])


def _assemble_negatives(flat: torch.Tensor, negatives: list[list[str]], k: int):
    """[sum K_i, D] -> ([N, k, D], [N, k] mask) with zero-filled padding slots."""
    n = len(negatives)
    if k == 0 or sum(len(x) for x in negatives) == 0:
        return None, None
    out = flat.new_zeros(n, k, flat.shape[-1])
    mask = torch.zeros(n, k, dtype=torch.bool, device=flat.device)
    pos = 0
    for i, negs in enumerate(negatives):
        m = len(negs)
        if m:
            out[i, :m] = flat[pos: pos + m]
            mask[i, :m] = True
            pos += m
    return out, mask


def embedding_loss_from_embeddings(q, p, nflat, batch: EmbeddingBatch, cfg: TrainConfig) -> torch.Tensor:
    neg, neg_mask = _assemble_negatives(nflat, batch.negatives, cfg.hard_negatives)
    lc = cfg.loss
    kwargs = dict(temperature=lc.temperature, margin=lc.margin, same_pos=batch.same_pos.to(q.device),
                  neg_mask=neg_mask, qq=lc.qq, dd=lc.dd, qd=lc.qd, mask_false_negatives=lc.mask_false_negatives)
    if lc.mrl_dims:
        return mrl_infonce(q, p, neg, dims=lc.mrl_dims, **kwargs)
    return improved_infonce(q, p, neg, **kwargs)


def config_at_step(cfg: TrainConfig, step: int) -> TrainConfig:
    """The training config for optimizer step `step` (0-based): during `loss.plain_warmup_steps`
    the loss is plain q-d InfoNCE (no q-q / d-d terms, no false-negative mask)."""
    if step >= cfg.loss.plain_warmup_steps:
        return cfg
    plain = cfg.loss.model_copy(update={"qq": False, "dd": False, "qd": True, "mask_false_negatives": False})
    return cfg.model_copy(update={"loss": plain})


def embedding_step(model: Embedder, batch: EmbeddingBatch, cfg: TrainConfig, scale: float) -> float:
    """Forward + backward of one (micro-)batch; returns the loss value. GradCache when
    `cfg.mini_batch_size` is set, plain end-to-end backprop otherwise."""
    mc = model.cfg
    flat_negs = [t for negs in batch.negatives for t in negs]
    chunk = cfg.mini_batch_size
    if chunk is None:
        # positives and hard negatives are encoded together (same max length, as MNRL does): one
        # weight-gradient contribution fewer per step, which lowers the backward's peak memory
        q = embed_by_length(model, batch.queries, mc.max_query_length)
        docs = embed_by_length(model, batch.positives + flat_negs, mc.max_doc_length)
        p, n = docs[: len(batch.positives)], docs[len(batch.positives):]
        loss = embedding_loss_from_embeddings(q, p, n, batch, cfg)
        (loss * scale).backward()
        return float(loss.detach())
    # GradCache: 1) embeddings without graph, 2) loss + grads w.r.t. embeddings, 3) re-encode with graph.
    groups = [(batch.queries, mc.max_query_length), (batch.positives, mc.max_doc_length), (flat_negs, mc.max_doc_length)]
    with torch.no_grad():
        cached = [_encode_chunks(model, texts, ml, chunk) for texts, ml in groups]
    leaves = [c.detach().requires_grad_(True) for c in cached]
    loss = embedding_loss_from_embeddings(*leaves, batch, cfg)
    grads = torch.autograd.grad(loss * scale, leaves, allow_unused=True)
    for (texts, ml), g in zip(groups, grads):
        if g is None or not texts:
            continue
        for i in range(0, len(texts), chunk):
            emb = model.embed(texts[i: i + chunk], ml)
            emb.backward(g[i: i + chunk])
    return float(loss.detach())


def reranker_examples(pairs: Sequence[Pair], k: int, seed: int, batch: int) -> tuple[list[tuple[str, str, str | None]], list[int]]:
    """Each query gives its positive ("yes") and up to k negatives ("no"): its own hard negatives,
    topped up with other queries' positives from the batch when it has too few."""
    examples, labels = [], []
    others = [p.positive for p in pairs]
    for i, p in enumerate(pairs):
        examples.append((p.query, p.positive, p.instruction))
        labels.append(1)
        negs = sample_negatives(p, k, seed, batch, i)
        j = 1
        while len(negs) < k and j < len(pairs):
            cand = others[(i + j) % len(pairs)]
            if cand != p.positive and cand not in negs:
                negs.append(cand)
            j += 1
        for n in negs:
            examples.append((p.query, n, p.instruction))
            labels.append(0)
    return examples, labels


def reranker_step(model: Reranker, pairs: Sequence[Pair], cfg: TrainConfig, seed: int, batch: int,
                  scale: float) -> tuple[float, int]:
    """Backward of the yes/no SFT loss (mean over the step's examples), in forward passes of
    `mini_batch_size` (default LENGTH_BUCKET) examples of similar token count: the same loss and
    gradients up to float rounding, but a short NLI pair is not padded to the longest passage."""
    examples, labels = reranker_examples(pairs, cfg.hard_negatives, seed, batch)
    ids = [model.token_ids([q], [d], instr)[0] for q, d, instr in examples]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunk = cfg.mini_batch_size or LENGTH_BUCKET
    total, tokens = 0.0, 0
    for s in range(0, len(order), chunk):
        part = order[s: s + chunk]
        input_ids, mask = _pad_left([ids[i] for i in part], model.pad_id, model.device)
        tokens += int(mask.sum())
        logits = model(input_ids, mask)
        y = torch.tensor([labels[i] for i in part], device=logits.device)
        loss = reranker_sft_loss(logits, y, model.yes_id, model.no_id, two_token=cfg.two_token)
        (loss * scale * len(part) / len(examples)).backward()
        total += float(loss.detach()) * len(part) / len(examples)
    return total, tokens


# ----------------------------------------------------------------------------- checkpoints

def _ckpt_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first; half-written ones are ignored."""
    ckpts = [p for p in (out_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file()
             and not p.name.endswith(".tmp")]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(model, optimizer, scheduler, out_dir: Path, step: int, cfg: TrainConfig,
                    history: list[dict]) -> Path:
    final = out_dir / "checkpoints" / _ckpt_name(step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save(tmp / "model", extra={"step": step})
        if cfg.lora.enabled:
            model.backbone.save_pretrained(tmp / "adapter", safe_serialization=True)
        # AdamW keeps two tensors per trainable parameter
        state_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        ensure_free_space(tmp, state_bytes, "the optimizer state (trainer_state.pt)")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, "history_len": len(history)}))
        honour_umask(tmp)
        fsync_tree(tmp)  # on disk before it is named: a power cut never leaves a named, truncated checkpoint
    except Exception as e:  # safetensors, torch and the OS each report a full disk their own way
        # the disk filled up (or the file size limit was hit) after the free-space check: the partial
        # checkpoint is removed, the previous ones stay, and the error names what was being written
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskSpaceError):
            raise
        if _out_of_space(e):
            raise DiskSpaceError(f"{final}: no space left while writing the checkpoint ({e}); the partial "
                                 f"checkpoint was removed, the previous ones are kept: free space and rerun "
                                 f"to resume") from e
        raise CheckpointError(f"{final}: writing the checkpoint failed ({type(e).__name__}: {e}); the partial "
                              f"checkpoint was removed, the previous ones are kept") from e
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_tree(final.parent, files=False)
    # while the stage runs it keeps at least two, so a damaged newest one has a fallback (`resume`)
    for old in list_checkpoints(out_dir)[: -max(2, cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _out_of_space(e: BaseException) -> bool:
    """A full disk, a quota or the file size limit, as the OS or a library says it (torch's zip
    writer raises RuntimeError, safetensors its own SafetensorError with the OS's text)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e).lower()
    # torch's zip writer reports a short write as "unexpected pos N vs M" (it wrote less than it asked)
    return any(s in text for s in ("no space left", "file too large", "disk quota", "file write failed",
                                   "unexpected pos"))


def fsync_tree(path: Path, *, files: bool = True) -> None:
    """fsync every file under `path` (if `files`) and every folder, `path` included."""
    import os

    for p in sorted(path.rglob("*")) if files else []:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [path, *(q for q in path.rglob("*") if q.is_dir())] if files else [path]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: names the file and the reason."""


def read_checkpoint(ckpt: Path, cfg: TrainConfig, device) -> tuple[dict, dict, dict]:
    """(weights, trainer state, state.json) of a checkpoint, read in full before anything is applied
    to a model; CheckpointError names the damaged file."""
    from safetensors.torch import load_file

    def read(path: Path, fn):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        try:
            return fn(path)
        except Exception as e:  # safetensors, pickle and zip errors have no common base
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from e

    files = ([ckpt / "adapter" / "adapter_model.safetensors"] if cfg.lora.enabled
             else sorted((ckpt / "model").glob("*.safetensors")) or [ckpt / "model" / "model.safetensors"])
    weights: dict = {}
    for f in files:
        weights.update(read(f, lambda q: load_file(str(q))))
    trainer = read(ckpt / "trainer_state.pt", lambda q: torch.load(q, weights_only=True, map_location=device))
    for key in ("optimizer", "scheduler", "torch_rng"):
        if key not in trainer:
            raise CheckpointError(f"{ckpt / 'trainer_state.pt'}: lacks {key!r}")
    meta = read(ckpt / "state.json", lambda q: json.loads(q.read_text()))
    return weights, trainer, meta


def _load_checkpoint_weights(model, ckpt: Path, cfg: TrainConfig, state: dict) -> None:
    """Apply a checkpoint's weights (as `read_checkpoint` returned them) to the model."""
    if cfg.lora.enabled:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.backbone, state)
        return
    target = model.backbone
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(target.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {unexpected[:5]})")


# ----------------------------------------------------------------------------- the loop

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(cfg: TrainConfig, model_cfg: ModelConfig | str, out_dir: str | Path, *,
          init: str | Path | None = None, pairs: list[Pair] | None = None, data_root: str | Path | None = None,
          progress: bool = True, device=None,
          stop_after: int | None = None) -> TrainResult:
    """Train one stage. `init` = a saved model folder to start from (e.g. the stage-1 model);
    otherwise `model_cfg`'s backbone. `pairs` overrides `cfg.data`. Resumes from the newest
    checkpoint in `out_dir`; returns at once if `out_dir/final` is complete. `stop_after`
    stops (as if interrupted) after that many steps: for tests of resumption.
    `cfg.distributed.engine: ray_train` runs the same recipe on Ray Train workers instead."""
    from tqdm.auto import tqdm

    if cfg.distributed.engine == "ray_train":
        from tasks.ray_train import train_distributed

        return train_distributed(cfg, model_cfg, out_dir, init=init, pairs=pairs, data_root=data_root,
                                 stop_after=stop_after)
    out_dir = Path(out_dir)
    done = finished_result(out_dir)
    if done is not None:
        return done
    if pairs is None:
        pairs = load_sources(cfg.data, data_root)
    if not pairs:
        raise ValueError(f"{out_dir}: no training pairs (data: {[d.path for d in cfg.data]})")

    torch.manual_seed(cfg.seed)
    model = load_model(cfg, model_cfg, init, device)
    params, optimizer, scheduler = build_optimizer(model, cfg)
    start, history = resume(model, optimizer, scheduler, out_dir, cfg)
    write_history(out_dir, history)  # drop lines of steps after the checkpoint (a crashed run's)

    n = len(pairs)
    batch_size = effective_batch_size(n, cfg, out_dir)
    step_times: list[float] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {out_dir.name}", unit="step")
    with bar:  # closed however the loop ends, so an error line starts on a line of its own
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, tokens, n_pairs = 0.0, 0, 0
            for micro in range(cfg.grad_accum):
                b = step * cfg.grad_accum + micro
                chunk = [pairs[i] for i in batch_indices(n, b, batch_size, cfg.seed)]
                n_pairs += len(chunk)
                if cfg.objective == "embedding":
                    eb = embedding_batch(chunk, cfg.hard_negatives, cfg.seed, b)
                    loss = embedding_step(model, eb, config_at_step(cfg, step), 1.0 / cfg.grad_accum)
                    loss_sum += loss / cfg.grad_accum
                    tokens += eb.num_texts
                else:
                    loss, tok = reranker_step(model, chunk, cfg, cfg.seed, b, 1.0 / cfg.grad_accum)
                    loss_sum += loss / cfg.grad_accum
                    tokens += tok
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)) if cfg.max_grad_norm \
                else float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            rec = step_record(cfg, step + 1, loss_sum, lr, grad_norm, dt, n_pairs, tokens)
            history.append(rec)
            _append_history(out_dir, rec)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", pairs_s=f"{n_pairs / dt:.1f}")
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(model, optimizer, scheduler, out_dir, step + 1, cfg, history)
            if stop_after is not None and step + 1 - start >= stop_after and step + 1 < cfg.steps:
                raise TrainingInterrupted(step + 1)
    return write_final(model, out_dir, cfg, history, n, step_times, start)


def finished_result(out_dir: Path) -> TrainResult | None:
    """The result of a training run whose `final/` is complete, else None."""
    final = out_dir / "final"
    if not (final / "train_summary.json").is_file():
        return None
    summary = json.loads((final / "train_summary.json").read_text())
    log.info("%s: already trained (%d steps), nothing to do", out_dir, summary["steps"])
    return TrainResult(out_dir, final, [Path(p) for p in summary["checkpoints"]],
                       _read_history(out_dir), summary["seconds_per_step"], summary["peak_memory_mb"],
                       skipped=True)


def load_model(cfg: TrainConfig, model_cfg: ModelConfig | str, init: str | Path | None, device=None):
    """The model a stage trains, in training mode: `init` if given, else `model_cfg`'s backbone."""
    mcfg = _model_config(init) if init is not None else _model_config(model_cfg)
    cls = Embedder if cfg.objective == "embedding" else Reranker
    model = cls.load(mcfg, device=device, lora=cfg.lora)
    too_big = [d for d in cfg.loss.mrl_dims if d > getattr(model, "hidden_size", d)]
    if cfg.objective == "embedding" and too_big:
        raise ValueError(f"loss.mrl_dims {too_big} larger than the model's hidden size {model.hidden_size}")
    model.train()
    return model


def build_optimizer(model, cfg: TrainConfig):
    """(trainable params, AdamW without weight decay on biases/norms, warm-up + cosine LambdaLR)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def resume(model, optimizer, scheduler, out_dir: Path, cfg: TrainConfig) -> tuple[int, list[dict]]:
    """Load the newest complete checkpoint of `out_dir`, if any; returns (its step, the history up to it)."""
    existing = list_checkpoints(out_dir)
    for ckpt in reversed(existing):  # newest first; a damaged one (truncated file, tampered state) is skipped
        try:
            weights, state, meta = read_checkpoint(ckpt, cfg, model.device)
        except CheckpointError as e:
            log.warning("%s: cannot resume from it (%s); trying the previous checkpoint", ckpt.name, e)
            continue
        _load_checkpoint_weights(model, ckpt, cfg, weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("%s: resuming from %s (step %d of %d)", out_dir, ckpt.name, meta["step"], cfg.steps)
        return meta["step"], _read_history(out_dir)[: meta["history_len"]]
    if existing:
        log.warning("%s: none of its %d checkpoints can be read; training from the start", out_dir, len(existing))
    return 0, []


def effective_batch_size(n: int, cfg: TrainConfig, out_dir: Path) -> int:
    if n < cfg.batch_size:  # a batch would hold the same pairs several times: in-batch negatives gain nothing
        log.warning("%s: only %d training pairs; batch size %d -> %d", out_dir, n, cfg.batch_size, n)
        return n
    return cfg.batch_size


def step_record(cfg: TrainConfig, step: int, loss: float, lr: float, grad_norm: float, dt: float,
                n_pairs: int, count: int) -> dict:
    """One line of metrics.jsonl; `count` = texts encoded (embedding) or tokens (reranker)."""
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
           "pairs_per_s": n_pairs / dt}
    rec["texts_per_s" if cfg.objective == "embedding" else "tokens_per_s"] = count / dt
    return rec


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


class TrainingInterrupted(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"training stopped after step {step} (stop_after)")
        self.step = step

    def __reduce__(self):  # crosses processes (Ray Train workers): rebuild it from the step
        return TrainingInterrupted, (self.step,)


def write_history(out_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl = exactly `history` (atomic)."""
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _append_history(out_dir: Path, rec: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _read_history(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the checkpoint's history_len drops it
            break
    return out


def plot_history(history: list[dict], path: Path, title: str = "") -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [r["loss"] for r in history], marker=".")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("loss"), ax[0].set_title(f"{title} loss")
    ax[1].plot(steps, [r["lr"] for r in history], color="tab:orange")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("learning rate"), ax[1].set_title("schedule")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
