"""Markdown reports of pipeline runs, made from their `summary.json` alone (no MLflow), so the
numbers in README.md and docs/ come from a command at a known commit instead of being typed in:

    q3e report RUN_ID                 one run: results table, stage checks, synthesis, wall time
    q3e report RUN_A RUN_B RUN_C      the same configuration over seeds: mean ± std per model and task
    q3e report --ablations SWEEP_A SWEEP_B SWEEP_C
                                      ablation sweeps, one per seed: mean ± std per setting, the paired
                                      difference to full, and whether the paper's ordering beats the noise

A summary is the dict flows/pipeline.py writes to `<run_dir>/runs/<run id>/summary.json`; a sweep
is the `{setting: summary}` flows/ablate.py writes to `<run_dir>/ablations/<sweep id>/summaries.json`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Rows of the results table, in the order of the recipe; the chain is what each model starts from.
MODEL_ORDER = ("backbone", "stage1", "stage2", "merged", "reranker")
CHAIN = ("backbone", "stage1", "stage2", "merged")
RERANK = "/rerank"  # evaluate_model's suffix for a retrieval task scored after reranking
DASH = "–"
# Scores are means of float sums: a stage that matches its input to the last bit may differ by 1e-17.
EPS = 1e-9


class ReportError(ValueError):
    """A summary that cannot be reported (missing, unreadable, or runs that must not be mixed)."""


# ----------------------------------------------------------------------------- loading (the only I/O)

def summary_path(run_dir: str | Path, run_id: str) -> Path:
    return Path(run_dir) / "runs" / run_id / "summary.json"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None


def load_summary(run_dir: str | Path, run_id: str) -> dict:
    path = summary_path(run_dir, run_id)
    if not path.is_file():
        raise ReportError(f"run {run_id}: no summary at {path} (a pipeline run writes it when it finishes; "
                          f"is --run-dir the run_dir of that run?)")
    summary = _read_json(path)
    if not isinstance(summary, dict) or "scores" not in summary:
        raise ReportError(f"{path}: not a pipeline run summary (no field 'scores')")
    # summaries written before the field existed: the file's time is when the run finished
    finished = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    summary.setdefault("date", finished.isoformat(timespec="seconds"))
    return summary


def sweep_path(run_dir: str | Path, sweep_id: str) -> Path:
    return Path(run_dir) / "ablations" / sweep_id / "summaries.json"


def load_sweep(run_dir: str | Path, sweep_id: str) -> dict[str, dict]:
    """{setting: run summary} of one `q3e ablate` sweep (`sweep_id`: its MLflow parent run id)."""
    path = sweep_path(run_dir, sweep_id)
    if not path.is_file():
        raise ReportError(f"sweep {sweep_id}: no summaries at {path} (`q3e ablate` writes it when the sweep "
                          f"finishes; is --run-dir the run_dir of that sweep?)")
    sweep = _read_json(path)
    if not isinstance(sweep, dict) or not sweep:
        raise ReportError(f"{path}: not an ablation sweep's summaries ({{setting: run summary}})")
    finished = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    for setting, summary in sweep.items():
        if not isinstance(summary, dict):
            raise ReportError(f"{path}: setting {setting!r} is not a pipeline run summary")
        for key in ("run_id", "final_model", "scores"):
            if key not in summary:
                raise ReportError(f"{path}: setting {setting!r} is not a pipeline run summary (no field {key!r})")
        summary.setdefault("date", finished)  # as in load_summary: the sweep finished after its runs
    return sweep


def latest_run_id(run_dir: str | Path) -> str:
    """The run whose summary.json under `<run_dir>/runs/` was written last."""
    found = sorted((p.stat().st_mtime, p.parent.name) for p in (Path(run_dir) / "runs").glob("*/summary.json"))
    if not found:
        raise ReportError(f"no run summaries under {Path(run_dir) / 'runs'} (*/summary.json)")
    return found[-1][1]


# ----------------------------------------------------------------------------- what a summary records

def seeds_of(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The seeds of a flattened config: `seed`, `stage2.seed`, `synth.seed`, ..."""
    return {k: v for k, v in sorted(flat_config.items()) if k.rsplit(".", 1)[-1] == "seed"}


