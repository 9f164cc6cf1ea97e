"""Filtering of synthetic pairs (paper §3.3): keep a pair when cos(query, document) > threshold.

The query is encoded as a query, with its pair's instruction (SPEC 1: `Instruct: ...\\nQuery:...`);
the document as a document (symmetric tasks, STS and bitext, put the instruction on both sides).
The scoring model is configurable; in the pipeline it is the stage-1 model (paper: pairs with
cosine > 0.7 survive, ~12M of ~150M).

Layout of `out_dir` (one output shard per input shard, written atomically, reruns skip done shards):
  shard-00000.jsonl ...          kept pairs, unchanged but for `meta.filter_score` and
                                 `meta.filter_mismatched_score` (see below)
  dropped/dropped-00000.jsonl    the other pairs, with their score (a subfolder: trainers read *.jsonl)
  report.json                    kept fraction overall / per task kind / per language, score quantiles,
                                 and the same for mismatched pairs
  scores.png                     histogram of the scores per task kind with the threshold line
                                 (and the mismatched pairs' scores as an outline)

Does the threshold mean anything for this scorer? Each query is also scored against the document of
the next pair of its shard (a mismatched pair, `filter_mismatched_score`). A scorer whose cosines
sit in a narrow band (an anisotropic model, e.g. a stage-1 model after few steps) passes mismatched
pairs as readily as real ones: then the filter keeps nearly everything and removes no bad pair.
The report says so (`mismatched.kept_fraction`, a warning when more than half of them pass).
  manifest.json                  scorer, threshold and input shard hashes; other settings are refused

Round trip (`filter.round_trip_k`, off by default): a cosine threshold asks whether query and
document are close, not whether the document is the one the query finds. With `round_trip_k: k` a
pair is also kept only when its document is among the k the scorer ranks highest for its query,
out of the documents of every pair, each encoded as its own pair encodes it (at most
`round_trip_pool` of them, a seeded sample; the pool is drawn from all input shards before any is
scored, so a resumed shard ranks against the same one).
This is the consistency filter of Promptagator (Dai et al. 2022): it drops the pairs whose query
does not pick out its own document, e.g. a translation that is not one, a topic label the scorer
does not give the passage, a query written about nothing in particular (`meta.filter_rank`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tasks.config import FilterConfig, ModelConfig
from tasks.data import DataError, atomic_write_text, iter_jsonl, write_jsonl
from tasks.distributed import Placement, ray_for, run_on_actors
from tasks.models.specs import encoder_id, load_encoder

HISTOGRAM = "scores.png"
log = logging.getLogger(__name__)


MISMATCHED_WARN = 0.5  # warn when more than this share of mismatched pairs passes the threshold


def score_pairs(encoder, records: Sequence[dict[str, Any]], *, batch_size: int = 32) -> np.ndarray:
    """cos(query, document) of each ms-swift record (`query`, `response`, `instruction`?, `symmetric`?)."""
    q, d = pair_embeddings(encoder, records, batch_size=batch_size)
    return (q * d).sum(axis=1)


def mismatched_scores(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """cos(query i, document of record i+1) (cyclic): how a pair scores when query and document do
    not belong together. NaN when there is only one record."""
    if len(q) < 2:
        return np.full(len(q), np.nan, dtype=np.float32)
    return (q * np.roll(d, -1, axis=0)).sum(axis=1)


def pair_embeddings(encoder, records: Sequence[dict[str, Any]], *,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings, document embeddings) of the records, unit length, in record order.
    Texts are grouped by instruction so each group is one batched, length-sorted `encode` call."""
    n = len(records)
    q = np.zeros((n, 0), dtype=np.float32)
    d = q
    groups: dict[Group, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[_group(r)].append(i)
    for (instruction, symmetric), idx in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        qe = encoder.encode([records[i]["query"] for i in idx], instruction=instruction, is_query=True,
                            batch_size=batch_size)
        de = encoder.encode([records[i]["response"] for i in idx], instruction=instruction if symmetric else None,
                            is_query=False, batch_size=batch_size)
        if q.shape[1] == 0:
            q = np.zeros((n, qe.shape[1]), dtype=np.float32)
            d = np.zeros((n, de.shape[1]), dtype=np.float32)
        q[idx], d[idx] = qe, de
    return q, d


Group = tuple[str | None, bool]  # (instruction, symmetric): how a pair's texts are encoded
Candidate = tuple[str | None, str]  # (the instruction its document is encoded with, or None; the document)


def _group(record: dict[str, Any]) -> Group:
    return record.get("instruction") or None, bool(record.get("symmetric"))


def _candidate(record: dict[str, Any]) -> Candidate:
    instruction, symmetric = _group(record)
    return (instruction if symmetric else None), record["response"]


def round_trip_pool(paths: Sequence[Path], size: int, seed: int = 0) -> list[Candidate]:
    """The documents a round trip ranks: each distinct document of the pairs in `paths`, encoded as
    its pair encodes it, at most `size` of them (a seeded reservoir sample, read shard by shard)."""
    rng = random.Random(seed)
    seen: set[Candidate] = set()
    pool: list[Candidate] = []
    for path in paths:
        for rec in _read_shard(path):
            c = _candidate(rec)
            if c in seen:
                continue
            seen.add(c)
            if len(seen) <= size:
                pool.append(c)
            elif (j := rng.randrange(len(seen))) < size:
                pool[j] = c
    return pool


def round_trip_ranks(records: Sequence[dict[str, Any]], q: np.ndarray, scores: np.ndarray,
                     pool: Sequence[Candidate], pool_embeddings: np.ndarray) -> np.ndarray:
    """1 + the number of pool documents, other than the pair's own text, its query is closer to
    than to its own document."""
    texts = np.array([t for _, t in pool], dtype=object)
    closer = (q @ pool_embeddings.T) > scores[:, None]
    for i, rec in enumerate(records):
        closer[i, texts == rec["response"]] = False
    return 1 + closer.sum(axis=1)


def encode_pool(encoder, pool: Sequence[Candidate], batch_size: int) -> np.ndarray:
    """The pool's documents as unit vectors, in pool order."""
    by_instruction: dict[str | None, list[int]] = defaultdict(list)
    for i, (instruction, _) in enumerate(pool):
        by_instruction[instruction].append(i)
    out: np.ndarray | None = None
    for instruction, idx in sorted(by_instruction.items(), key=lambda kv: str(kv[0])):
        e = encoder.encode([pool[i][1] for i in idx], instruction=instruction, is_query=False, batch_size=batch_size)
        if out is None:
            out = np.zeros((len(pool), e.shape[1]), dtype=np.float32)
        out[idx] = e
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


class FilterWorker:
    """A Ray actor: loads the scoring model once (or calls `factory` for it), then scores shard after
    shard; with round-trip `pools`, it encodes them once, on its first shard."""

    def __init__(self, spec: Any, batch_size: int, num_threads: int = 1, factory: Callable[[], Any] | None = None,
                 pool: Sequence[Candidate] | None = None):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.encoder = factory() if factory is not None else load_encoder(spec)
        self.batch_size = batch_size
        self.pool = list(pool or [])
        self.pool_embeddings: np.ndarray | None = None

    def score(self, records: list[dict[str, Any]]) -> list[tuple[float, float, int | None]]:
        """(score, mismatched score, round-trip rank or None) of each record."""
        q, d = pair_embeddings(self.encoder, records, batch_size=self.batch_size)
        scores = (q * d).sum(axis=1)
        ranks: Sequence[int | None] = [None] * len(records)
        if self.pool:
            if self.pool_embeddings is None:
                self.pool_embeddings = encode_pool(self.encoder, self.pool, self.batch_size)
            ranks = round_trip_ranks(records, q, scores, self.pool, self.pool_embeddings).tolist()
        return [(float(s), float(m), r) for s, m, r in zip(scores, mismatched_scores(q, d), ranks)]


@dataclass
class FilterResult:
    out_dir: Path
    shards: list[Path]
    report: dict[str, Any]
    histogram: Path


def _read_shard(path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, obj in iter_jsonl(path):
        for key in ("query", "response"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{path}:{lineno}: missing or empty field {key!r}")
        records.append(obj)
    return records


def _sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def filter_pairs(cfg: FilterConfig, pairs_dir: str | Path, out_dir: str | Path, *,
                 embedder: str | Path | ModelConfig | None, placement: Placement | None = None,
                 progress: bool = True, encoder_factory: Callable[[], Any] | None = None) -> FilterResult:
    """Score every pair of `pairs_dir/shard-*.jsonl` with `embedder` (default `cfg.embedder`) on
    Ray actors and keep those with score > `cfg.threshold`.

    The actors run as `placement` says (the flow's `place_actors`) on the Ray that is up; with no
    placement, as `cfg` asks (`workers`, `cpus_per_worker`, `gpus_per_worker`), and with no Ray up
    on a local instance started for the call (`ray_for`). `encoder_factory` (a picklable
    zero-argument callable returning that model, e.g. wrapped) is called in each worker instead of
    loading `embedder`, which still names the scorer in the manifest."""
    t0 = time.perf_counter()
    spec = embedder if embedder is not None else cfg.embedder
    if spec is None:
        raise ValueError("filter: no scoring model: pass embedder= or set filter.embedder")
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    inputs = sorted(pairs_dir.glob("shard-*.jsonl"))
    if not inputs:
        raise DataError(f"{pairs_dir}: no shard-*.jsonl files to filter")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"embedder": encoder_id(spec), "threshold": cfg.threshold}
    k = cfg.round_trip_k
    if k is not None:  # absent otherwise, so folders filtered before round trips existed stay valid
        settings |= {"round_trip_k": k, "round_trip_pool": cfg.round_trip_pool}
    hashes = {p.name: _sha_file(p) for p in inputs}
    _check_manifest(out_dir, settings, hashes)
    missing = [p for p in inputs if not (out_dir / p.name).is_file()]
    # every input shard draws the pool, so a rerun over the same inputs ranks against the same one
    pool = round_trip_pool(inputs, cfg.round_trip_pool) if k is not None and missing else None

    def write(path: Path, scores: list[tuple[float, float, int | None]]) -> None:
        records = _read_shard(path)
        kept, dropped = [], []
        for rec, (s, m, r) in zip(records, scores):
            extra = ({"filter_score": s} | ({"filter_mismatched_score": m} if m == m else {})  # not NaN
                     | ({"filter_rank": r} if r is not None else {}))
            rec = dict(rec, meta=dict(rec.get("meta") or {}, **extra))
            (kept if s > cfg.threshold and (r is None or r <= k) else dropped).append(rec)
        write_jsonl(out_dir / "dropped" / f"dropped-{path.name.removeprefix('shard-')}", dropped)
        write_jsonl(out_dir / path.name, kept)  # last: its presence marks the shard done

    placement = placement or Placement.requested(cfg)
    tasks = [(p, "score", (_read_shard(p),)) for p in missing]
    if tasks:
        with ray_for(placement):
            run_on_actors(FilterWorker, (spec, cfg.batch_size, placement.threads, encoder_factory, pool), tasks,
                          placement=placement, on_result=write, progress=progress, desc="filter",
                          total=len(inputs))
    report = filter_report(out_dir, [p.name for p in inputs], cfg.threshold, settings["embedder"], round_trip_k=k)
    hist = out_dir / HISTOGRAM
    plot_histogram(out_dir, [p.name for p in inputs], cfg.threshold, hist)
    report["histogram"] = hist.name
    report["run"] = {"workers": placement.actors, "shards_scored": len(missing),
                     "shards_reused": len(inputs) - len(missing),
                     "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if report.get("warning"):
        log.warning("filter: %s", report["warning"])
    if progress:
        print_report(report, title=f"filter -> {out_dir}")
    return FilterResult(out_dir, [out_dir / p.name for p in inputs], report, hist)


def _check_manifest(out_dir: Path, settings: dict[str, Any], hashes: dict[str, str]) -> None:
    path = out_dir / "manifest.json"
    old = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "inputs": {}}
    if old["settings"] != settings:
        raise ValueError(f"{out_dir}: filtered with other settings ({old['settings']} vs {settings}); "
                         f"use a new output folder or delete this one")
    changed = [n for n, h in hashes.items() if n in old["inputs"] and old["inputs"][n] != h
               and (out_dir / n).is_file()]
    if changed:
        raise ValueError(f"{out_dir}: input shards changed since they were filtered: {', '.join(changed)}")
    atomic_write_text(path, json.dumps({"settings": settings, "inputs": old["inputs"] | hashes}, indent=2) + "\n")


def _scored(out_dir: Path, names: Sequence[str]) -> list[tuple[dict[str, Any], bool]]:
    rows = []
    for name in names:
        rows += [(r.get("meta") or {}, True) for _, r in iter_jsonl(out_dir / name)]
        rows += [(r.get("meta") or {}, False)
                 for _, r in iter_jsonl(out_dir / "dropped" / f"dropped-{name.removeprefix('shard-')}")]
    return rows


def filter_report(out_dir: Path, names: Sequence[str], threshold: float, embedder: str, *,
                  round_trip_k: int | None = None) -> dict[str, Any]:
    rows = _scored(out_dir, names)
    scores = np.array([m["filter_score"] for m, _ in rows], dtype=np.float64)

    def group(key: str) -> dict[str, dict[str, Any]]:
        g: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for m, kept in rows:
            c = g[str(m.get(key, "unknown"))]
            c[0] += 1
            c[1] += kept
        return {k: {"total": t, "kept": n, "kept_fraction": round(n / t, 4)} for k, (t, n) in sorted(g.items())}

    kept = sum(k for _, k in rows)
    report = {
        "embedder": embedder, "threshold": threshold, "total": len(rows), "kept": kept,
        "kept_fraction": round(kept / len(rows), 4) if rows else 0.0,
        "by_task": group("task"), "by_language": group("language"),
        "score_quantiles": _quantiles(scores),
    }
    if round_trip_k is not None:
        above = [m for m, _ in rows if m["filter_score"] > threshold]
        report["round_trip"] = {
            "k": round_trip_k, "above_threshold": len(above),
            "dropped_by_rank": sum(m.get("filter_rank", 0) > round_trip_k for m in above),
            "rank_quantiles": _quantiles(np.array([m["filter_rank"] for m, _ in rows if "filter_rank" in m],
                                                  dtype=np.float64))}
    mismatched = np.array([m["filter_mismatched_score"] for m, _ in rows if "filter_mismatched_score" in m],
                          dtype=np.float64)
    if len(mismatched):  # absent from shards scored by an older version, and from one-pair inputs
        share = float((mismatched > threshold).mean())
        report["mismatched"] = {"total": len(mismatched), "kept_fraction": round(share, 4),
                                "score_quantiles": _quantiles(mismatched)}
        if share > MISMATCHED_WARN and round_trip_k is None:  # with a round trip the rank separates them
            report["warning"] = (
                f"the scorer {embedder} passes {100 * share:.0f} % of mismatched pairs (each query with another "
                f"pair's document) at threshold {threshold:g}, against {100 * report['kept_fraction']:.0f} % of "
                f"the real pairs: its cosines do not separate good pairs from bad, so this filter removes "
                f"little that is wrong. Use a scorer whose cosines spread (filter.embedder, e.g. "
                f"bundled:all-minilm-l6-v2) or a higher filter.threshold.")
    return report


def _quantiles(x: np.ndarray) -> dict[str, float]:
    qs = {"min": 0.0, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
    if not len(x):
        return {}
    return {k: round(float(np.quantile(x, q)), 4) for k, q in qs.items()} | {"mean": round(float(x.mean()), 4)}


def plot_histogram(out_dir: Path, names: Sequence[str], threshold: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, list[float]] = defaultdict(list)
    scored = _scored(out_dir, names)
    for m, _ in scored:
        by_task[str(m.get("task", "unknown"))].append(m["filter_score"])
    mismatched = [m["filter_mismatched_score"] for m, _ in scored if "filter_mismatched_score" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    all_scores = [s for v in by_task.values() for s in v]
    if all_scores:
        lo = min(min(all_scores + mismatched), threshold) - 0.05
        hi = max(max(all_scores + mismatched), threshold) + 0.05
        tasks = sorted(by_task)
        bins = np.linspace(lo, hi, 41)
        ax.hist([by_task[t] for t in tasks], bins=bins, stacked=True, label=tasks)
        if mismatched:
            ax.hist(mismatched, bins=bins, histtype="step", color="black", linewidth=1.2,
                    label="mismatched pairs (query, another pair's document)")
        ax.legend(title="task", fontsize=8)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    kept = sum(k for _, k in scored)
    ranked = any("filter_rank" in m for m, _ in scored)
    ax.set_title(f"cos(query, document): {kept}/{len(all_scores)} kept (> {threshold:g}"
                 + (", and a round trip)" if ranked else ")"))
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def print_report(report: dict[str, Any], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("group")
    t.add_column("kept / total", justify="right")
    t.add_column("kept", justify="right")
    t.add_row("all", f"{report['kept']} / {report['total']}", f"{100 * report['kept_fraction']:.1f}%")
    for name in ("by_task", "by_language"):
        for k, c in report[name].items():
            t.add_row(f"{name[3:]}: {k}", f"{c['kept']} / {c['total']}", f"{100 * c['kept_fraction']:.1f}%")
    q = report.get("score_quantiles") or {}
    if q:
        t.add_row("score p05 / p50 / p95", "", f"{q['p05']:.3f} / {q['p50']:.3f} / {q['p95']:.3f}")
    mm = report.get("mismatched")
    if mm:
        t.add_row("mismatched pairs that would pass", "", f"{100 * mm['kept_fraction']:.1f}%")
    t.add_row("threshold", "", f"{report['threshold']:g}")
    rt = report.get("round_trip")
    if rt:
        t.add_row(f"dropped by the round trip (own document not in the top {rt['k']})", "",
                  f"{rt['dropped_by_rank']} of {rt['above_threshold']}")
    Console().print(t)
