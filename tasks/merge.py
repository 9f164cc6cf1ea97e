"""Model merging (paper §3, step 5): slerp over several checkpoints saved during stage 2.

Spherical linear interpolation treats each tensor as one flat vector and walks along the great
circle between two checkpoints instead of the straight chord, so the merged weights keep the norm
profile of the endpoints (a plain average of two far-apart vectors shrinks towards the origin).
Reference: Shoemake 1985; mergekit `mergekit/merge_methods/slerp.py`, whose conventions we follow:
the angle comes from normalised copies, the coefficients are applied to the original tensors, and
nearly (anti-)parallel pairs fall back to linear interpolation.

Two methods (`merge.method`):
- slerp: on the raw weights. Checkpoints of one run lie so close together (relative spread
  ~1e-3, cos θ > 1 - 1e-6) that this is their weighted average: the lerp fallback.
- task_slerp (`base` = the weights the stage started from): slerp of the deltas sd_i - base,
  folded as slerp is, then base + the merged delta. Deltas of runs trained from one start on
  different data balances are far from parallel, so the spherical part matters: it keeps the
  delta's length where averaging orthogonal deltas shrinks it by cos(θ/2). Same convention as
  above (angle from the normalised deltas, coefficients on the deltas), so the merged delta's
  norm is the interpolated norm only when the deltas' norms are equal.

Entry point: `slerp_merge(checkpoints, out_dir)` reads Hugging Face model folders and writes a new
folder that loads exactly like the first checkpoint, with merged `model.safetensors` and a
`merge.json` describing how it was made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tasks.data import honour_umask
from tasks.diskspace import ensure_free_space

StateDict = dict[str, Tensor]

SAFETENSORS_INDEX = "model.safetensors.index.json"
MERGED_WEIGHTS = "model.safetensors"
MERGE_RECORD = "merge.json"


def _is_weight_file(name: str) -> bool:
    """Files that hold (or index) a checkpoint's weights: replaced by the merge, never copied.

    PyTorch `.bin` weights are dropped too: left beside the merged safetensors they would be
    unmerged weights a loader might pick up.
    """
    return (
        name.endswith(".safetensors")
        or name == SAFETENSORS_INDEX
        or (name.startswith("pytorch_model") and (name.endswith(".bin") or name.endswith(".bin.index.json")))
    )


def _lerp(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    return (1.0 - t) * v0 + t * v1


def slerp(v0: Tensor, v1: Tensor, t: float, eps: float = 1e-6) -> Tensor:
    """Spherical linear interpolation between two tensors of the same shape, seen as flat vectors.

        cos θ = <v0/|v0|, v1/|v1|>
        res   = sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1      (on the unnormalised v0, v1)

    Falls back to lerp, (1-t)·v0 + t·v1, when |cos θ| > 1 - eps (sin θ ≈ 0, the formula is 0/0)
    or when either vector has norm <= eps (no direction to interpolate).
    Computed in float32 (float64 if an input is float64) and returned in v0's dtype.
    t = 0 returns v0 and t = 1 returns v1 exactly.
    """
    if v0.shape != v1.shape:
        raise ValueError(
            f"slerp needs tensors of the same shape, got {tuple(v0.shape)} and {tuple(v1.shape)}"
        )
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.to(v0.dtype).clone()

    compute_dtype = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a = v0.to(compute_dtype)
    b = v1.to(compute_dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    if norm_a <= eps or norm_b <= eps:
        return _lerp(a, b, t).to(v0.dtype)

    # The dot product is summed in float64: for millions of elements a float32 sum drifts enough
    # to push cos θ of near-identical checkpoints past 1.
    cos_theta = torch.dot(a.flatten().double(), b.flatten().double()) / (norm_a.double() * norm_b.double())
    cos_theta = float(cos_theta.clamp(-1.0, 1.0))
    if abs(cos_theta) > 1.0 - eps:
        return _lerp(a, b, t).to(v0.dtype)

    theta = math.acos(cos_theta)
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return (s0 * a + s1 * b).to(v0.dtype)


def _check_same_layout(state_dicts: list[StateDict], base: StateDict | None) -> None:
    """Every input must hold the same keys with the same shapes as checkpoint 0."""
    reference = state_dicts[0]
    others: list[tuple[str, StateDict]] = [(f"checkpoint {i}", sd) for i, sd in enumerate(state_dicts)][1:]
    if base is not None:
        others.append(("base", base))
    for label, sd in others:
        missing = sorted(reference.keys() - sd.keys())
        if missing:
            raise ValueError(
                f"{label} lacks key {missing[0]!r} present in checkpoint 0 ({len(missing)} missing)"
            )
        extra = sorted(sd.keys() - reference.keys())
        if extra:
            raise ValueError(f"{label} has key {extra[0]!r} absent from checkpoint 0 ({len(extra)} extra)")
        for key, tensor in reference.items():
            if sd[key].shape != tensor.shape:
                raise ValueError(
                    f"{label} key {key!r} has shape {tuple(sd[key].shape)}, "
                    f"checkpoint 0 has {tuple(tensor.shape)}"
                )


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} checkpoints")
    for i, w in enumerate(weights):
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"weight {i} is {w}; weights must be positive and finite")
    return weights


def slerp_state_dicts(
    state_dicts: list[StateDict],
    weights: list[float] | None = None,
    base: StateDict | None = None,
) -> StateDict:
    """Merge 2+ state dicts tensor by tensor with slerp.

    More than two are folded in order: m_0 = sd_0, m_i = slerp(m_{i-1}, sd_i, t_i) with
    t_i = w_i / (w_0 + ... + w_i), so for weights that agree in direction each checkpoint's share
    matches a weighted mean (equal weights by default).
    With `base` (task-vector slerp), the fold runs on the deltas sd_i - base and base is added back.
    Non-floating tensors (integer buffers) are copied from checkpoint 0 and must be equal everywhere.
    Raises ValueError naming the key and checkpoint index when keys, shapes or buffers disagree.
    """
    if len(state_dicts) < 2:
        raise ValueError(f"slerp merging needs at least 2 checkpoints, got {len(state_dicts)}")
    weights = _check_weights(weights, len(state_dicts))
    _check_same_layout(state_dicts, base)

    merged: StateDict = {}
    for key, first in state_dicts[0].items():
        if not torch.is_floating_point(first):
            for i, sd in enumerate(state_dicts[1:], start=1):
                if not torch.equal(sd[key], first):
                    raise ValueError(
                        f"non-floating tensor {key!r} differs between checkpoint 0 and checkpoint {i}"
                    )
            merged[key] = first.clone()
            continue

        # The fold runs in float32 (float64 stays float64) and rounds once at the end: bf16 would
        # round after every step, and bf16 deltas of checkpoints close to the base would vanish.
        wide = torch.float64 if first.dtype == torch.float64 else torch.float32
        anchor = base[key].to(wide) if base is not None else None
        acc = first.to(wide)
        if anchor is not None:
            acc = acc - anchor
        total = weights[0]
        for i in range(1, len(state_dicts)):
            total += weights[i]
            nxt = state_dicts[i][key].to(wide)
            if anchor is not None:
                nxt = nxt - anchor
            acc = slerp(acc, nxt, weights[i] / total)
        if anchor is not None:
            acc = acc + anchor
        merged[key] = acc.to(first.dtype).contiguous()
    return merged


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (the index's shards if it is sharded)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} listed in {index} does not exist")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint folder {folder}")
    return files


def load_checkpoint(folder: str | Path) -> StateDict:
    """All tensors of a Hugging Face model folder, read with safetensors only (never pickle)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    state: StateDict = {}
    for f in _weight_files(folder):
        try:
            tensors = load_file(f)
        except Exception as e:  # safetensors' own errors name neither file nor folder
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{f}: damaged weights file ({e}); use another checkpoint or re-export this one") from e
        for key, tensor in tensors.items():
            if key in state:
                raise ValueError(
                    f"tensor {key!r} appears in more than one safetensors file of {folder} (again in {f})"
                )
            state[key] = tensor
    return state


