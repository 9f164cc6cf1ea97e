"""The checkpoint format, written and read by every engine (DeepSpeed adds its own `deepspeed/`):

    out_dir/checkpoints/step-NNNNNN/
        model/              the model, safetensors, loadable on its own (merge and evaluation read it)
        adapter/            the LoRA adapter, if any
        trainer_state.pt    optimizer, scheduler, torch RNG
        state.json          {"step", "history_len"}: written last, marks the checkpoint complete

A checkpoint is written into `step-NNNNNN.tmp`, fsynced and renamed, so a crash (or a full disk)
mid-write leaves the previous checkpoint intact; resuming takes the newest readable one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from tasks.config import TrainConfig
from tasks.data import atomic_write_text, honour_umask
from tasks.diskspace import DiskSpaceError, ensure_free_space
from tasks.training.history import read_history

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: names the file and the reason."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first; half-written ones are ignored."""
    ckpts = [p for p in (out_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file()
             and not p.name.endswith(".tmp")]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(model, optimizer, scheduler, out_dir: Path, step: int, cfg: TrainConfig,
                    history: list[dict]) -> Path:
    final = out_dir / "checkpoints" / checkpoint_name(step)
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
        if out_of_space(e):
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


def out_of_space(e: BaseException) -> bool:
    """A full disk, a quota or the file size limit, as the OS or a library says it (torch's zip
    writer raises RuntimeError, safetensors its own SafetensorError with the OS's text)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e).lower()
    # torch's zip writer reports a short write as "unexpected pos N vs M" (it wrote less than it asked)
    return any(s in text for s in ("no space left", "file too large", "disk quota", "file write failed",
                                   "unexpected pos"))


def fsync_tree(path: Path, *, files: bool = True) -> None:
    """fsync every file under `path` (if `files`) and every folder, `path` included."""
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


def load_checkpoint_weights(model, ckpt: Path, cfg: TrainConfig, state: dict) -> None:
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


def resume(model, optimizer, scheduler, out_dir: Path, cfg: TrainConfig) -> tuple[int, list[dict]]:
    """Load the newest complete checkpoint of `out_dir`, if any; returns (its step, the history up to it)."""
    existing = list_checkpoints(out_dir)
    for ckpt in reversed(existing):  # newest first; a damaged one (truncated file, tampered state) is skipped
        try:
            weights, state, meta = read_checkpoint(ckpt, cfg, model.device)
        except CheckpointError as e:
            log.warning("%s: cannot resume from it (%s); trying the previous checkpoint", ckpt.name, e)
            continue
        load_checkpoint_weights(model, ckpt, cfg, weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("%s: resuming from %s (step %d of %d)", out_dir, ckpt.name, meta["step"], cfg.steps)
        return meta["step"], read_history(out_dir)[: meta["history_len"]]
    if existing:
        log.warning("%s: none of its %d checkpoints can be read; training from the start", out_dir, len(existing))
    return 0, []
