"""Scaling with data size: time and peak memory at 1x, 2x and 4x on the micro model.

  train step   one `embedding_step` + AdamW step at batch B, 2B, 4B (SNLI triplets, one hard
               negative, q/d 32/96): encoding grows with B, the in-batch loss terms with B^2
  encode       `Embedder.encode` of N, 2N, 4N real passages (max 128 tokens, batch 32)
  filter       `tasks.filter.score_pairs` (the filtering stage's scoring: cos(query with its
               instruction, document), grouped by instruction) of N, 2N, 4N SNLI pairs

Time: the three sizes of a kind in one process, alternating, after a warm-up, median of
--repeats. Memory: each (kind, size) once more in a fresh process (peak RSS delta of the work).
Growth is called linear when t(2x)/t(1x) and t(4x)/t(1x) are within 15% of 2 and 4; the
exponent k of t ~ size^k is log2(t(4x)/t(1x)) / 2; a least-squares line t = fixed + per-item x
size separates the fixed cost of a call from the cost that grows with the data.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

from bench import harness
from bench.train import model_config

NAME = "scaling"
KINDS = ("train", "encode", "filter")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=16, help="1x training batch (default 16)")
    p.add_argument("--texts", type=int, default=256, help="1x texts for encode and filter (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per size (default 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")


def quick_args(args: argparse.Namespace) -> None:
    args.batch, args.texts, args.repeats, args.no_memory = 4, 16, 1, True


def _work(kind: str, size: int) -> Callable[[], Any]:
    """A zero-argument callable doing one unit of `kind` work at `size` (model loaded outside it)."""
    import torch

    from tasks.config import TrainConfig
    from tasks.models import Embedder

    torch.manual_seed(0)
    emb = Embedder.load(model_config("micro", 32, 96 if kind == "train" else 128), device="cpu")
    if kind == "train":
        from tasks.training import embedding_batch, embedding_step

        emb.train()
        opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5)
        cfg = TrainConfig(hard_negatives=1)
        eb = embedding_batch(harness.snli_pairs(size), 1, 0, 0)

        def step():
            opt.zero_grad(set_to_none=True)
            embedding_step(emb, eb, cfg, 1.0)
            opt.step()
        return step
    if kind == "encode":
        texts = harness.passages(size)
        return lambda: emb.encode(texts, batch_size=32, max_length=128)
    from tasks.filter import score_pairs

    records = [{"query": p.query, "response": p.positive, "instruction": p.instruction}
               for p in harness.snli_pairs(size)]
    return lambda: score_pairs(emb, records, batch_size=32)


def probe(kind: str, size: int) -> dict:
    """Fresh process: one unit of work; memory is added by the harness."""
    fn = _work(kind, size)
    harness.mark_baseline()
    t0 = time.perf_counter()
    fn()
    return {"kind": kind, "size": size, "first_s": round(time.perf_counter() - t0, 4)}


def growth(sizes: list[int], times: list[float]) -> dict[str, Any]:
    """Ratios, the exponent k of t ~ size^k, and a least-squares fit t = fixed + per_item * size
    (a positive `fixed` is what makes small sizes look sub-linear)."""
    t1, t2, t4 = times
    r2, r4 = t2 / t1, t4 / t1
    linear = abs(r2 / 2 - 1) <= 0.15 and abs(r4 / 4 - 1) <= 0.15
    k = math.log2(r4) / 2 if r4 > 0 else float("nan")
    verdict = "linear" if linear else ("sub-linear" if k < 1 else "super-linear")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sum((x - mx) ** 2 for x in sizes)
    return {"t2x_over_t1x": round(r2, 3), "t4x_over_t1x": round(r4, 3), "exponent": round(k, 3), "verdict": verdict,
            "fit_fixed_s": round(my - slope * mx, 4), "fit_per_item_ms": round(1000 * slope, 4)}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    base = {"train": args.batch, "encode": args.texts, "filter": args.texts}
    out = {}
    for kind in KINDS:
        sizes = [base[kind] * m for m in (1, 2, 4)]
        fns = {f"{s}": _work(kind, s) for s in sizes}
        log(f"scaling/{kind}: sizes {sizes}")
        times = harness.alternate({k: (lambda i, f=f: f()) for k, f in fns.items()}, repeats=args.repeats,
                                  warmup=1, log=log)
        del fns
        rows = []
        for s in sizes:
            row = {"size": s, "median_s": round(harness.median(times[str(s)]), 4),
                   "runs_s": [round(t, 4) for t in times[str(s)]]}
            row["per_item_ms"] = round(1000 * row["median_s"] / s, 3)
            if not args.no_memory:
                row["memory"] = harness.fresh_process("bench.scaling:probe", {"kind": kind, "size": s}, log=log)
            rows.append(row)
        g = growth(sizes, [r["median_s"] for r in rows])
        if not args.no_memory:
            m = [max(r["memory"]["step_delta_mb"], 1e-9) for r in rows]
            g["memory_4x_over_1x"] = round(m[2] / m[0], 3)
        out[kind] = {"unit": "pairs per step" if kind == "train" else ("texts" if kind == "encode" else "pairs"),
                     "rows": rows, "growth": g}
    return {"model": "micro", "kinds": out}


def render(result: dict[str, Any]) -> str:
    rows = []
    for kind, r in result["kinds"].items():
        for x in r["rows"]:
            mem = x.get("memory", {})
            rows.append([kind, f"{x['size']} {r['unit']}", x["median_s"], x["per_item_ms"],
                         mem.get("step_delta_mb"), mem.get("process_peak_mb")])
    out = harness.table(["work", "size", "median s", "ms per item", "peak RSS delta MB", "process peak RSS MB"],
                        rows, title="scaling: micro model, 1x / 2x / 4x")
    lines = [f"- {k}: t(2x)/t(1x) {r['growth']['t2x_over_t1x']:.2f}, t(4x)/t(1x) {r['growth']['t4x_over_t1x']:.2f}, "
             f"exponent {r['growth']['exponent']:.2f} -> {r['growth']['verdict']}; fit t = "
             f"{r['growth']['fit_fixed_s']:.3f} s + {r['growth']['fit_per_item_ms']:.3f} ms x size"
             + (f"; memory delta 4x/1x {r['growth']['memory_4x_over_1x']:.2f}" if "memory_4x_over_1x" in r["growth"] else "")
             for k, r in result["kinds"].items()]
    return out + "\n\n" + "\n".join(lines)
