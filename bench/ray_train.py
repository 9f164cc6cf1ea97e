"""The local training loop vs Ray Train with 1 worker: time per step and loss on the same batches.

Both sides are `tasks.training.train` with the stage's TrainConfig of --preset (--steps steps,
keep_checkpoints 1), differing only in `distributed`:
  local   engine local: the step loop in this process, on the CPU
  ray     engine ray_train, num_workers 1, resources_per_worker {CPU: 1}, use_gpu false: the same
          loop on one Ray Train worker (DDP over a world of 1, gloo)
Same data: the first 512 SNLI dev triplets (premise, entailed hypothesis, contradiction) with the
SNLI instruction, the same seed, so both sides see the same batches in the same order. Both run
with 1 torch thread (the worker's: its CPUs). Ray is started once, as `q3e train` starts it for
`ray_train` (`tasks.distributed.init_ray`, here with 2 CPUs, no dashboard), and shut down at the end.

Each round trains every stage once per side into a fresh folder, the order of the sides
alternating from round to round (local first in even rounds). Figures per stage: the median of
the per-step times the loop itself records (metrics history `step_time_s`: batch, forward,
backward, optimizer step; not checkpoints, not Ray's reports) over every step after the first
SKIP_STEPS of each run, over all rounds; and the largest |loss difference| between the two sides
at the same step of the same round (the same loss to 1e-6 is what Ray Train must give). The
whole run's wall time (model load, Ray worker-group start-up, checkpoints, final/) is recorded too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness

NAME = "ray_train"
STAGES = ("stage1", "stage2", "reranker")
SIDES = ("local", "ray")
SKIP_STEPS = 2          # the first steps of every run (allocator and caches warming up) are not timed
THREADS = 1             # torch threads of both sides: the worker's CPUs
RAY_CPUS = 2
LOSS_TOLERANCE = 1e-6
PAIRS = 512
SNLI_INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"


def result_name(args: argparse.Namespace) -> str:
    """bench/results/ray_train-<preset>.json: one record per preset."""
    return f"{NAME}-{args.preset}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("micro", "smol"), default="smol",
                   help="configuration preset whose stage settings and models are trained (default smol)")
    p.add_argument("--stages", default="stage2,reranker",
                   help=f"comma-separated stages of the preset: {', '.join(STAGES)} (default stage2,reranker)")
    p.add_argument("--steps", type=int, default=12,
                   help=f"optimizer steps per run (default 12; the first {SKIP_STEPS} are not timed)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side and stage, order alternating (default 2)")


def quick_args(args: argparse.Namespace) -> None:
    args.preset, args.steps, args.rounds = "micro", 6, 1


def side_configs(tcfg, steps: int):
    """The stage's TrainConfig for the local side and for the Ray side (1 worker, 1 CPU)."""
    base = tcfg.model_copy(update={"steps": steps, "keep_checkpoints": 1})
    dist = {"num_workers": 1, "use_gpu": False, "deepspeed": None}
    local = base.model_copy(update={"distributed": base.distributed.model_copy(update={**dist, "engine": "local"})})
    ray = base.model_copy(update={"distributed": base.distributed.model_copy(update={
        **dist, "engine": "ray_train", "backend": "gloo", "resources_per_worker": {"CPU": float(THREADS)}})})
    return {"local": local, "ray": ray}


def train_once(cfg, model_cfg, out_dir: Path, pairs) -> dict[str, Any]:
    """One fresh training run of `cfg` (either engine); its per-step times and losses."""
    import torch

    from tasks.training import train

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the local loop runs in this process; the worker sets its own
    try:
        t0 = time.perf_counter()
        res = train(cfg, model_cfg, out_dir, pairs=pairs, progress=False, device="cpu")
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    steps = [h["step"] for h in res.history]
    if steps != list(range(1, cfg.steps + 1)):
        raise RuntimeError(f"{out_dir}: history has steps {steps}, expected 1..{cfg.steps}")
    return {"wall_s": round(wall, 3), "step_time_s": [h["step_time_s"] for h in res.history],
            "loss": [h["loss"] for h in res.history]}


