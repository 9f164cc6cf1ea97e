"""GradCache: throughput and peak memory of the trainer step with and without caching.

For each batch size, `tasks.training.embedding_step` runs end to end (mini_batch_size = null) and
with GradCache (mini_batch_size = --chunk): embeddings first without a graph in chunks, the loss
gradient w.r.t. the embeddings on the full batch, then each chunk re-encoded with a graph and
back-propagated. It costs one extra forward (~4/3 of the FLOPs) and bounds activation memory
by one chunk.

- throughput: both modes in one process on one model, alternating, after a warm-up step;
- peak memory: each (batch, mode) once more in a fresh process; `step peak RSS delta` = peak
  RSS during one training step minus the RSS after loading (weights, optimizer not yet built);
- agreement: loss and gradients of the two modes from the same weights on the same batch
  (max abs difference; float32 round-off expected, ~1e-6).
Data: SNLI dev triplets (one hard negative), stage-2 instruction, q/d lengths --q-len/--d-len.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import harness
from bench.train import batch_shapes, model_config

NAME = "gradcache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="micro", help="comma-separated: micro, smollm2 (default micro)")
    p.add_argument("--batches", default="16,64,256", help="batch sizes for micro (default 16,64,256)")
    p.add_argument("--smol-batches", default="16,64", help="batch sizes for smollm2 (default 16,64)")
    p.add_argument("--chunk", type=int, default=16, help="GradCache mini-batch (default 16)")
    p.add_argument("--q-len", type=int, default=32)
    p.add_argument("--d-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3, help="measured steps per mode (default 3; smollm2: 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")


def quick_args(args: argparse.Namespace) -> None:
    args.models, args.batches, args.chunk, args.repeats = "micro", "8", 4, 1


def _setup(model: str, q_len: int, d_len: int):
    import torch

    from tasks.config import TrainConfig
    from tasks.models import Embedder

    torch.manual_seed(0)
    emb = Embedder.load(model_config(model, q_len, d_len), device="cpu")
    emb.train()
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5)
    return emb, opt, TrainConfig(hard_negatives=1)


def _step(emb, opt, cfg, eb, chunk: int | None) -> float:
    from tasks.training import embedding_step

    opt.zero_grad(set_to_none=True)
    loss = embedding_step(emb, eb, cfg.model_copy(update={"mini_batch_size": chunk}), 1.0)
    opt.step()
    return loss


def probe(model: str, batch: int, chunk: int | None, q_len: int, d_len: int) -> dict:
    """Fresh process: one training step of one (batch, mode); memory is added by the harness."""
    from tasks.training import embedding_batch

    emb, opt, cfg = _setup(model, q_len, d_len)
    eb = embedding_batch(harness.snli_pairs(batch), 1, 0, 0)
    harness.mark_baseline()
    t0 = time.perf_counter()
    loss = _step(emb, opt, cfg, eb, chunk)
    return {"batch": batch, "chunk": chunk, "first_step_s": round(time.perf_counter() - t0, 3), "loss": loss}


def agreement(emb, cfg, eb, chunk: int) -> dict[str, float]:
    """Loss and gradients with and without GradCache from the same weights and batch."""
    import torch

    from tasks.training import embedding_step

    out = {}
    for name, c in (("plain", None), ("cached", chunk)):
        emb.zero_grad(set_to_none=True)
        loss = embedding_step(emb, eb, cfg.model_copy(update={"mini_batch_size": c}), 1.0)
        out[name] = (loss, [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                            for p in emb.parameters()])
    emb.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = out["plain"], out["cached"]
    gmax = max(float((a - b).abs().max()) for a, b in zip(g0, g1))
    gscale = max(float(a.abs().max()) for a in g0)
    return {"loss_plain": l0, "loss_cached": l1, "loss_max_abs_diff": abs(l0 - l1),
            "grad_max_abs_diff": gmax, "grad_max_abs": gscale}


def bench_model(model: str, batches: list[int], args: argparse.Namespace, log) -> dict[str, Any]:
    from tasks.training import embedding_batch

    repeats = args.repeats if model == "micro" else 1
    emb, opt, cfg = _setup(model, args.q_len, args.d_len)
    rows = []
    for b in batches:
        pairs = harness.snli_pairs(b * (repeats + 1))
        ebs = [embedding_batch(pairs[i * b:(i + 1) * b], 1, 0, i) for i in range(repeats + 1)]
        log(f"gradcache/{model}: batch {b}, chunk {args.chunk}")
        sides = {"plain": lambda i: _step(emb, opt, cfg, ebs[i + 1 if i >= 0 else 0], None),
                 "gradcache": lambda i: _step(emb, opt, cfg, ebs[i + 1 if i >= 0 else 0], args.chunk)}
        times = harness.alternate(sides, repeats=repeats, warmup=1, log=log)
        tokens = [sum(t for _, _, t in batch_shapes(emb, eb, args.q_len, args.d_len)) for eb in ebs[1:]]
        for mode, ts in times.items():
            rows.append({"batch": b, "mode": mode, "chunk": args.chunk if mode == "gradcache" else None,
                         "step_s_median": round(harness.median(ts), 4), "step_s": [round(t, 4) for t in ts],
                         "pairs_per_s": round(b / harness.median(ts), 3),
                         "tokens_per_s": round(harness.median([n / t for n, t in zip(tokens, ts)]), 1)})
    check_batch = min(max(batches), 64 if model == "micro" else 16)
    eb = embedding_batch(harness.snli_pairs(check_batch), 1, 0, 0)
    check = {"batch": check_batch, "chunk": args.chunk, **agreement(emb, cfg, eb, args.chunk)}
    log(f"  agreement at batch {check_batch}: loss diff {check['loss_max_abs_diff']:.2e}, "
        f"grad max abs diff {check['grad_max_abs_diff']:.2e}")
    del emb, opt
    if not args.no_memory:
        for r in rows:
            r["memory"] = harness.fresh_process("bench.gradcache:probe", dict(
                model=model, batch=r["batch"], chunk=r["chunk"], q_len=args.q_len, d_len=args.d_len), log=log)
    ratios = {}
    for b in batches:
        plain, gc = [next(r for r in rows if r["batch"] == b and r["mode"] == m) for m in ("plain", "gradcache")]
        ratios[f"batch {b}: gradcache / plain throughput"] = round(gc["pairs_per_s"] / plain["pairs_per_s"], 3)
        if "memory" in plain:
            ratios[f"batch {b}: gradcache / plain step peak RSS delta"] = round(
                gc["memory"]["step_delta_mb"] / max(plain["memory"]["step_delta_mb"], 1e-9), 3)
    return {"model": model, "q_len": args.q_len, "d_len": args.d_len, "chunk": args.chunk, "repeats": repeats,
            "rows": rows, "agreement": check, "ratios": ratios}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    out = {}
    for m in [x.strip() for x in args.models.split(",") if x.strip()]:
        spec = args.batches if m == "micro" else args.smol_batches
        out[m] = bench_model(m, [int(x) for x in spec.split(",")], args, log)
    return {"models": out}


def render(result: dict[str, Any]) -> str:
    parts = []
    for m, r in result["models"].items():
        rows = [[x["batch"], x["mode"] + (f" ({x['chunk']})" if x["chunk"] else ""), x["step_s_median"],
                 x["pairs_per_s"], x["tokens_per_s"], x.get("memory", {}).get("step_delta_mb"),
                 x.get("memory", {}).get("process_peak_mb")] for x in r["rows"]]
        parts.append(harness.table(["batch", "mode (chunk)", "step s (median)", "pairs/s", "tokens/s",
                                    "step peak RSS delta MB", "process peak RSS MB"], rows,
                                   title=f"gradcache: {m}, q/d {r['q_len']}/{r['d_len']}, median of {r['repeats']}"))
        a = r["agreement"]
        parts.append("\n".join(f"- {k}: {v:.2f}x" for k, v in r["ratios"].items()) +
                     f"\n- loss with vs without caching (batch {a['batch']}): {a['loss_plain']:.6f} vs "
                     f"{a['loss_cached']:.6f}, max abs diff {a['loss_max_abs_diff']:.2e}; gradients max abs diff "
                     f"{a['grad_max_abs_diff']:.2e} (largest gradient {a['grad_max_abs']:.2e})")
    return "\n\n".join(parts)