def config_digest_without_seeds(flat_config: dict[str, Any]) -> str:
    """Hash of the resolved config with every seed left out: runs that differ only by seed share it."""
    rest = {k: v for k, v in flat_config.items() if k.rsplit(".", 1)[-1] != "seed"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reproduce_command(summary: dict) -> str:
    """The shell command that runs this configuration again at the run's commit."""
    if "overrides" not in summary:  # written before the invocation was recorded: MLflow has its config.yaml
        return f"q3e rerun {summary['run_id']}"
    parts = ["q3e", "run", "--preset", summary["preset"]]
    if summary.get("ablation") not in (None, "full"):
        parts += ["--ablation", summary["ablation"]]
    for f in summary.get("config_files") or []:
        parts += ["--config", f]
    cmd = " ".join(shlex.quote(str(p)) for p in parts + list(summary["overrides"]))
    commit = summary.get("git_commit")
    if commit and commit != "unknown":
        cmd = f"git checkout {commit.removesuffix('-dirty')} && {cmd}"
    return cmd


def task_names(scores: dict[str, dict[str, float]]) -> list[str]:
    """Every task of any model, without the `/rerank` variants (they share their task's column)."""
    return sorted({t.removesuffix(RERANK) for s in scores.values() for t in s})


def model_names(scores: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in scores] + [m for m in scores if m not in MODEL_ORDER]


def row_scores(scores: dict[str, dict[str, float]], model: str) -> dict[str, float]:
    """{task: main score} of one row: the reranker's row is its reranked retrieval scores only (its
    other entries are the final embedder's own scores, already in that model's row)."""
    s = scores.get(model, {})
    if model == "reranker":
        return {t.removesuffix(RERANK): v for t, v in s.items() if t.endswith(RERANK)}
    return {t: v for t, v in s.items() if not t.endswith(RERANK)}


def mean_of(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def stage_checks(scores: dict[str, dict[str, float]], final_model: str) -> list[dict]:
    """Each model against the one it was made from, per task and on the mean over their common tasks.

    stage1 >= backbone, stage2 >= stage1, merged >= stage2 (a model absent from the run is skipped:
    stage 2 without stage 1 is checked against the backbone), and reranker > final embedder on the
    retrieval tasks it reranked. Returns [{name, model, baseline, task, op, score, baseline_score,
    passed}]; `name` (e.g. `stage2_vs_stage1/mean`) is the MLflow metric key after `check/`.
    """
    present = [m for m in CHAIN if m in scores]
    pairs = [(m, prev, ">=") for prev, m in zip(present, present[1:])]
    if "reranker" in scores and final_model in scores:
        pairs.append(("reranker", final_model, ">"))
    checks = []
    for model, baseline, op in pairs:
        mine, theirs = row_scores(scores, model), row_scores(scores, baseline)
        common = sorted(set(mine) & set(theirs))
        rows = [(t, mine[t], theirs[t]) for t in common]
        if common:
            rows.append(("mean", mean_of([mine[t] for t in common]), mean_of([theirs[t] for t in common])))
        for task, a, b in rows:
            checks.append({"name": f"{model}_vs_{baseline}/{task}", "model": model, "baseline": baseline,
                           "task": task, "op": op, "score": a, "baseline_score": b,
                           "passed": bool(a >= b - EPS if op == ">=" else a > b + EPS)})
    return checks


# ----------------------------------------------------------------------------- Markdown pieces

def _f(x: float | None, digits: int = 3) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def _two(a: float, b: float) -> tuple[str, str]:
    """Both numbers with enough decimals (3 to 6) that different numbers do not print the same."""
    for digits in range(3, 7):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            return f"{a:.{digits}f}", f"{b:.{digits}f}"
    return f"{a:.3f}", f"{b:.3f}"  # equal within float noise


def run_date(summary: dict) -> str:
    raw = summary.get("date")
    try:
        return datetime.fromisoformat(raw).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError):
        return str(raw or "date unknown")


def machine_text(summary: dict) -> str | None:
    """'Intel(R) Xeon(R) ..., 2 CPUs, bf16: AMX, no GPU, torch 2.13.0+cpu', or None for a run
    made before runs recorded their machine."""
    m = summary.get("machine")
    if not m:
        return None
    gpu = "no GPU" if m.get("gpu", "none") == "none" else f"GPU {m['gpu']}"
    return f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, bf16 matrix instructions: {m.get('cpu_bf16', '?')}, {gpu}, torch {m.get('torch', '?')}"


MACHINE_NOTE = ("Scores repeat bit for bit on the same commit, config, data and kind of machine; on another CPU "
                "or GPU the bf16 matrix products (evaluation, and training under `autocast: auto`) round "
                "differently and the scores move within their seed spread.")


def short_commit(commit: str | None) -> str:
    if not commit:
        return "unknown"
    base, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
    return base[:12] + ("-dirty" if dirty else "")


def dirty_warning(commit: str | None) -> list[str]:
    if commit and commit.endswith("-dirty"):
        return ["", "> **Warning:** the run was made with uncommitted changes, so the commit above does not "
                    "contain the code that produced these numbers. Commit, rerun, and regenerate."]
    return []


def _row_label(model: str, final_model: str, first_stage: str | None = None) -> str:
    if model == final_model:
        return f"{model} (final)"
    if model == "reranker":
        return f"reranker (top-k of {'the fixed first stage' if first_stage else final_model})"
    return model


def results_table(summary: dict) -> str:
    """One row per model in recipe order, one column per task plus the mean, main scores to 3 decimals."""
    scores, final = summary["scores"], summary["final_model"]
    tasks = task_names(scores)
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for model in model_names(scores):
        row = row_scores(scores, model)
        mean = mean_of(list(row.values())) if set(row) == set(tasks) else None
        cells = [_f(row.get(t)) for t in tasks] + [_f(mean)]
        lines.append(f"| {_row_label(model, final, summary.get('first_stage'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmarks_table(summary: dict) -> str | None:
    """Mean(Task) / Mean(Type) per model and mteb benchmark (the paper's Tables 2-3; the reranker's
    row: the mean nDCG@10 of the benchmark's reranked tasks, MTEB-R etc. of Table 4), from the
    summary's `benchmarks` {model: {benchmark: tasks.evaluation.benchmarks.benchmark_summary}}.
    None when the run evaluated no mteb benchmark."""
    per_model = {m: b for m, b in (summary.get("benchmarks") or {}).items() if b}
    if not per_model:
        return None
    names = list(dict.fromkeys(b for benches in per_model.values() for b in benches))
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    final = summary["final_model"]
    for model in model_names(per_model):
        cells = []
        for bench in names:
            s = per_model[model].get(bench)
            if s is None:
                cells.append(DASH)
            elif model == "reranker":
                rr = s.get("rerank") or {}
                cells.append(f"{_f(rr.get('mean_reranked'))} ({rr.get('n_tasks', 0)} reranked)")
            else:
                cell = f"{_f(s['mean_task'])} / {_f(s['mean_type'])}"
                cells.append(cell + (f" ({s['n_missing']} of {s['n_tasks']} missing)" if s["n_missing"] else ""))
        lines.append(f"| {_row_label(model, final, summary.get('first_stage'))} | " + " | ".join(cells) + " |")
    note = ("Mean(Task) / Mean(Type) of each mteb benchmark: the mean main score over its tasks, and the "
            "mean over task types of each type's mean. A benchmark with a missing task has no mean.")
    if "reranker" in per_model:
        note += " The reranker row is the mean after reranking over the benchmark's reranked tasks."
    return "\n".join(lines) + "\n\n" + note


def checks_markdown(checks: list[dict]) -> str:
    if not checks:
        return "No stage checks: the run has a single model."
    failed = sum(not c["passed"] for c in checks)
    lines = [f"{len(checks) - failed} of {len(checks)} checks pass"
             + (f", **{failed} FAIL**." if failed else ".")]
    for c in checks:
        a, b = _two(c["score"], c["baseline_score"])
        op = "≥" if c["op"] == ">=" else ">"
        verdict = "pass" if c["passed"] else "**FAIL**"
        lines.append(f"- {verdict}: {c['model']} {op} {c['baseline']} on {c['task']}: {a} vs {b}")
    return "\n".join(lines)


def stages_table(summary: dict) -> str:
    lines = ["| stage | cached | wall s | compute s |", "|---|---|---:|---:|"]
    for t in summary.get("stages", []):
        cached = "yes" if t["cached"] else ""
        lines.append(f"| {t['stage']} | {cached} | {t['wall_s']:.1f} | {t['compute_s']:.1f} |")
    lines.append(f"| **total** | | {summary['wall_s']:.1f} | {summary['compute_s']:.1f} |")
    return "\n".join(lines) + (f"\n\nOrchestration overhead (total wall time minus stage compute): "
                               f"{summary['overhead_s']:.1f} s.")


def _breakdown_table(key: str, counts: dict) -> str:
    what = key.removeprefix("by_").replace("_", " ")
    if all(isinstance(v, dict) and "accepted" in v for v in counts.values()):
        lines = [f"| {what} | accepted | total | rate |", "|---|---:|---:|---:|"]
        for name, c in counts.items():
            total = c["accepted"] + c.get("rejected", 0)
            rate = f"{100 * c['accepted'] / total:.1f}%" if total else DASH
            lines.append(f"| {name} | {c['accepted']} | {total} | {rate} |")
        return "\n".join(lines)
    # plain counts: shard_stats counts these over the accepted pairs only, so there is no rate
    total = sum(v for v in counts.values() if isinstance(v, (int, float)))
    lines = [f"| {what} | accepted | share of accepted |", "|---|---:|---:|"]
    for name, n in counts.items():
        lines.append(f"| {name} | {n} | {100 * n / total:.1f}% |" if total else f"| {name} | {n} | {DASH} |")
    return "\n".join(lines)


def synthesis_markdown(summary: dict) -> str | None:
    stats = summary.get("synthesis")
    if not stats:
        return None
    accepted = stats.get("accepted", 0)
    total = stats.get("passages", accepted + stats.get("rejected", 0))
    parts = [f"Accepted {accepted} of {total} synthetic pairs"
             + (f" ({100 * accepted / total:.1f}%)" if total else "")
             + (f", generator `{stats['generator']}`" if isinstance(stats.get("generator"), str) else "") + "."]
    if "stage1" in summary["scores"]:
        pairs = (summary.get("train_pairs") or {}).get("stage1", accepted)
        parts[0] += f" Stage 1 trained on {pairs} pairs."
    run = stats.get("run") or {}
    if run.get("reused_from"):
        parts[0] += (f" The pairs were not generated in this run: its {run.get('shards_reused')} shards were "
                     f"copied from `{run['reused_from']}` (made by `q3e synth` with the same settings; "
                     f"`synth.reuse=null` generates them in the run).")
    elif run.get("seconds") is not None:
        parts[0] += f" Generated in this run in {run['seconds']:.0f} s with {run.get('workers')} worker(s)."
    for key, counts in stats.items():
        if key.startswith("by_") and isinstance(counts, dict) and counts:
            parts.append(_breakdown_table(key, counts))
    note = filter_note(summary.get("filter"))
    if note:
        parts.append(note)
    return "\n\n".join(parts)


def filter_note(rep: dict | None) -> str | None:
    """One paragraph on the filter: what it kept (per task kind with a round trip), and whether its
    scorer separates real pairs from mismatched ones (tasks/filter.py). With a round trip the rank
    does the separating, so the threshold's mismatched share is no warning."""
    if not rep:
        return None
    rt = rep.get("round_trip")
    rule = f"cos > {rep['threshold']:g}" + (
        f" and the pair's document among the scorer's top {rt['k']} of all synthetic documents (round trip)"
        if rt else "")
    text = (f"Filter: {rule}, scored by `{rep['embedder']}`, kept {rep['kept']} of "
            f"{rep['total']} pairs ({100 * rep['kept_fraction']:.1f}%)")
    if rt:
        kinds = ", ".join(f"{k} {v['kept']} of {v['total']}" for k, v in (rep.get("by_task") or {}).items())
        text += f": {kinds}; the round trip dropped {rt['dropped_by_rank']} of the {rt['above_threshold']} " \
                f"above the threshold"
    mm = rep.get("mismatched")
    if mm and not rt:
        text += f"; of mismatched pairs (a query with another pair's document) {100 * mm['kept_fraction']:.1f}% would pass"
    text += "."
    if rep.get("warning") and not rt:
        text += f" **Warning**: {rep['warning']}"
    return text


# ----------------------------------------------------------------------------- the reports

def run_report(summary: dict) -> str:
    """The single-run report: header, results, stage checks, synthesis acceptance, wall time."""
    rid, commit = summary["run_id"], summary.get("git_commit")
    data = summary.get("dvc_data_md5") or summary.get("data_md5", "unknown")
    head = [f"## Run `{rid}`", "",
            f"Preset `{summary['preset']}`, ablation `{summary['ablation']}`, commit `{short_commit(commit)}`, "
            f"config `{summary.get('config_hash', 'unknown')}`, data `{data}`, {run_date(summary)}.", "",
            *([f"Machine: {machine}. {MACHINE_NOTE}", ""] if (machine := machine_text(summary)) else []),
            f"Reproduce: `{reproduce_command(summary)}`  ",
            f"Regenerate this text: `q3e report {rid}`", *dirty_warning(commit)]
    checks = stage_checks(summary["scores"], summary["final_model"])
    why = merge_note(summary, checks)
    sections = ["\n".join(head),
                "### Main scores\n\n" + results_table(summary) + "\n\n" + _score_note(summary)]
    benches = benchmarks_table(summary)
    if benches:
        sections.append("### Benchmarks\n\n" + benches)
    sections.append("### Stage checks\n\n" + checks_markdown(checks) + (f"\n\n{why}" if why else ""))
    synth = synthesis_markdown(summary)
    if synth:
        sections.append("### Synthesis\n\n" + synth)
    sections.append("### Wall time\n\n" + stages_table(summary))
    return "\n\n".join(sections) + "\n"


def merge_note(summary: dict, checks: list[dict]) -> str | None:
    """Why the merged model scores below stage 2 where it does: the checkpoints it merged (merge.json's
    `relative_spread`) and the size of the gap, so a reader can tell a rounding-level difference
    from a merge that hurt."""
    failed = [c for c in checks if c["model"] == "merged" and not c["passed"] and c["task"] != "mean"]
    merge = summary.get("merge") or {}
    if not failed or merge.get("relative_spread") is None:
        return None
    gap = max(c["baseline_score"] - c["score"] for c in failed)
    names = ", ".join(merge.get("checkpoints") or []) or "its checkpoints"
    return (f"Why merged < stage2 on {', '.join(c['task'] for c in failed)} (by at most {gap:.4f}): it slerps "
            f"{names}, which are {100 * merge['relative_spread']:.2f} % apart (relative L2 distance of the "
            f"weights); slerp of checkpoints this close is practically their average. A merge that moves further "
            f"needs checkpoints further apart (`merge.num_checkpoints`, `checkpoint_every`) or "
            f"`merge.method: task_slerp`.")


def _score_note(summary: dict) -> str:
    note = "Main score of each task (nDCG@10 for retrieval, Spearman for STS)."
    if "reranker" in summary["scores"]:
        source = (f"the fixed first stage `{summary['first_stage']}` (eval.first_stage)" if summary.get("first_stage")
                  else summary["final_model"])
        note += f" The reranker row is nDCG@10 after reranking the top-k of {source}."
    return note


def check_mixable(summaries: list[dict]) -> None:
    if len(summaries) < 2:
        raise ReportError("a seeds table needs two or more runs")
    ids = [s["run_id"] for s in summaries]
    if len(set(ids)) < len(ids):
        raise ReportError(f"a run is given twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    for key, what in (("git_commit", "commits"), ("dvc_data_md5", "data versions"),
                      ("config_hash_without_seeds", "configurations (apart from seeds)")):
        missing = [s["run_id"] for s in summaries if not s.get(key)]
        if missing:
            raise ReportError(f"run(s) {', '.join(missing)}: summary.json has no '{key}' (written before runs "
                              f"recorded it); rerun them to report them together")
        values = {s[key] for s in summaries}
        if len(values) > 1:
            listing = ", ".join(f"{s['run_id']}: {s[key]}" for s in summaries)
            raise ReportError(f"refusing to mix runs of different {what}: {listing}")


def seed_statistics(summaries: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{model: {task or "mean": (mean, sample std, n runs)}} over the runs (std 0.0 for one value).
    A row's "mean" is the mean over tasks within each run, then over runs."""
    per: dict[str, dict[str, list[float]]] = {}
    tasks = task_names({m: s for run in summaries for m, s in run["scores"].items()})
    for run in summaries:
        for model in model_names(run["scores"]):
            row = row_scores(run["scores"], model)
            cells = per.setdefault(model, {})
            for t, v in row.items():
                cells.setdefault(t, []).append(v)
            if set(row) == set(tasks):
                cells.setdefault("mean", []).append(mean_of(list(row.values())))
    return {model: {t: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for t, v in cells.items()} for model, cells in per.items()}


def machines_lines(summaries: list[dict]) -> list[str]:
    """The machine the runs were made on, or each run's where they differ (then the spread holds the
    machines' rounding as well as the seeds); nothing when no run recorded one."""
    texts = {s["run_id"]: machine_text(s) or "not recorded" for s in summaries}
    if not any(s.get("machine") for s in summaries):  # runs from before runs recorded it
        return []
    if len(set(texts.values())) == 1:
        return [f"Machine: {next(iter(texts.values()))}.", ""]
    return ["**Machines differ** (the spread below holds their bf16 rounding as well as the seeds):", "",
            *[f"- `{rid}`: {text}" for rid, text in texts.items()], ""]


def report_seeds(summaries: list[dict]) -> str:
    """Mean ± std over runs that differ only by seed, with every run listed."""
    check_mixable(summaries)
    first, n = summaries[0], len(summaries)
    stats = seed_statistics(summaries)
    tasks = task_names({m: s for run in summaries for m, s in run["scores"].items()})
    finals = {s["final_model"] for s in summaries}
    final = first["final_model"] if len(finals) == 1 else None

    seeds = [s.get("seeds") or {} for s in summaries]
    varying = sorted({k for d in seeds for k in d if len({str(x.get(k)) for x in seeds}) > 1})
    runs = ["| run | commit | seeds | date |", "|---|---|---|---|"]
    for s, sd in zip(summaries, seeds):
        shown = ", ".join(f"{k}={sd.get(k)}" for k in varying)
        shown = shown or (f"seed={sd['seed']}" if "seed" in sd else DASH)
        runs.append(f"| `{s['run_id']}` | `{short_commit(s['git_commit'])}` | {shown} | {run_date(s)} |")

    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for model in [m for m in MODEL_ORDER if m in stats] + [m for m in stats if m not in MODEL_ORDER]:
        cells = []
        for t in tasks + ["mean"]:
            if t not in stats[model]:
                cells.append(DASH)
                continue
            mean, std, k = stats[model][t]
            cells.append(f"{mean:.3f} ± {std:.3f}" + (f" (n={k})" if k < n else ""))
        lines.append(f"| {_row_label(model, final) if final else model} | " + " | ".join(cells) + " |")

    # back in the shape of a run's scores (the reranker's entries keep their suffix) for stage_checks
    means = {m: {t + (RERANK if m == "reranker" else ""): v[0] for t, v in cells.items() if t != "mean"}
             for m, cells in stats.items()}
    head = [f"## {n} runs: preset `{first['preset']}`, ablation `{first['ablation']}`", "",
            f"Commit `{short_commit(first['git_commit'])}`, config `{first['config_hash_without_seeds']}` "
            f"(seeds left out), data `{first['dvc_data_md5']}`."
            + ("" if varying else " No seed differs between these runs: the spread is nondeterminism alone."),
            "", *machines_lines(summaries),
            f"Regenerate this text: `q3e report {' '.join(s['run_id'] for s in summaries)}`",
            *dirty_warning(first["git_commit"])]
    sections = ["\n".join(head),
                "### Runs\n\n" + "\n".join(runs) + "\n\nReproduce:\n\n"
                + "\n".join(f"- `{s['run_id']}`: `{reproduce_command(s)}`" for s in summaries),
                f"### Main scores, mean ± std over {n} runs\n\n" + "\n".join(lines) + "\n\n"
                + _score_note(first) + " std is the sample standard deviation (n − 1).",
                "### Stage checks on the means\n\n"
                + checks_markdown(stage_checks(means, final or first["final_model"]))]
    return "\n\n".join(sections) + "\n"
