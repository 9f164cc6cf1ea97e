"""python -m bench NAME [options]: run one benchmark (or `all`), print its table, write
bench/results/<name>.json with the machine, the load before/after and every raw timing.

Benchmarks (each module of bench/ with NAME, add_arguments, quick_args, run, render):
  train          our trainer step vs sentence-transformers (MNRL / CachedMNRL), same model and data
  gradcache      throughput and peak memory with and without GradCache at growing batch sizes
  encode         Embedder.encode vs SentenceTransformer.encode; bf16 / int8 variants of ours
  synthesis      accepted pairs/min with 1 and 2 Ray workers; batched vs one-at-a-time generation
  orchestration  the whole flow's wall time vs its stages' compute (overhead); a fully cached rerun
  scaling        training step, encoding and filter scoring at 1x, 2x, 4x data
  ray_train      local training loop vs Ray Train with 1 worker: step time and loss on the same batches
  rerank         reranker scoring and SFT step, shared prefix vs full pass vs sentence-transformers CrossEncoder; the preset's optimizer steps
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

QUICK_OUT = Path(tempfile.gettempdir()) / "q3e-bench-quick"  # a smoke run never overwrites the real figures
ORDER = ("train", "gradcache", "encode", "synthesis", "orchestration", "scaling", "ray_train", "rerank")
SUMMARY = {n: line.split(None, 1)[1] for line in __doc__.split("Benchmarks")[1].splitlines()[1:]
           if (n := line.strip().split(" ", 1)[0]) in ORDER}


def _module(name: str):
    return importlib.import_module(f"bench.{name}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds, not a measurement")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default bench/results; with --quick {QUICK_OUT})")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="MINUTES",
                   help="before measuring, wait up to this long for the 1-minute load average to drop "
                        "below --quiet-load (polled every 2 minutes; default 0 = do not wait)")
    p.add_argument("--quiet-load", type=float, default=1.5, help="load average that counts as quiet (default 1.5)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, one per core). On a shared machine 1 thread is far "
                        "less disturbed by other jobs than 2 threads that must wait for each other")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="`python -m bench NAME --help` explains a benchmark and its options.")
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    a = sub.add_parser("all", help="every benchmark in turn, default sizes (< 20 min on 2 cores)",
                       description="Run every benchmark with its default options.")
    _common(a)
    a.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    for name in ORDER:
        mod = _module(name)
        sp = sub.add_parser(name, help=SUMMARY[name], description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        mod.add_arguments(sp)
    return p


def run_one(name: str, args: argparse.Namespace, quiet: dict | None = None) -> dict:
    mod = _module(name)
    if args.quick:
        mod.quick_args(args)
    print(f"\n=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
    before = harness.load_average()
    t0 = time.perf_counter()
    with harness.CpuMonitor() as cpu:
        result = mod.run(args, log=lambda s: print(s, flush=True))
    record = {"benchmark": name, "quick": bool(args.quick), "machine": harness.machine(),
              "load_before": before, "load_after": harness.load_average(), "other_cpu": cpu.summary(),
              "quiet_wait": quiet, "wall_s": round(time.perf_counter() - t0, 1),
              "options": {k: v for k, v in vars(args).items() if k not in ("out", "func") and
                          isinstance(v, (int, float, str, bool, type(None)))},
              **result}
    # a benchmark whose figures depend on an option (ray_train: the preset) names its file by it
    path = harness.write_result(mod.result_name(args) if hasattr(mod, "result_name") else name, record, args.out)
    print(mod.render(record), flush=True)
    print(f"load average before {before}, after {record['load_after']}; other processes kept "
          f"{record['other_cpu']['other_cores_busy_mean']} cores busy on average "
          f"(max {record['other_cpu']['other_cores_busy_max']}); wall {record['wall_s']} s -> {path}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    harness.offline_env()
    sys.path.insert(0, str(harness.ROOT))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else harness.RESULTS
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # fresh processes inherit it
        torch.set_num_threads(args.threads)
    quiet = None
    if args.wait_quiet > 0 and not args.quick:
        quiet = harness.wait_until_quiet(args.quiet_load, 120.0, args.wait_quiet * 60)
    if args.name != "all":
        run_one(args.name, args, quiet)
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t0 = time.perf_counter()
    for name in ORDER:
        if name in skip:
            continue
        sub = build_parser().parse_args([name] + (["--quick"] if args.quick else []) + ["--out", str(args.out)]
                                        + (["--threads", str(args.threads)] if args.threads else []))
        run_one(name, sub, quiet)
    print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
