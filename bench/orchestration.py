"""Orchestration overhead: the whole flow's wall time vs the compute time of its stages.

`flows.pipeline.pipeline` on the `micro` preset in a temporary DVC project
(`dvc.repo.Repo.init(tmp, no_scm=True)`, data copied from the bundled source, a small
`data.include`), synthesis through the ScriptedLLM of tests/conftest.py (an OpenAI-compatible
fake LLM on loopback: the orchestration is real, the LLM answers instantly), real Prefect (one
local API server), real Ray (local, 2 CPUs), a real MLflow store and DVC tracking.

Timed separately, in this order:
  prefect_start_s   the local Prefect API server (prefect_test_harness)
  ray_start_s       ray.init (2 CPUs, no dashboard)
  first run         every stage computed: the summary's wall_s, compute_s (sum of the stages'
                    function time, inside Ray where the stage runs on Ray) and overhead_s =
                    wall - compute (data check, Prefect task runs, Ray dispatch, MLflow logging,
                    DVC tracking, model logging); plus our own clock around the flow call
  second run        the same configuration again: every stage is reused from its content-
                    addressed folder, so its wall time is pure orchestration
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from bench import harness

NAME = "orchestration"
INCLUDE = "[passages/en-nq-msmarco.jsonl, personas/personahub-5k.txt, triplets-en, beir/nq-msmarco-hardneg]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passages", type=int, default=12, help="synthesis passages (default 12)")
    p.add_argument("--pairs", type=int, default=200, help="stage-2 labelled pairs (default 200)")
    p.add_argument("--no-synth", action="store_true", help="synth.enabled=false (no stage 1, no filtering)")


def quick_args(args: argparse.Namespace) -> None:
    args.passages, args.pairs = 4, 50


def overrides(llm_url: str, args: argparse.Namespace) -> list[str]:
    out = [f"data.source={harness.SHARED_DATA}", f"data.include={INCLUDE}",
           f"stage2.data=[{{path: data/triplets-en/snli_dev_triplets.jsonl, limit: {args.pairs}}}]",
           f"reranker.data=[{{path: data/triplets-en/snli_dev_triplets.jsonl, limit: {max(20, args.pairs // 2)}}}]",
           "filter.threshold=0.2"]
    if args.no_synth:
        return out + ["synth.enabled=false"]
    shard = max(1, args.passages // 2)
    return out + ["synth.generator.backend=openai", f"synth.generator.base_url={llm_url}",
                  "synth.generator.model=scripted", f"synth.num_passages={args.passages}", f"synth.shard_size={shard}"]


def _stage_rows(summary: dict) -> list[dict]:
    return [{"stage": t["stage"], "cached": t["cached"], "wall_s": round(t["wall_s"], 3),
             "compute_s": round(t["compute_s"], 3), "overhead_s": round(t["wall_s"] - t["compute_s"], 3)}
            for t in summary["stages"]]


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import ray
    from dvc.repo import Repo
    from prefect.testing.utilities import prefect_test_harness

    from tests.conftest import ScriptedLLM

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    llm_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    runs: dict[str, dict] = {}
    started_ray = not ray.is_initialized()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
            Repo.init(tmp, no_scm=True)
            t0 = time.perf_counter()
            with prefect_test_harness(server_startup_timeout=180):
                prefect_start_s = time.perf_counter() - t0
                from flows.pipeline import pipeline
                from tasks.distributed import init_ray

                t0 = time.perf_counter()
                init_ray(num_cpus=2, object_store_mb=256)
                ray_start_s = time.perf_counter() - t0
                log(f"prefect server {prefect_start_s:.1f} s, ray {ray_start_s:.1f} s")
                for name in ("first", "cached"):
                    t0 = time.perf_counter()
                    s = pipeline(preset="micro", overrides=overrides(llm_url, args), project_dir=tmp)
                    outer = time.perf_counter() - t0
                    stages = _stage_rows(s)
                    in_stages = sum(t["wall_s"] for t in stages)
                    runs[name] = {"outer_wall_s": round(outer, 2), "wall_s": round(s["wall_s"], 2),
                                  "compute_s": round(s["compute_s"], 2), "overhead_s": round(s["overhead_s"], 2),
                                  "overhead_fraction": round(s["overhead_s"] / s["wall_s"], 3),
                                  "overhead_inside_stages_s": round(in_stages - s["compute_s"], 2),
                                  "outside_stages_s": round(s["wall_s"] - in_stages, 2),
                                  "stages_cached": sum(t["cached"] for t in stages), "stages": stages}
                    log(f"  {name} run: wall {s['wall_s']:.1f} s, compute {s['compute_s']:.1f} s, "
                        f"overhead {s['overhead_s']:.1f} s ({runs[name]['stages_cached']}/{len(stages)} reused)")
    finally:
        server.shutdown()
        if started_ray and ray.is_initialized():
            ray.shutdown()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    first, cached = runs["first"], runs["cached"]
    return {"preset": "micro", "synthesis": "disabled" if args.no_synth else "ScriptedLLM (openai backend)",
            "passages": args.passages, "stage2_pairs": args.pairs, "prefect_start_s": round(prefect_start_s, 2),
            "ray_start_s": round(ray_start_s, 2), "runs": runs,
            "ratios": {"first run: wall / compute": round(first["wall_s"] / max(first["compute_s"], 1e-9), 3),
                       "cached run / first run (wall)": round(cached["wall_s"] / first["wall_s"], 3)}}


def render(result: dict[str, Any]) -> str:
    first, cached = result["runs"]["first"], result["runs"]["cached"]
    rows = [[s["stage"], s["wall_s"], s["compute_s"], s["overhead_s"], c["wall_s"]]
            for s, c in zip(first["stages"], cached["stages"])]
    rows.append(["**total (flow)**", first["wall_s"], first["compute_s"], first["overhead_s"], cached["wall_s"]])
    out = harness.table(["stage", "first run wall s", "compute s", "overhead s", "cached run wall s"], rows,
                        title=f"orchestration: micro preset, synthesis {result['synthesis']}, "
                              f"{result['stage2_pairs']} stage-2 pairs")
    return out + "\n\n" + "\n".join([
        f"- first run: wall {first['wall_s']:.1f} s = compute {first['compute_s']:.1f} s + overhead "
        f"{first['overhead_s']:.1f} s ({first['overhead_fraction']:.0%} of the wall time): "
        f"{first['overhead_inside_stages_s']:.1f} s around the stages' work (Prefect task, Ray dispatch, MLflow "
        f"stage run), {first['outside_stages_s']:.1f} s between stages (DVC data check, MLflow set-up, final "
        f"models logged); clock around the flow call {first['outer_wall_s']:.1f} s",
        f"- fully cached second run: {cached['wall_s']:.1f} s ({cached['stages_cached']} stages reused), "
        f"{result['ratios']['cached run / first run (wall)']:.2f}x the first run",
        f"- start-up, not in the runs: Prefect server {result['prefect_start_s']:.1f} s, "
        f"Ray {result['ray_start_s']:.1f} s"])
