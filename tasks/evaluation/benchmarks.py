"""Several mteb benchmarks in one evaluation, and their summaries as the paper's tables report them.

Benchmarks share tasks (25 of the 190 tasks of MTEB(Multilingual), MTEB(eng, v2), MTEB(cmn, v1) and
MTEB(Code, v1)), sometimes with other subsets or splits: MTEB(eng, v2) runs STS17 on `en-en` only,
MTEB(Multilingual) on 11 language pairs. Each task is evaluated once, on the union of what its
benchmarks ask for, and each benchmark scores it on its own subsets and splits (as mteb's
leaderboard does, `_get_score_fast`).

Per benchmark:
  Mean(Task) = mean over the benchmark's tasks of each task's main score;
  Mean(Type) = mean over task types (Retrieval, STS, Classification, ...; mteb's metadata `type`)
               of the mean main score of that type's tasks.
A task without a score makes both None (mteb does the same) and is listed in `missing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import mteb

# What mteb 2.26 knows the paper's benchmarks as (`MTEB(Multilingual)` is an alias of its v2).
PAPER_BENCHMARKS = ("MTEB(Multilingual)", "MTEB(eng, v2)", "MTEB(cmn, v1)", "MTEB(Code, v1)")

Scope = tuple[tuple[str, ...], tuple[str, ...]]  # (eval splits, subsets) a benchmark scores a task on


@dataclass
class Benchmarks:
    """The tasks to run (each name once) and, per benchmark (mteb's name for it), the scope of each of
    its tasks and the task types."""

    tasks: list
    scopes: dict[str, dict[str, Scope]]
    types: dict[str, str]


def _scope(task) -> Scope:
    return tuple(task.eval_splits), tuple(task.hf_subsets)


def resolve_benchmarks(names: Sequence[str]) -> Benchmarks:
    """The tasks of the named mteb benchmarks (metadata only: running them needs the hub).
    A name mteb does not know is refused with mteb's suggestion (`MTEB(Code)` -> `MTEB(Code, v1)`)."""
    chosen: dict[str, Any] = {}
    scopes: dict[str, dict[str, Scope]] = {}
    types: dict[str, str] = {}
    for name in names:
        try:
            bench = mteb.get_benchmark(name)
        except KeyError as e:
            raise ValueError(f"unknown benchmark {name!r}: {e.args[0] if e.args else e}; "
                             f"e.g. {', '.join(PAPER_BENCHMARKS)}") from None
        if bench.name in scopes:  # an alias of one already listed
            continue
        scopes[bench.name] = {}
        for task in bench.tasks:
            tname = task.metadata.name
            scopes[bench.name][tname] = _scope(task)
            types[tname] = task.metadata.type
            prev = chosen.get(tname)
            if prev is None:
                chosen[tname] = task
                continue
            splits = set(prev.eval_splits) | set(task.eval_splits)
            subsets = set(prev.hf_subsets) | set(task.hf_subsets)
            if (set(prev.eval_splits), set(prev.hf_subsets)) == (splits, subsets):
                continue
            if (set(task.eval_splits), set(task.hf_subsets)) == (splits, subsets):
                chosen[tname] = task
                continue
            meta = task.metadata
            chosen[tname] = mteb.get_task(tname, eval_splits=[s for s in meta.eval_splits if s in splits],
                                          hf_subsets=[s for s in meta.hf_subsets if s in subsets])
    return Benchmarks(list(chosen.values()), scopes, types)


def scoped_score(task_result, scope: Scope) -> float | None:
    """The main score of an mteb TaskResult on a benchmark's splits and subsets: the mean over those
    (split, subset) cells, as mteb's leaderboard computes it. None if none of them was scored."""
    splits, subsets = scope
    values = [float(s["main_score"]) for split in splits for s in task_result.scores.get(split, [])
              if s.get("hf_subset", "default") in subsets]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def benchmark_summary(tasks: Sequence[str], scores: Mapping[str, float | None], types: Mapping[str, str],
                      reranked: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """Mean(Task), Mean(Type) and the per-type means of one benchmark from {task: main score}.

    tasks: the benchmark's task names; scores: what was scored (a task absent or None is missing);
    types: task -> mteb type. Missing tasks make every mean they enter None, and are listed.
    reranked: {task: score after reranking} of the tasks a reranker reranked: adds `rerank` with the
    mean before (the embedder) and after over those tasks (the paper's MTEB-R, CMTEB-R, MMTEB-R).
    """
    missing = [t for t in tasks if not _finite(scores.get(t))]
    by_type: dict[str, list[str]] = {}
    for t in tasks:
        by_type.setdefault(types[t], []).append(t)
    per_type = {ty: None if any(t in missing for t in ts) else _mean([scores[t] for t in ts])
                for ty, ts in sorted(by_type.items())}
    out: dict[str, Any] = {
        "mean_task": None if missing or not tasks else _mean([scores[t] for t in tasks]),
        "mean_type": None if missing or not tasks else _mean(list(per_type.values())),
        "per_type": per_type,
        "n_tasks": len(tasks), "n_missing": len(missing), "missing": missing,
        "scores": {t: scores[t] if t not in missing else None for t in tasks},
    }
    if reranked:
        names = [t for t in tasks if t in reranked]
        incomplete = any(t in missing or not _finite(reranked[t]) for t in names)
        out["rerank"] = {
            "n_tasks": len(names),
            "mean_embedder": None if incomplete else _mean([scores[t] for t in names]),
            "mean_reranked": None if incomplete else _mean([reranked[t] for t in names]),
        }
    return out


def benchmark_metrics(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The numbers of `benchmark_summary`s keyed by a path-safe benchmark name (`MTEB(eng, v2)` ->
    `MTEB-eng-v2`): {name: {mean_task, mean_type, n_missing, per_type: {...}, rerank: {...}}}, for
    MLflow's `eval/<benchmark>/mean_task`. None values are left out."""
    from tasks.evaluation.fingerprints import slug

    out: dict[str, dict[str, Any]] = {}
    for bench, s in summaries.items():
        entry: dict[str, Any] = {k: s[k] for k in ("mean_task", "mean_type", "n_missing") if _finite(s.get(k))}
        for group in ("per_type", "rerank"):
            numbers = {k: v for k, v in (s.get(group) or {}).items() if _finite(v)}
            if numbers:
                entry[group] = numbers
        out[slug(bench)] = entry
    return out