def relative_spread(state_dicts: list[StateDict], base: StateDict | None = None) -> float:
    """How far apart the checkpoints are: max_i |sd_i - sd_0| / |sd_0 - base| over all floating
    tensors as one vector (base = 0 without one). Slerp of checkpoints this close is their weighted
    average to within spread^2, so the merge cannot move far from any of them."""
    ref = [(k, t) for k, t in state_dicts[0].items() if torch.is_floating_point(t)]
    scale = math.sqrt(sum(float(torch.sum((t.double() - (base[k].double() if base is not None else 0)) ** 2))
                          for k, t in ref))
    if scale == 0:
        return 0.0
    far = max(math.sqrt(sum(float(torch.sum((sd[k].double() - t.double()) ** 2)) for k, t in ref))
              for sd in state_dicts[1:])
    return far / scale


def slerp_merge(
    checkpoints: list[str | Path],
    out_dir: str | Path,
    weights: list[float] | None = None,
    base: str | Path | None = None,
) -> Path:
    """Slerp-merge Hugging Face checkpoint folders into `out_dir` and return its path.

    The output is the first checkpoint's folder (config, tokenizer, sentence-transformers files,
    subfolders: copied verbatim) with its weights replaced by one merged `model.safetensors`, plus
    `merge.json` (method "slerp" or "task_slerp" when `base` is given, paths, weights, base, and
    `relative_spread`, how far apart the checkpoints are: see `relative_spread`).
    It is built in `<out_dir>.tmp-<pid>` and renamed into place, so `out_dir` is either the old
    folder or the complete new one, never half written.
    """
    paths = [Path(c) for c in checkpoints]
    if len(paths) < 2:
        raise ValueError(f"slerp merging needs at least 2 checkpoints, got {len(paths)}")
    weights = _check_weights(weights, len(paths))
    base_path = Path(base) if base is not None else None
    out_dir = Path(out_dir)
    for p in [*paths, *([base_path] if base_path is not None else [])]:
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint folder {p} does not exist")
        # Replacing out_dir deletes the old folder: it must not be one of our inputs.
        if out_dir.exists() and out_dir.resolve() == p.resolve():
            raise ValueError(f"out_dir {out_dir} is also an input checkpoint")

    state_dicts = [load_checkpoint(p) for p in paths]
    base_sd = load_checkpoint(base_path) if base_path is not None else None
    try:
        merged = slerp_state_dicts(state_dicts, weights, base_sd)
    except ValueError as err:
        names = ", ".join(f"{i}={p}" for i, p in enumerate(paths))
        raise ValueError(f"{err} (checkpoints: {names}; base: {base_path})") from err
    spread = relative_spread(state_dicts, base_sd)
    del state_dicts, base_sd

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for entry in sorted(paths[0].iterdir()):
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            elif not _is_weight_file(entry.name):
                shutil.copy2(entry, tmp / entry.name)
        ensure_free_space(tmp, sum(t.numel() * t.element_size() for t in merged.values()), "the merged weights")
        save_file(merged, tmp / MERGED_WEIGHTS, metadata={"format": "pt"})
        record = {
            "method": "task_slerp" if base_path is not None else "slerp",
            "checkpoints": [str(p) for p in paths],
            "weights": weights,
            "base": str(base_path) if base_path is not None else None,
            "relative_spread": spread,
        }
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        honour_umask(tmp)

        if out_dir.exists():
            old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except BaseException:
                old.rename(out_dir)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
