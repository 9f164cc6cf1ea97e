"""Training throughput: the project's trainer step vs sentence-transformers on the same model and data.

Sides (every side: zero_grad, tokenise, forward, loss, backward, AdamW step; no clipping, no
scheduler, no Trainer):
  ours          `tasks.training.embedding_step`: full improved InfoNCE (hard negative, qq/dd/qd
                in-batch terms, false-negative mask), end-to-end backprop
  ours+gc       the same with GradCache (`TrainConfig.mini_batch_size` = --chunk)
  st-mnrl       SentenceTransformer `model(features)` + MultipleNegativesRankingLoss (anchor,
                positive, negative columns)
  st-cmnrl      the same with CachedMultipleNegativesRankingLoss (mini_batch_size = --chunk)
  ours-bf16     `ours` with `model.autocast: bfloat16` (mixed precision, the smol preset's setting)
  st-mnrl-bf16  `st-mnrl` under `torch.autocast("cpu", dtype=torch.bfloat16)` (what the Trainer's
                bf16=True does)

Same weights (the Embedder is exported with `.save()` and loaded by SentenceTransformer), same
SNLI triplets (one hard negative each, stage-2 instruction on the queries), same batch and the
same maximum lengths (queries --q-len, documents --d-len tokens, `<|endoftext|>` included).
Timing: all sides in one process, alternating (order rotated each round) after a warm-up step;
batch r is the same for every side. Peak memory: each side once more in a fresh process.

Achieved FLOP rate (model FLOPs / step time) as a fraction of this machine's fp32 matmul peak
(2048^3, best of 10), with the usual count for training (PaLM, appendix B):
    FLOPs per step = sum over the three text groups g of  B * T_g * (6 N + 12 L d_attn T_g)
N = non-embedding parameters, L layers, d_attn = heads * head_dim, T_g the padded length of
group g (the hardware computes the padding too). GradCache re-runs the forward (8 N instead of
6 N); its column still counts 6 N, so the extra forward shows as a lower fraction.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness

NAME = "train"
SIDES = ("ours", "ours+gc", "st-mnrl", "st-cmnrl", "ours-bf16", "st-mnrl-bf16")
BACKBONES = {"micro": "micro", "smollm2": "bundled:smollm2"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="micro,smollm2", help="comma-separated: micro, smollm2 (default both)")
    p.add_argument("--batch", type=int, default=16, help="pairs per step (default 16)")
    p.add_argument("--q-len", type=int, default=32, help="max query tokens (default 32)")
    p.add_argument("--d-len", type=int, default=96, help="max document tokens (default 96)")
    p.add_argument("--chunk", type=int, default=8, help="GradCache mini-batch of ours+gc and st-cmnrl (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="measured steps per side (default 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")


def quick_args(args: argparse.Namespace) -> None:
    args.models, args.batch, args.repeats, args.chunk, args.no_memory = "micro", 8, 1, 4, True


# ----------------------------------------------------------------------------- the steps

def model_config(model: str, q_len: int, d_len: int):
    from tasks.config import ModelConfig

    return ModelConfig(backbone=BACKBONES.get(model, model), dtype="float32", max_query_length=q_len,
                       max_doc_length=d_len)


def arch(emb) -> dict[str, int]:
    c = emb.backbone.config
    n = sum(p.numel() for name, p in emb.backbone.named_parameters() if "embed_tokens" not in name)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"params_nonembedding": n, "layers": c.num_hidden_layers, "d_attn": heads * head_dim,
            "hidden": c.hidden_size}


def batch_shapes(emb, eb, q_len: int, d_len: int) -> list[tuple[int, int, int]]:
    """(rows, padded length, real tokens) of the query, positive and negative groups."""
    groups = [(eb.queries, q_len), (eb.positives, d_len), ([n for negs in eb.negatives for n in negs], d_len)]
    out = []
    for texts, ml in groups:
        lens = [len(x) for x in emb.token_ids(texts, ml)] if texts else [0]
        out.append((len(texts), max(lens), sum(lens)))
    return out


def model_flops(a: dict[str, int], shapes: list[tuple[int, int, int]]) -> float:
    return sum(rows * t * (6 * a["params_nonembedding"] + 12 * a["layers"] * a["d_attn"] * t) for rows, t, _ in shapes)


class Sides:
    """The four training steps over two model copies (ours; SentenceTransformer) of the same weights."""

    def __init__(self, folder: str, q_len: int, d_len: int, chunk: int, sides: tuple[str, ...] = SIDES):
        import torch

        from tasks.config import TrainConfig
        from tasks.models import Embedder

        self.q_len, self.d_len, self.chunk = q_len, d_len, chunk
        self.sides = sides
        self.cfg = TrainConfig(batch_size=16, hard_negatives=1, mini_batch_size=None)
        self.cfg_gc = self.cfg.model_copy(update={"mini_batch_size": chunk})
        self.emb = self.st = None
        if any(s.startswith("ours") for s in sides):
            self.emb = Embedder.load(folder, device="cpu")
            self.emb.cfg = self.emb.cfg.model_copy(update={"max_query_length": q_len, "max_doc_length": d_len})
            self.emb.train()
            self.opt = torch.optim.AdamW([p for p in self.emb.parameters() if p.requires_grad], lr=1e-5)
        if any(s.startswith("st") for s in sides):
            from sentence_transformers import SentenceTransformer
            from sentence_transformers.sentence_transformer.losses import (
                CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)

            self.st = SentenceTransformer(folder, device="cpu")
            self.st.train()
            self.st_opt = torch.optim.AdamW([p for p in self.st.parameters() if p.requires_grad], lr=1e-5)
            self.mnrl = MultipleNegativesRankingLoss(self.st, scale=1 / self.cfg.loss.temperature)
            self.cmnrl = CachedMultipleNegativesRankingLoss(self.st, scale=1 / self.cfg.loss.temperature,
                                                            mini_batch_size=chunk)

    def step(self, side: str, eb) -> float:
        import contextlib

        import torch

        from tasks.training import embedding_step

        if side.startswith("ours"):
            fp32 = self.emb.cfg
            if side == "ours-bf16":
                self.emb.cfg = fp32.model_copy(update={"autocast": "bfloat16"})
            try:
                self.opt.zero_grad(set_to_none=True)
                loss = embedding_step(self.emb, eb, self.cfg_gc if side == "ours+gc" else self.cfg, 1.0)
                self.opt.step()
            finally:
                self.emb.cfg = fp32
            return loss

        self.st_opt.zero_grad(set_to_none=True)
        feats = []
        for texts, ml in ((eb.queries, self.q_len), (eb.positives, self.d_len),
                          ([negs[0] for negs in eb.negatives], self.d_len)):
            self.st.max_seq_length = ml
            feats.append(self.st.preprocess(texts))
        loss_fn = self.cmnrl if side == "st-cmnrl" else self.mnrl
        bf16 = side.endswith("-bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_fn(feats, torch.empty(0))
        loss.backward()
        self.st_opt.step()
        return float(loss.detach())


def memory_probe(folder: str, side: str, batch: int, q_len: int, d_len: int, chunk: int, offset: int = 0) -> dict:
    """Runs in a fresh process: load one side, one training step, report its time (memory is added
    by the harness)."""
    import torch

    from tasks.training import embedding_batch

    torch.manual_seed(0)
    sides = Sides(folder, q_len, d_len, chunk, sides=(side,))
    pairs = harness.snli_pairs(batch, offset)
    eb = embedding_batch(pairs, 1, 0, 0)
    harness.mark_baseline()
    t0 = time.perf_counter()
    loss = sides.step(side, eb)
    return {"side": side, "first_step_s": round(time.perf_counter() - t0, 3), "loss": loss}


# ----------------------------------------------------------------------------- one model

def bench_model(model: str, args: argparse.Namespace, peak: dict, log) -> dict[str, Any]:
    import torch

    from tasks.models import Embedder
    from tasks.training import embedding_batch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = str(Embedder.load(model_config(model, args.q_len, args.d_len), device="cpu").save(Path(tmp) / "m"))
        sides = Sides(folder, args.q_len, args.d_len, args.chunk)
        a = arch(sides.emb)
        n_batches = args.repeats + 1
        pairs = harness.snli_pairs(args.batch * n_batches)
        batches = [embedding_batch(pairs[i * args.batch:(i + 1) * args.batch], 1, 0, i) for i in range(n_batches)]
        losses: dict[str, list[float]] = {s: [] for s in SIDES}

        def runner(side):
            def run(i: int) -> None:
                losses[side].append(sides.step(side, batches[i + 1 if i >= 0 else 0]))
            return run

        log(f"train/{model}: batch {args.batch}, q/d {args.q_len}/{args.d_len}, {args.repeats} steps per side")
        times = harness.alternate({s: runner(s) for s in SIDES}, repeats=args.repeats, warmup=1, log=log)
        shapes = [batch_shapes(sides.emb, batches[i + 1], args.q_len, args.d_len) for i in range(args.repeats)]
        del sides
        memory = {}
        if not args.no_memory:
            for s in SIDES:
                memory[s] = harness.fresh_process("bench.train:memory_probe", dict(
                    folder=folder, side=s, batch=args.batch, q_len=args.q_len, d_len=args.d_len, chunk=args.chunk),
                    log=log)

    real_tokens = [sum(t for _, _, t in sh) for sh in shapes]
    padded_tokens = [sum(r * t for r, t, _ in sh) for sh in shapes]
    flops = [model_flops(a, sh) for sh in shapes]
    rows = {}
    for s in SIDES:
        ts = times[s]
        med = harness.median(ts)
        rows[s] = {
            "step_s_median": round(med, 4), "step_s": [round(t, 4) for t in ts],
            "pairs_per_s": round(args.batch / med, 3),
            "tokens_per_s": round(harness.median([tok / t for tok, t in zip(real_tokens, ts)]), 1),
            "model_gflops_per_s": round(harness.median([f / t for f, t in zip(flops, ts)]) / 1e9, 2),
            "losses": [round(x, 4) for x in losses[s]],
        }
        rows[s]["fraction_of_matmul_peak"] = round(rows[s]["model_gflops_per_s"] / peak["best_gflops"], 4)
        if s in memory:
            rows[s]["memory"] = memory[s]
    ratios = {
        "ours / st-mnrl (throughput)": round(rows["ours"]["pairs_per_s"] / rows["st-mnrl"]["pairs_per_s"], 3),
        "ours+gc / st-cmnrl (throughput)": round(rows["ours+gc"]["pairs_per_s"] / rows["st-cmnrl"]["pairs_per_s"], 3),
        "ours+gc / ours (throughput)": round(rows["ours+gc"]["pairs_per_s"] / rows["ours"]["pairs_per_s"], 3),
        "ours-bf16 / st-mnrl-bf16 (throughput)": round(
            rows["ours-bf16"]["pairs_per_s"] / rows["st-mnrl-bf16"]["pairs_per_s"], 3),
        "ours-bf16 / ours (throughput)": round(rows["ours-bf16"]["pairs_per_s"] / rows["ours"]["pairs_per_s"], 3),
    }
    if memory:
        ratios["ours / st-mnrl (step peak RSS delta)"] = round(
            memory["ours"]["step_delta_mb"] / max(memory["st-mnrl"]["step_delta_mb"], 1e-9), 3)
        ratios["ours+gc / st-cmnrl (step peak RSS delta)"] = round(
            memory["ours+gc"]["step_delta_mb"] / max(memory["st-cmnrl"]["step_delta_mb"], 1e-9), 3)
    return {"model": model, "backbone": BACKBONES.get(model, model), "arch": a, "batch": args.batch,
            "q_len": args.q_len, "d_len": args.d_len, "chunk": args.chunk, "repeats": args.repeats,
            "hard_negatives": 1, "real_tokens_per_step": real_tokens, "padded_tokens_per_step": padded_tokens,
            "model_flops_per_step": flops, "sides": rows, "ratios": ratios}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    peak = harness.matmul_peak_gflops()
    log(f"fp32 matmul 2048^3: best {peak['best_gflops']} GFLOP/s, median {peak['median_gflops']}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    return {"matmul_peak": peak, "data": "snli_dev_triplets.jsonl (premise, entailed hypothesis, contradiction)",
            "flops_formula": "sum_g B*T_g*(6N + 12*L*d_attn*T_g), N non-embedding params, T_g padded length",
            "models": {m: bench_model(m, args, peak, log) for m in models}}


def render(result: dict[str, Any]) -> str:
    out = []
    for m, r in result["models"].items():
        rows = []
        for s, v in r["sides"].items():
            mem = v.get("memory", {})
            rows.append([s, v["step_s_median"], v["pairs_per_s"], v["tokens_per_s"], v["model_gflops_per_s"],
                         f"{v['fraction_of_matmul_peak']:.1%}", mem.get("step_delta_mb"), mem.get("process_peak_mb")])
        out.append(harness.table(
            ["side", "step s (median)", "pairs/s", "tokens/s", "model GFLOP/s", "of fp32 peak",
             "step peak RSS delta MB", "process peak RSS MB"], rows,
            title=f"train: {m}, batch {r['batch']}, q/d {r['q_len']}/{r['d_len']} tokens, 1 hard negative, "
                  f"GradCache chunk {r['chunk']}, median of {r['repeats']} alternating steps"))
        out.append("\n".join(f"- {k}: {v:.2f}x" for k, v in r["ratios"].items()))
    out.append(f"fp32 matmul peak (2048^3, best of 10): {result['matmul_peak']['best_gflops']} GFLOP/s "
               f"(median {result['matmul_peak']['median_gflops']})")
    return "\n\n".join(out)
