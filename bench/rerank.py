"""Reranker scoring and training: ours with the shared prefix (`model.share_rerank_prefix`, the
default) and with the full pass, against sentence-transformers' `CrossEncoder` on the same weights.

The reranker's template starts with the same system prompt for every pair (SPEC 1; 39 tokens on
SmolLM2). With the shared prefix our reranker runs it once per forward pass and the batch attends
to its keys and values; the full pass runs it in every row, as a cross-encoder does. The reranker
is exported with `.save()` (`cross-encoder/`, a 1-logit sequence classifier whose sigmoid is the
yes/no softmax) and loaded back by `CrossEncoder`, so all three score the same real pairs (SNLI dev
premise / entailed hypothesis, the stage-2 instruction) with the same weights, batch size and
maximum length; each side runs in this process, alternating, after a warm-up, median of --repeats.

  score   seconds to score --pairs pairs; the three sides' scores compared (max abs difference)
  train   one SFT step (eq. 2 loss over --train-batch examples, forward and backward), shared
          prefix against full pass; the gradients compared (relative L2 difference)
  step    whole optimizer steps of a preset's training stages (--preset, default smol: their data
          files, batches, passes of `length_bucket` examples, autocast, AdamW and clipping, as the
          pipeline's training loop runs them), --steps steps per side, the sides alternating step
          by step (the order rotated each step), each side a model loaded from the same weights;
          the median of steps 2 onwards. The reranker: the shared prefix against the full pass,
          torch's SDPA against `attn_implementation: eager` (attention as plain matrix products;
          SDPA's CPU flash-attention backward is several times its forward), and the embedding
          matrix trained against frozen (`freeze_embeddings`: its gradient is dense, every row of
          the vocabulary). Stage 2: the embedding matrix trained against frozen

With --bf16 (default: where the CPU multiplies bf16 natively, AVX512-BF16 / AMX), the smol preset's
reranker setting `autocast: bfloat16` is timed as well, shared against full.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import harness
from bench.train import BACKBONES

NAME = "rerank"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="micro or smollm2 (default)")
    p.add_argument("--num-layers", type=int, default=8,
                   help="keep the backbone's first N layers (default 8, the smol preset's reranker; 0 = all)")
    p.add_argument("--pairs", type=int, default=128, help="pairs to score (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="scoring batch size (default 16, eval.batch_size)")
    p.add_argument("--train-batch", type=int, default=16,
                   help="examples per training step (default 16: the smol preset's 8 pairs x (1 + 1 negative))")
    p.add_argument("--max-length", type=int, default=192, help="max tokens per pair (default 192, the smol preset's)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, median (default 3)")
    p.add_argument("--preset", default="smol", help="preset whose reranker step is timed (default smol)")
    p.add_argument("--steps", type=int, default=9, help="reranker steps of the preset per side (default 9; 0 = skip)")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="also time autocast bf16 (auto = where the CPU has bf16 matrix instructions)")


def quick_args(args: argparse.Namespace) -> None:
    args.model, args.num_layers, args.pairs, args.train_batch, args.repeats = "micro", 0, 8, 4, 1
    args.preset, args.steps = "micro", 2


# The preset's whole optimizer steps: side -> (reranker_model changes, freeze_embeddings). The first
# side is the reference the others are divided by: the step as the smol preset ran it at c296a31.
RERANKER_SIDES = {
    "shared prefix, SDPA": ({"share_rerank_prefix": True, "attn_implementation": "sdpa"}, False),
    "full pass, SDPA": ({"share_rerank_prefix": False, "attn_implementation": "sdpa"}, False),
    "shared prefix, eager": ({"share_rerank_prefix": True, "attn_implementation": "eager"}, False),
    "shared prefix, eager, frozen embeddings": ({"share_rerank_prefix": True, "attn_implementation": "eager"}, True),
}
EMBEDDER_SIDES = {"embeddings trained": ({}, False), "frozen embeddings": ({}, True)}


def alternate_steps(stage: str, cfg, sides: dict, steps: int, log) -> dict[str, Any]:
    """Whole optimizer steps of a preset's training stage (`stage2` or `reranker`: its data, batches,
    passes, autocast, AdamW and clipping, as `tasks.training.loop.fit` runs them), one model per side
    loaded from the same weights, the sides alternating step by step (the order rotated each step);
    the median of steps 2 onwards, and each side's first-step loss against the first side's (the same
    weights and batch: equal to the rounding of the side's settings)."""
    import statistics
    import time

    from tasks.data import load_sources
    from tasks.training.engines import LocalEngine
    from tasks.training.loop import load_model
    from tasks.training.steps import batch_indices, config_at_step, embedding_batch, embedding_step, reranker_step

    t = getattr(cfg, stage)
    mcfg = cfg.reranker_backbone if stage == "reranker" else cfg.model
    # the project's data/ (made by `make run`: `dvc pull` and the derived sets), else the shared
    # data it is copied from (enough for the micro preset's SNLI file)
    root = harness.ROOT if (harness.ROOT / "data").is_dir() else harness.SHARED_DATA.parent
    pairs = list(load_sources(t.data, root))
    names = list(sides)
    engines = {}
    for n, (update, frozen) in sides.items():
        # the training stage's own loader (freezing as the stage's freeze_embeddings says)
        model = load_model(t.model_copy(update={"freeze_embeddings": frozen}), mcfg.model_copy(update=update), None,
                           device="cpu")
        if engines:
            model.load_state_dict(engines[names[0]].model.state_dict())
        engines[n] = LocalEngine(model, t)
    times: dict[str, list[float]] = {n: [] for n in names}
    first_loss: dict[str, float] = {}
    for b in range(steps):
        chunk = [pairs[i] for i in batch_indices(len(pairs), b, t.batch_size, t.seed)]
        for n in names[b % len(names):] + names[: b % len(names)]:
            engine = engines[n]
            t0 = time.perf_counter()
            engine.zero_grad()
            if stage == "reranker":
                loss, _ = reranker_step(engine, chunk, t, t.seed, b, 1.0)
            else:
                loss = embedding_step(engine, embedding_batch(chunk, t.hard_negatives, t.seed, b),
                                      config_at_step(t, b), 1.0)
            engine.step()
            times[n].append(round(time.perf_counter() - t0, 3))
            first_loss.setdefault(n, loss)
        log(f"  {stage} step {b + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in times))
    med = {n: round(statistics.median(ts[1:] or ts), 3) for n, ts in times.items()}
    ref = names[0]
    return {"stage": stage, "pairs": len(pairs), "batch_size": t.batch_size, "length_bucket": t.length_bucket,
            "autocast": engines[ref].model.cfg.autocast, "steps": steps,
            "sides": {n: {**u, "freeze_embeddings": f} for n, (u, f) in sides.items()},
            "trainable_weights": {n: sum(p.numel() for p in e.model.parameters() if p.requires_grad)
                                  for n, e in engines.items()},
            "embedding_weights": engines[ref].model.backbone.get_input_embeddings().weight.numel(),
            "step_s": times, "median_s": med,
            "first_loss_diff": {n: abs(first_loss[n] - first_loss[ref]) for n in names[1:]},
            "reference": ref, "speedup": {n: round(med[ref] / med[n], 3) for n in names[1:]}}


def preset_steps(args, log) -> dict[str, Any]:
    """The preset's reranker steps (RERANKER_SIDES) and stage-2 steps (EMBEDDER_SIDES), alternating."""
    from tasks.config import load_config

    cfg = load_config(args.preset)
    return {"preset": args.preset,
            "reranker": alternate_steps("reranker", cfg, RERANKER_SIDES, args.steps, log),
            "stage2": alternate_steps("stage2", cfg, EMBEDDER_SIDES, args.steps, log)}


def load(args, share: bool, autocast: str | None):
    from tasks.config import ModelConfig
    from tasks.models import Reranker

    cfg = ModelConfig(backbone=BACKBONES.get(args.model, args.model), dtype="float32", autocast=autocast,
                      max_rerank_length=args.max_length, num_layers=args.num_layers or None,
                      share_rerank_prefix=share)
    return Reranker.load(cfg, device="cpu")


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from tasks.losses import reranker_sft_loss
    from tasks.models import cross_encoder_pair, pad_left
    from tasks.models.backbone import native_bf16

    pairs = harness.snli_pairs(max(args.pairs, args.train_batch))
    queries, docs = [p.query for p in pairs[: args.pairs]], [p.positive for p in pairs[: args.pairs]]
    instruction = pairs[0].instruction  # the stage-2 SNLI instruction harness.snli_pairs gives every pair
    bs, ml = args.batch_size, args.max_length
    torch.manual_seed(0)
    shared, full = load(args, True, None), load(args, False, None)
    full.load_state_dict(shared.state_dict())  # one set of weights (the micro model is seeded anyway)
    for m in (shared, full):
        m.eval()
    ids = shared.token_ids(queries, docs, instruction, ml)
    tokens = sum(len(x) for x in ids)
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
        ce = CrossEncoder(str(shared.save(Path(tmp) / "rr") / "cross-encoder"), device="cpu", max_length=ml)
    ce_pairs = [cross_encoder_pair(q, d, instruction) for q, d in zip(queries, docs)]
    outs: dict[str, Any] = {}

    def scorer(name, model):
        def f(i):
            outs[name] = model.score(queries, docs, instruction=instruction, batch_size=bs, max_length=ml)
        return f

    def cross_encoder(i):
        outs["CrossEncoder.predict"] = np.asarray(ce.predict(ce_pairs, batch_size=bs, show_progress_bar=False))

    prefix = len(shared.prefix_ids)
    log(f"rerank: {args.pairs} SNLI pairs ({tokens} tokens, the shared prefix {prefix} of each), batch {bs}, "
        f"{args.model}{f' first {args.num_layers} layers' if args.num_layers else ''}")
    sides = {"shared prefix (ours)": scorer("shared prefix (ours)", shared),
             "full pass (ours)": scorer("full pass (ours)", full), "CrossEncoder.predict": cross_encoder}
    times = harness.alternate(sides, repeats=args.repeats, warmup=1, log=log)
    score_rows = {name: {"pairs": args.pairs, "tokens": tokens, "runs_s": [round(t, 3) for t in ts],
                         "median_s": round(harness.median(ts), 3),
                         "pairs_per_s": round(args.pairs / harness.median(ts), 2)} for name, ts in times.items()}
    base = outs["full pass (ours)"]
    agreement = {name: float(np.abs(outs[name] - base).max()) for name in ("shared prefix (ours)", "CrossEncoder.predict")}

    examples = pairs[: args.train_batch]
    step_ids = [shared.token_ids([p.query], [p.positive if i % 2 == 0 else p.negatives[0]], instruction, ml)[0]
                for i, p in enumerate(examples)]
    labels = torch.tensor([int(i % 2 == 0) for i in range(len(examples))])
    grads: dict[str, torch.Tensor] = {}

    def stepper(name, model):
        def f(i):
            model.train()
            model.zero_grad()
            input_ids, mask = pad_left(step_ids, model.pad_id, "cpu")
            reranker_sft_loss(model(input_ids, mask), labels, model.yes_id, model.no_id).backward()
            grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return f

    step_tokens = sum(len(x) for x in step_ids)
    log(f"train step: {len(step_ids)} examples ({step_tokens} tokens), eq. 2 loss, forward + backward")
    st = harness.alternate({"shared prefix (ours)": stepper("shared", shared), "full pass (ours)": stepper("full", full)},
                           repeats=args.repeats, warmup=1, log=log)
    train_rows = {name: {"examples": len(step_ids), "tokens": step_tokens, "runs_s": [round(t, 3) for t in ts],
                         "median_s": round(harness.median(ts), 3)} for name, ts in st.items()}
    grad_diff = float((grads["shared"] - grads["full"]).norm() / grads["full"].norm())

    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and native_bf16("cpu"))
    bf16_rows: dict[str, Any] = {}
    if bf16:
        for m in (shared, full):
            m.cfg = m.cfg.model_copy(update={"autocast": "bfloat16"})
            m.eval()
        log("bf16 (autocast): scoring and a train step, shared against full")
        bt = harness.alternate({"shared prefix (ours)": scorer("bf16 shared", shared),
                                "full pass (ours)": scorer("bf16 full", full)}, repeats=args.repeats, warmup=1, log=log)
        bst = harness.alternate({"shared prefix (ours)": stepper("bf16 shared", shared),
                                 "full pass (ours)": stepper("bf16 full", full)}, repeats=args.repeats, warmup=1, log=log)
        bf16_rows = {"score_median_s": {n: round(harness.median(ts), 3) for n, ts in bt.items()},
                     "train_median_s": {n: round(harness.median(ts), 3) for n, ts in bst.items()},
                     "score_max_abs_diff": float(np.abs(outs["bf16 shared"] - outs["bf16 full"]).max())}
        bf16_rows["ratios"] = {k: round(v["full pass (ours)"] / v["shared prefix (ours)"], 3)
                               for k, v in (("score", bf16_rows["score_median_s"]), ("train", bf16_rows["train_median_s"]))}
    step = preset_steps(args, log) if args.steps > 0 else {}
    pps = {n: r["pairs_per_s"] for n, r in score_rows.items()}
    ratios = {"score: shared / full (throughput)": round(pps["shared prefix (ours)"] / pps["full pass (ours)"], 3),
              "score: shared / CrossEncoder (throughput)": round(pps["shared prefix (ours)"] / pps["CrossEncoder.predict"], 3),
              "train: full / shared (step time)": round(train_rows["full pass (ours)"]["median_s"]
                                                        / train_rows["shared prefix (ours)"]["median_s"], 3)}
    return {"model": args.model, "num_layers": args.num_layers, "pairs": args.pairs, "batch_size": bs,
            "max_length": ml, "repeats": args.repeats, "prefix_tokens": prefix, "tokens": tokens,
            "data": "triplets-en/snli_dev_triplets.jsonl (premise, entailed hypothesis; contradiction as negative)",
            "score": score_rows, "train": train_rows, "ratios": ratios,
            "agreement": {"score_max_abs_diff_vs_full": agreement, "train_grad_rel_diff": grad_diff},
            "bf16": bf16_rows, "preset_step": step}


def render(result: dict[str, Any]) -> str:
    layers = f", first {result['num_layers']} layers" if result["num_layers"] else ""
    diff = result["agreement"]["score_max_abs_diff_vs_full"]
    rows = [[name, r["pairs"], r["median_s"], r["pairs_per_s"], diff.get(name, 0.0), " ".join(map(str, r["runs_s"]))]
            for name, r in result["score"].items()]
    out = [harness.table(["scorer", "pairs", "median s", "pairs/s", "max abs diff to full", "runs s"], rows,
                         title=f"rerank: {result['model']}{layers}, {result['pairs']} SNLI pairs ({result['tokens']} "
                               f"tokens, a {result['prefix_tokens']}-token shared prefix each), batch "
                               f"{result['batch_size']}, median of {result['repeats']} alternating"),
           harness.table(["train step", "examples", "tokens", "median s", "runs s"],
                         [[n, r["examples"], r["tokens"], r["median_s"], " ".join(map(str, r["runs_s"]))]
                          for n, r in result["train"].items()],
                         title=f"one SFT step, forward + backward (gradients shared vs full: relative difference "
                               f"{result['agreement']['train_grad_rel_diff']:.2e})"),
           "\n".join(f"- {k}: {v:.2f}x" for k, v in result["ratios"].items())]
    if result["bf16"]:
        b = result["bf16"]
        out.append(harness.table(["bf16 autocast", "shared s", "full s", "full / shared"],
                                 [[k, b[f"{k}_median_s"]["shared prefix (ours)"], b[f"{k}_median_s"]["full pass (ours)"],
                                   f"{b['ratios'][k]:.2f}x"] for k in ("score", "train")],
                                 title=f"bf16 (scores shared against full: max abs diff {b['score_max_abs_diff']:.2e})"))
    steps = result.get("preset_step") or {}
    for p in (steps[stage] for stage in ("reranker", "stage2") if stage in steps):
        out.append(harness.table(
            ["side", "trainable weights", "median s", f"speedup over {p['reference']}", "first-step loss diff", "steps s"],
            [[n, f"{p['trainable_weights'][n]:,}", p["median_s"][n],
              "" if n == p["reference"] else f"{p['speedup'][n]:.2f}x",
              "" if n == p["reference"] else f"{p['first_loss_diff'][n]:.1e}", " ".join(map(str, ts))]
             for n, ts in p["step_s"].items()],
            title=f"the {steps['preset']} preset's {p['stage']} optimizer step ({p['pairs']} pairs of its "
                  f"data files, batch {p['batch_size']}, passes of {p['length_bucket']}, autocast {p['autocast'] or 'off'}), "
                  f"{p['steps']} steps alternating, median from step 2"))
    return "\n\n".join(out)
