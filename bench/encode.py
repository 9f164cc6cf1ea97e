"""Encoding throughput: `Embedder.encode` vs `SentenceTransformer.encode`, same model, same texts.

The Embedder is exported with `.save()` and loaded back by SentenceTransformer (last-token
pooling, normalisation, the same tokenizer with `<|endoftext|>` appended), so both encode the
same real passages (en-nq-msmarco.jsonl) with the same weights, batch size and maximum length.
Both run in this process, alternating, after a warm-up on a few texts; the figure is the
median of --repeats runs.

Variants of ours, timed against fp32 ours on the same texts and compared to it by cosine (mean
and min over the texts):
  bf16      `model.autocast: bfloat16`, the smol preset's mixed precision: the decoder's matrix
            products under `torch.autocast("cpu", dtype=torch.bfloat16)`, the weights fp32
  int8      `torch.ao.quantization.quantize_dynamic` of every nn.Linear (int8 weights, dynamic
            int8 activations); embeddings and norms stay fp32
int8 runs in the main alternation on all texts; bf16 alternates with fp32 ours on the first
--variant-texts texts. A variant counts as helpful only at > 1.2x with min cosine > 0.99 (`helpful` in the JSON);
int8 is measured here only, nothing in tasks/ uses it. Without AVX512-BF16/AMX, bf16 matmuls are emulated and
much slower than fp32, so bf16 runs on --variant-texts texts only (default 16).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

from bench import harness
from bench.train import model_config

NAME = "encode"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="micro or smollm2 (default)")
    p.add_argument("--texts", type=int, default=256, help="passages to encode (default 256)")
    p.add_argument("--max-length", type=int, default=32, help="max tokens per passage (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, median (default 3)")
    p.add_argument("--variants", default="int8,bf16", help="comma-separated: int8, bf16 ('' for none)")
    p.add_argument("--variant-texts", type=int, default=16, help="texts for the bf16 variant (default 16)")


def quick_args(args: argparse.Namespace) -> None:
    args.model, args.texts, args.repeats, args.variant_texts, args.max_length = "micro", 16, 1, 8, 32


def int8_embedder(emb):
    import torch

    from tasks.models import Embedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        backbone = torch.ao.quantization.quantize_dynamic(copy.deepcopy(emb.backbone), {torch.nn.Linear},
                                                          dtype=torch.qint8)
    return Embedder(backbone, emb.tokenizer, cfg=emb.cfg, source=emb.source + " (int8 dynamic)")


def cosine(a, b) -> dict[str, float]:
    import numpy as np

    c = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from tasks.models import Embedder

    texts = harness.passages(args.texts)
    ml, bs = args.max_length, args.batch_size
    torch.manual_seed(0)
    emb = Embedder.load(model_config(args.model, ml, ml), device="cpu")
    emb.eval()
    tokens = sum(len(x) for x in emb.token_ids(texts, ml))
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        st = SentenceTransformer(str(emb.save(Path(tmp) / "m")), device="cpu")
    st.max_seq_length = ml
    st.eval()
    outs: dict[str, Any] = {}

    def ours(subset):
        def f(i):
            outs["ours"] = emb.encode(subset, batch_size=bs, max_length=ml)
        return f

    def theirs(i):
        outs["st"] = st.encode(texts, batch_size=bs, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)

    wanted = [x.strip() for x in args.variants.split(",") if x.strip()]
    for v in wanted:
        if v not in ("int8", "bf16"):
            raise ValueError(f"unknown variant {v!r} (int8, bf16)")
    sides = {"Embedder.encode": ours(texts), "SentenceTransformer.encode": theirs}
    if "int8" in wanted:  # as fast or faster than fp32: timed on all texts, in the main alternation
        q = int8_embedder(emb)
        q.eval()

        def int8(i):
            outs["int8"] = q.encode(texts, batch_size=bs, max_length=ml)
        sides["int8 (ours)"] = int8
    warm = texts[: min(len(texts), bs)]
    emb.encode(warm, batch_size=bs, max_length=ml)
    st.encode(warm, batch_size=bs, show_progress_bar=False)
    if "int8" in wanted:
        q.encode(warm, batch_size=bs, max_length=ml)
    log(f"encode: {args.texts} passages x {ml} tokens ({tokens} tokens), batch {bs}, {args.model}")
    times = harness.alternate(sides, repeats=args.repeats, warmup=0, log=log)
    agree = cosine(outs["ours"], outs["st"])
    rows = {name: {"texts": args.texts, "tokens": tokens, "runs_s": [round(t, 3) for t in ts],
                   "median_s": round(harness.median(ts), 3), "texts_per_s": round(args.texts / harness.median(ts), 2),
                   "tokens_per_s": round(tokens / harness.median(ts), 1)} for name, ts in times.items()}
    ratio = round(rows["Embedder.encode"]["texts_per_s"] / rows["SentenceTransformer.encode"]["texts_per_s"], 3)

    def variant_row(name, subset, fp32_ts, v_ts, v_out, fp32_out):
        fp32_s, v_s = harness.median(fp32_ts), harness.median(v_ts)
        cos = cosine(v_out, fp32_out)
        speedup = round(fp32_s / v_s, 3)
        return {"texts": len(subset), "tokens": sum(len(x) for x in emb.token_ids(subset, ml)),
                "fp32_runs_s": [round(t, 3) for t in fp32_ts], "runs_s": [round(t, 3) for t in v_ts],
                "fp32_texts_per_s": round(len(subset) / fp32_s, 2), "texts_per_s": round(len(subset) / v_s, 2),
                "speedup_vs_fp32": speedup, "cosine_vs_fp32": cos,
                "helpful": bool(speedup > 1.2 and cos["min"] > 0.99)}

    variants = {}
    if "int8" in wanted:
        variants["int8"] = variant_row("int8", texts, times["Embedder.encode"], times["int8 (ours)"],
                                       outs["int8"], outs["ours"])
    if "bf16" in wanted:
        subset = texts[: args.variant_texts]

        def bf16(i):
            fp32 = emb.cfg
            emb.cfg = fp32.model_copy(update={"autocast": "bfloat16"})
            try:
                outs["bf16"] = emb.encode(subset, batch_size=bs, max_length=ml)
            finally:
                emb.cfg = fp32
        bf16(-1)
        log(f"variant bf16: {len(subset)} texts")
        vt = harness.alternate({"fp32": ours(subset), "bf16": bf16}, repeats=args.repeats, warmup=0, log=log)
        variants["bf16"] = variant_row("bf16", subset, vt["fp32"], vt["bf16"], outs["bf16"], outs["ours"])
    return {"model": args.model, "texts": args.texts, "max_length": ml, "batch_size": bs, "repeats": args.repeats,
            "tokens": tokens, "data": "passages/en-nq-msmarco.jsonl (first N, title + text)",
            "sides": rows, "ratio_ours_over_st": ratio, "cosine_ours_vs_st": agree, "variants": variants}


def render(result: dict[str, Any]) -> str:
    rows = [[name, r["texts"], r["median_s"], r["texts_per_s"], r["tokens_per_s"], " ".join(map(str, r["runs_s"]))]
            for name, r in result["sides"].items()]
    out = [harness.table(["encoder", "texts", "median s", "texts/s", "tokens/s", "runs s"], rows,
                         title=f"encode: {result['model']}, {result['texts']} passages x {result['max_length']} "
                               f"tokens, batch {result['batch_size']}, median of {result['repeats']} alternating"),
           f"- Embedder.encode / SentenceTransformer.encode: {result['ratio_ours_over_st']:.2f}x "
           f"(cosine between the two: mean {result['cosine_ours_vs_st']['mean']}, "
           f"min {result['cosine_ours_vs_st']['min']})"]
    if result["variants"]:
        vrows = [[v, r["texts"], r["fp32_texts_per_s"], r["texts_per_s"], f"{r['speedup_vs_fp32']:.2f}x",
                  f"{r['cosine_vs_fp32']['mean']:.5f}", f"{r['cosine_vs_fp32']['min']:.5f}", "yes" if r["helpful"] else "no"]
                 for v, r in result["variants"].items()]
        out.append(harness.table(["variant of ours", "texts", "fp32 texts/s", "variant texts/s", "speed-up",
                                  "cosine mean", "cosine min", ">1.2x and cos>0.99"], vrows,
                                 title="variants (each alternated with fp32 ours on the same texts)"))
    return "\n\n".join(out)