def bench_stage(cfg, stage: str, args: argparse.Namespace, pairs, root: Path, log) -> dict[str, Any]:
    tcfg = getattr(cfg, stage)
    model_cfg = cfg.reranker_backbone if tcfg.objective == "reranker" else cfg.model
    cfgs = side_configs(tcfg, args.steps)
    skip = min(SKIP_STEPS, args.steps - 1)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for pos, side in enumerate(order):
            run = train_once(cfgs[side], model_cfg, root / f"{stage}-{side}-{r}", pairs)
            run.update(round=r, position=pos)
            runs[side].append(run)
            timed = run["step_time_s"][skip:]
            log(f"  {stage} round {r + 1}/{args.rounds} {side}: {harness.median(timed):.4f} s/step "
                f"(median of {len(timed)}), run {run['wall_s']:.1f} s, "
                f"loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f}")
    med = {s: harness.median([t for run in runs[s] for t in run["step_time_s"][skip:]]) for s in SIDES}
    diffs = [abs(a - b) for lr, rr in zip(runs["local"], runs["ray"]) for a, b in zip(lr["loss"], rr["loss"])]
    max_diff = max(diffs)
    return {
        "objective": tcfg.objective, "backbone": model_cfg.backbone, "batch_size": tcfg.batch_size,
        "grad_accum": tcfg.grad_accum, "checkpoint_every": tcfg.checkpoint_every,
        "steps": args.steps, "timed_steps_per_run": args.steps - skip,
        "local_s_per_step": round(med["local"], 5), "ray_s_per_step": round(med["ray"], 5),
        "ratio_ray_over_local": round(med["ray"] / med["local"], 3),
        "max_abs_loss_diff": max_diff, "same_loss": max_diff <= LOSS_TOLERANCE,
        "run_wall_s_median": {s: round(harness.median([run["wall_s"] for run in runs[s]]), 2) for s in SIDES},
        "runs": runs,
    }


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import ray

    from tasks.config import DataSource, load_config
    from tasks.data import load_sources
    from tasks.distributed import init_ray

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages: {unknown or 'none given'}; choose from {', '.join(STAGES)}")
    if args.steps < 2 or args.rounds < 1:
        raise ValueError(f"need --steps >= 2 and --rounds >= 1, got {args.steps} and {args.rounds}")
    cfg = load_config(args.preset)
    data = harness.SHARED_DATA / "triplets-en" / "snli_dev_triplets.jsonl"
    pairs = list(load_sources([DataSource(path=str(data), limit=PAIRS, instruction=SNLI_INSTRUCTION)]))
    log(f"ray_train/{args.preset}: {len(pairs)} SNLI triplets, stages {', '.join(stages)}, "
        f"{args.steps} steps x {args.rounds} round(s) per side")

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray(num_cpus=RAY_CPUS)  # local start: include_dashboard=False
    ray_start_s = time.perf_counter() - t0
    ray_cpus = ray.cluster_resources().get("CPU")
    log(f"ray start {ray_start_s:.1f} s ({ray_cpus} CPUs)")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as tmp:
            rows = {stage: bench_stage(cfg, stage, args, pairs, Path(tmp), log) for stage in stages}
    finally:
        if started_here:
            ray.shutdown()
    return {"preset": args.preset, "steps": args.steps, "rounds": args.rounds,
            "skip_steps": min(SKIP_STEPS, args.steps - 1), "torch_threads_per_side": THREADS,
            "ray_cpus": ray_cpus, "ray_start_s": round(ray_start_s, 2), "loss_tolerance": LOSS_TOLERANCE,
            "data": f"snli_dev_triplets.jsonl, first {PAIRS} (premise, entailed hypothesis, contradiction)",
            "pairs": len(pairs), "instruction": SNLI_INSTRUCTION, "stages": rows}


def render(result: dict[str, Any]) -> str:
    rows = [[result["preset"], stage, r["local_s_per_step"], r["ray_s_per_step"], f"{r['ratio_ray_over_local']:.2f}",
             f"{r['max_abs_loss_diff']:.2e}", r["steps"]] for stage, r in result["stages"].items()]
    out = harness.table(
        ["preset", "stage", "local s/step", "Ray s/step", "ratio Ray/local", r"max \|loss diff\|", "steps"], rows,
        title=f"ray_train: local loop vs Ray Train (1 worker, {result['torch_threads_per_side']} CPU), "
              f"median step time over steps {result['skip_steps'] + 1}-{result['steps']} of "
              f"{result['rounds']} alternating run(s) per side")
    lines = [f"- {stage}: same loss to {result['loss_tolerance']:g}: {'yes' if r['same_loss'] else 'NO'}; "
             f"whole run (load, start-up, checkpoints) local {r['run_wall_s_median']['local']:.1f} s, "
             f"Ray {r['run_wall_s_median']['ray']:.1f} s" for stage, r in result["stages"].items()]
    lines.append(f"- Ray start-up (once, not in the rows): {result['ray_start_s']:.1f} s")
    return out + "\n\n" + "\n".join(lines)
