"""Synthesis throughput with the real local generator (SmolLM2-135M-Instruct through transformers).

`tasks.synthesis.run.synthesize` on the first --passages passages of en-nq-msmarco.jsonl (retrieval
pairs: configuration + query generation, the paper's A.1 templates), in shards of
--shard-size, on one local Ray instance started once (its start-up is timed separately):
  w1-b8   1 Ray worker (1 CPU, 1 torch thread), generator batch_size 8
  w2-b8   2 Ray workers (1 CPU each), batch_size 8
  w1-b1   1 Ray worker, batch_size 1 (one prompt at a time)
Each configuration writes a fresh folder and includes its actors' start (model load, ~1 s per
worker). Persona retrieval (all-MiniLM-L6-v2, cached persona matrix) is warmed up first.

Figures: passages/min (the work done, what scaling is judged on), accepted pairs/min (what the
pipeline gets; SmolLM2 keeps only some answers, so with few passages it is a small, noisy count),
LLM calls/min. Scaling efficiency = throughput(2 workers) / (2 x throughput(1 worker)).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness

NAME = "synthesis"
CONFIGS = {"w1-b8": (1, 8), "w2-b8": (2, 8), "w1-b1": (1, 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passages", type=int, default=4,
                   help="passages per configuration (default 4, so that `all` stays under 20 min on 2 cores; "
                        "8 takes ~8 min)")
    p.add_argument("--shard-size", type=int, default=2, help="passages per shard (default 2: 2 shards, one per worker)")
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="generation cap per answer (default 96, the synth default; 64 cuts configuration answers)")
    p.add_argument("--model", default="bundled:smollm2", help="generator model (default bundled:smollm2)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")


def quick_args(args: argparse.Namespace) -> None:
    args.passages, args.shard_size, args.max_new_tokens, args.model = 4, 2, 8, "micro"


def synth_config(args: argparse.Namespace, workers: int, batch: int):
    from tasks.config import GeneratorConfig, SynthConfig

    return SynthConfig(
        passages=[str(harness.SHARED_DATA / "passages" / "en-nq-msmarco.jsonl")],
        personas=str(harness.SHARED_DATA / "personas" / "personahub-5k.txt"),
        num_passages=args.passages, shard_size=args.shard_size, workers=workers, cpus_per_worker=1.0,
        generator=GeneratorConfig(model=args.model, batch_size=batch, max_new_tokens=args.max_new_tokens))


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import ray

    from tasks.distributed import init_ray
    from tasks.synthesis.encoders import persona_cache, persona_encoder
    from tasks.synthesis.plan import load_passages, load_personas, retrieve_personas
    from tasks.synthesis.run import synthesize
    from tasks.synthesis.text import truncate_words

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    base = synth_config(args, 1, 8)
    # Warm the driver-side persona retrieval so no configuration pays for loading it.
    t0 = time.perf_counter()
    enc = persona_encoder(base.persona_retriever)
    texts = [truncate_words(p.text, base.max_passage_words) for p in load_passages(base.passages, limit=args.passages)]
    retrieve_personas(texts, load_personas(base.personas), enc, top_k=base.top_personas,
                      cache=persona_cache(Path(base.personas), base.persona_retriever))
    persona_warm_s = time.perf_counter() - t0

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray(num_cpus=2, object_store_mb=256)
    ray_start_s = time.perf_counter() - t0
    log(f"ray start {ray_start_s:.1f} s; persona retrieval warm-up {persona_warm_s:.1f} s")
    rows = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
            for name in names:
                workers, batch = CONFIGS[name]
                cfg = synth_config(args, workers, batch)
                log(f"synthesis {name}: {args.passages} passages, {workers} worker(s), batch {batch}")
                t0 = time.perf_counter()
                res = synthesize(cfg, Path(tmp) / name, progress=False)
                wall = time.perf_counter() - t0
                s = res.stats
                rows[name] = {
                    "workers": workers, "batch_size": batch, "passages": args.passages, "wall_s": round(wall, 2),
                    "generation_s_summed_over_workers": s["run"]["generation_seconds"],
                    "accepted": s["accepted"], "rejected": s["rejected"], "llm_calls": s["llm_calls"],
                    "passages_per_min": round(60 * args.passages / wall, 3),
                    "accepted_per_min": round(60 * s["accepted"] / wall, 3),
                    "llm_calls_per_min": round(60 * s["llm_calls"] / wall, 3),
                    "rejection_reasons": s.get("rejection_reasons", {}),
                }
                log(f"  {wall:.1f} s, {s['accepted']} accepted, {s['llm_calls']} LLM calls")
    finally:
        if started_here:
            ray.shutdown()
    ratios = {}
    if "w1-b8" in rows and "w2-b8" in rows:
        for k in ("passages_per_min", "llm_calls_per_min", "accepted_per_min"):
            one = rows["w1-b8"][k]
            ratios[f"scaling efficiency ({k})"] = round(rows["w2-b8"][k] / (2 * one), 3) if one else None
    if "w1-b8" in rows and "w1-b1" in rows:
        for k in ("passages_per_min", "llm_calls_per_min"):
            ratios[f"batch 8 / batch 1 ({k})"] = round(rows["w1-b8"][k] / rows["w1-b1"][k], 3)
    return {"generator": args.model, "passages": args.passages, "shard_size": args.shard_size,
            "max_new_tokens": args.max_new_tokens, "ray_start_s": round(ray_start_s, 2),
            "persona_warmup_s": round(persona_warm_s, 2), "configs": rows, "ratios": ratios}


def render(result: dict[str, Any]) -> str:
    rows = [[n, r["workers"], r["batch_size"], r["wall_s"], r["generation_s_summed_over_workers"],
             r["passages_per_min"], r["llm_calls_per_min"], r["accepted"], r["accepted_per_min"]]
            for n, r in result["configs"].items()]
    out = harness.table(["config", "workers", "batch", "wall s", "generation s (sum)", "passages/min",
                         "LLM calls/min", "accepted", "accepted/min"], rows,
                        title=f"synthesis: {result['generator']}, {result['passages']} passages, shards of "
                              f"{result['shard_size']}, max_new_tokens {result['max_new_tokens']}")
    lines = [f"- {k}: {v:.2f}" if v is not None else f"- {k}: n/a (nothing accepted)"
             for k, v in result["ratios"].items()]
    lines.append(f"- Ray start-up (once, not in the rows): {result['ray_start_s']:.1f} s")
    return out + "\n\n" + "\n".join(lines)
