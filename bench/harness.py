"""The measurement harness every benchmark shares: what the machine is, how busy it is, how long
a thing takes (alternating sides, warm-up, median), and how much memory a configuration needs
(run in a fresh subprocess, peak RSS read from /proc).

Peak memory: a process's peak RSS (VmHWM) only grows, so each configuration runs in its own
interpreter (`fresh_process`). Inside it, the work function calls `mark_baseline()` after the
model is loaded; that records the RSS at that point and resets VmHWM (writing 5 to
/proc/self/clear_refs, Linux >= 4.0) so the reported `step_peak_mb` is the peak of the measured
steps alone. Where the reset is refused, `step_peak_mb` is the whole process's peak and
`hwm_reset` is false.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = Path(os.environ.get("Q3E_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULT_MARK = "@@BENCH_RESULT@@ "


def offline_env() -> None:
    """No hub, no telemetry: every benchmark runs on bundled models and local data."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                 ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)


# ----------------------------------------------------------------------------- the machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def _mem_total_gib() -> float:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return round(int(m.group(1)) / 2**20, 1) if m else 0.0
    except OSError:
        return 0.0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions and the date: the context of every figure."""
    import torch

    return {
        "cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)), "ram_gib": _mem_total_gib(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def wait_until_quiet(threshold: float = 1.5, poll_s: float = 120.0, max_wait_s: float = 2400.0,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `threshold` or `max_wait_s` has passed."""
    t0 = time.monotonic()
    while True:
        load1 = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if load1 < threshold:
            return {"quiet": True, "waited_s": round(waited), "load_1m": round(load1, 2), "threshold": threshold}
        if waited + poll_s > max_wait_s:
            log(f"load {load1:.2f} still >= {threshold} after {waited:.0f} s: running anyway")
            return {"quiet": False, "waited_s": round(waited), "load_1m": round(load1, 2), "threshold": threshold}
        log(f"load {load1:.2f} >= {threshold}: waiting {poll_s:.0f} s (waited {waited:.0f} s)")
        time.sleep(poll_s)


class CpuMonitor:
    """Samples, once a second, how many cores the rest of the machine keeps busy: all busy CPU time
    (/proc/stat) minus that of this process tree (psutil, children included), per wall second.
    The load average cannot tell the two apart, and our own 2 threads are part of it."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, float] = {}  # pid -> last CPU seconds (processes that end keep their total)
        self._gone = 0.0

    @staticmethod
    def _busy_s() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _own_s(self) -> float:
        import psutil

        me = psutil.Process()
        now: dict[int, float] = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                now[p.pid] = t.user + t.system
            except psutil.Error:
                continue
        for pid, last in self._seen.items():
            if pid not in now:
                self._gone += last
        self._seen = now
        return sum(now.values()) + self._gone

    def _run(self) -> None:
        busy0, own0, t0 = self._busy_s(), self._own_s(), time.monotonic()
        while not self._stop.wait(self.interval):
            busy1, own1, t1 = self._busy_s(), self._own_s(), time.monotonic()
            self.samples.append(max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-6)))
            busy0, own0, t0 = busy1, own1, t1

    def __enter__(self) -> "CpuMonitor":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [0.0]
        return {"other_cores_busy_mean": round(statistics.fmean(s), 2),
                "other_cores_busy_max": round(max(s), 2), "samples": len(self.samples)}


# ----------------------------------------------------------------------------- timing

def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(sides: dict[str, Callable[[int], Any]], *, repeats: int, warmup: int = 1,
              log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Run each side `warmup` times, then `repeats` rounds of one call per side, the order of the
    sides rotated each round so that background load and thermal drift hit all sides alike.
    `fn(i)` gets the round index (e.g. to pick that round's batch). Returns seconds per call."""
    names = list(sides)
    for w in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            sides[name](-1 - w)
            if log:
                log(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            sides[name](r)
            times[name].append(time.perf_counter() - t0)
            if log:
                log(f"  round {r + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
    return times


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """fp32 n^3 matmul throughput with torch's default threads: the denominator of the FLOP-rate
    fractions. `best` is the peak; `median` shows how much the shared machine took away."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "best_gflops": round(max(rates), 1), "median_gflops": round(median(rates), 1)}


# ----------------------------------------------------------------------------- memory (fresh processes)

def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


_BASELINE: dict[str, Any] = {}


def mark_baseline() -> None:
    """Call after loading, before the measured work: records RSS and resets the peak."""
    _BASELINE["rss_mb"] = _status_kib("VmRSS") / 1024
    _BASELINE["load_peak_mb"] = _status_kib("VmHWM") / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _BASELINE["reset"] = True
    except OSError:
        _BASELINE["reset"] = False


def memory_report() -> dict[str, Any]:
    hwm = _status_kib("VmHWM") / 1024
    base = _BASELINE.get("rss_mb", 0.0)
    load_peak = _BASELINE.get("load_peak_mb", 0.0)
    return {"rss_before_mb": round(base, 1), "step_peak_mb": round(hwm, 1),
            "step_delta_mb": round(hwm - base, 1), "process_peak_mb": round(max(hwm, load_peak), 1),
            "hwm_reset": bool(_BASELINE.get("reset", False))}


def fresh_process(target: str, kwargs: dict[str, Any], *, timeout: float = 900.0,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `module:function(**kwargs)` in a new interpreter; returns its result dict plus the
    memory figures of `memory_report()`. kwargs and the result must be JSON."""
    cmd = [sys.executable, "-m", "bench.harness", target, json.dumps(kwargs)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{target}({kwargs}) failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}\n{proc.stdout[-1000:]}")
    out = json.loads(lines[-1][len(RESULT_MARK):])
    out["process_wall_s"] = round(time.perf_counter() - t0, 2)
    if log:
        log(f"  fresh process {target} {kwargs}: {out['process_wall_s']:.1f} s")
    return out


def _child(target: str, kwargs_json: str) -> None:
    # Run as `python -m bench.harness`, this file is `__main__`; the work function imports
    # `bench.harness`, a second copy of this module: read the baseline it recorded there.
    shared = importlib.import_module("bench.harness")
    shared.offline_env()
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(**json.loads(kwargs_json))
    result.update(shared.memory_report())
    print(RESULT_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- data

def snli_pairs(n: int, offset: int = 0):
    """Real (premise, entailed hypothesis, contradiction) triplets from SNLI dev, as `Pair`s with
    exactly one hard negative and the stage-2 instruction."""
    from tasks.data import read_pairs

    instruction = "Given a premise, retrieve a hypothesis that is entailed by the premise"
    pairs, _ = read_pairs(SHARED_DATA / "triplets-en" / "snli_dev_triplets.jsonl", instruction=instruction,
                          limit=offset + 2 * n + 64)
    pairs = [p for p in pairs[offset:] if len(p.negatives) == 1]
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} SNLI triplets with one negative, need {n}")
    return pairs[:n]


def passages(n: int) -> list[str]:
    """The first n passages (title + text) of the real NQ/MS MARCO passage file."""
    from tasks.data import doc_text, iter_jsonl

    out = []
    for _, obj in iter_jsonl(SHARED_DATA / "passages" / "en-nq-msmarco.jsonl"):
        out.append(doc_text(obj.get("title") or "", obj["text"]))
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- output

def fmt(x: Any) -> str:
    """Floats with 3-4 significant digits where they matter (1234.5, 12.35, 0.1235, 0.0012)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        a = abs(x)
        return f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.4f}" if a >= 1e-4 or a == 0 else f"{x:.2e}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]], title: str = "") -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    out = ([f"**{title}**", ""] if title else []) + [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])


def write_result(name: str, result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
