"""The Table-5-shaped comparison of ablation settings: rows = settings, columns = tasks + mean,
plus each setting's difference to `full`; and the same over seeds (one `q3e ablate` sweep per seed):
mean ± std per setting, the paired difference to `full`, whether the paper's ordering holds beyond
the noise (`q3e report --ablations`), and its plot."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import pandas as pd

from tasks.report import (DASH, EPS, ReportError, check_mixable, dirty_warning, machines_lines, mean_of, row_scores,
                          run_date, short_commit)

# Paper Table 5, worst to best: each ablation setting should score below the next.
PAPER_ORDER = ("only-synthetic", "no-synthetic", "no-merge", "full")


def ablation_table(scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """{setting: {task: main score}} -> DataFrame with a `mean` column and `Δ mean vs full`."""
    df = pd.DataFrame.from_dict(scores, orient="index").sort_index(axis=1)
    df["mean"] = df.mean(axis=1)
    if "full" in df.index:
        df["delta_vs_full"] = df["mean"] - df.loc["full", "mean"]
    return df


def table_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| setting | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in df.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append("" if v != v else (f"{v:+.4f}" if c == "delta_vs_full" else f"{v:.4f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [c for c in df.columns if c not in ("delta_vs_full",)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(df) * len(tasks) / 3), 3.8))
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        ax.bar([x + i * width for x in range(len(df))], df[t].fillna(0), width, label=t)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(df))], df.index, rotation=30, ha="right")
    ax.set_ylabel("main score")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation_seeds(sweeps: list[dict[str, dict]], path: Path, title: str = "") -> Path:
    """Bars: each setting's mean over the sweeps per task and of `mean`; error bars: the sample std;
    dots: the individual sweeps (seeds). `sweeps` as tasks/report.py load_sweep gives them, with the
    same settings (report_ablation_seeds checks). Written atomically (a temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = ablation_scores(sweeps)
    settings = list(values)
    columns = list(values[settings[0]])  # the tasks, then "mean"
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) * len(columns) / 3), 3.8))
    for i, col in enumerate(columns):
        xs = [x + i * width for x in range(len(settings))]
        per_seed = [values[s][col] for s in settings]
        ax.bar(xs, [statistics.fmean(v) for v in per_seed], width, label=col,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed], capsize=2)
        for x, v in zip(xs, per_seed):  # spread across the bar so the dots do not hide the error bar
            offsets = [width * (j / max(len(v) - 1, 1) - 0.5) * 0.6 for j in range(len(v))]
            ax.plot([x + o for o in offsets], v, "o", color="0.15", markersize=3, markeredgecolor="white",
                    markeredgewidth=0.5)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))], settings, rotation=30, ha="right")
    ax.set_ylabel(f"main score (mean ± std over {len(sweeps)} seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- sweeps over seeds

def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0.0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _check_sweeps(sweeps: list[dict[str, dict]], sweep_ids: list[str]) -> None:
    """Two or more distinct sweeps with the same settings; each setting's runs over the sweeps differ by
    seed alone, and all runs share one preset, commit and data version (the header names one of each)."""
    if len(sweeps) != len(sweep_ids):
        raise ValueError(f"{len(sweeps)} sweeps but {len(sweep_ids)} sweep ids")
    if len(sweep_ids) < 2:
        raise ReportError("an ablation table over seeds needs two or more sweeps (one per seed); a single "
                          "sweep's table is the table.md next to its summaries.json")
    if len(set(sweep_ids)) < len(sweep_ids):
        raise ReportError(f"a sweep is given twice: {sorted(i for i in set(sweep_ids) if sweep_ids.count(i) > 1)}")
    first = list(sweeps[0])
    for sid, sweep in zip(sweep_ids[1:], sweeps[1:]):
        missing, extra = [s for s in first if s not in sweep], [s for s in sweep if s not in sweeps[0]]
        problems = []
        if missing:
            problems.append(f"sweep {sid} has no {', '.join(missing)} (in sweep {sweep_ids[0]})")
        if extra:
            problems.append(f"sweep {sweep_ids[0]} has no {', '.join(extra)} (in sweep {sid})")
        if problems:
            raise ReportError("the sweeps must have the same settings: " + "; ".join(problems))
    for setting in first:
        check_mixable([sweep[setting] for sweep in sweeps])
    for key, what in (("preset", "presets"), ("git_commit", "commits"), ("dvc_data_md5", "data versions")):
        values = {sweep[s][key] for sweep in sweeps for s in first}
        if len(values) > 1:
            listing = ", ".join(f"{sid} {s}: {sweep[s][key]}" for sid, sweep in zip(sweep_ids, sweeps) for s in first)
            raise ReportError(f"refusing to mix sweeps of different {what}: {listing}")


def ablation_scores(sweeps: list[dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """{setting: {task or "mean": [main score of the setting's final model, one per sweep]}}: settings in
    the order of the first sweep (every sweep must have them), tasks sorted, "mean" the mean over tasks
    within each sweep. The final model is an embedder, so its `/rerank` entries (none) are left out."""
    rows = [{s: row_scores(summary["scores"], summary["final_model"]) for s, summary in sweep.items()}
            for sweep in sweeps]
    tasks = sorted({t for per_setting in rows for row in per_setting.values() for t in row})
    out: dict[str, dict[str, list[float]]] = {}
    for setting in sweeps[0]:
        cells: dict[str, list[float]] = {t: [] for t in tasks + ["mean"]}
        for sweep, per_setting in zip(sweeps, rows):
            row = per_setting[setting]
            missing = [t for t in tasks if t not in row]
            if missing:
                summary = sweep[setting]
                raise ReportError(f"run {summary['run_id']} ({setting}): its final model {summary['final_model']!r} "
                                  f"has no score on {', '.join(missing)}; settings compared over seeds must be "
                                  f"evaluated on the same tasks")
            for t in tasks:
                cells[t].append(row[t])
            cells["mean"].append(mean_of([row[t] for t in tasks]))
        out[setting] = cells
    return out


def ordering_checks(means: dict[str, list[float]]) -> list[dict]:
    """The paper's chain only-synthetic < no-synthetic < no-merge < full over the settings present in
    `means` ({setting: [mean score, one per sweep]}, sweeps paired by seed). Each adjacent pair is judged
    on the paired differences d_i = higher_i − lower_i: with SE = sd(d) / √n, "holds" or "reversed" when
    |mean d| > 2 × SE, otherwise "within noise". Returns [{lower, higher, diff, se, n, verdict}]."""
    chain = [s for s in PAPER_ORDER if s in means]
    checks = []
    for lower, higher in zip(chain, chain[1:]):
        d = [h - lo for lo, h in zip(means[lower], means[higher])]
        diff, sd = _mean_std(d)
        se = sd / math.sqrt(len(d))
        verdict = ("holds" if diff > 0 else "reversed") if abs(diff) > max(2 * se, EPS) else "within noise"
        checks.append({"lower": lower, "higher": higher, "diff": diff, "se": se, "n": len(d), "verdict": verdict})
    return checks


def ordering_markdown(checks: list[dict]) -> str:
    if not checks:
        return f"No two settings of the paper's chain ({' < '.join(PAPER_ORDER)}) are in these sweeps."
    lines = [f"The paper's Table 5: {' < '.join(PAPER_ORDER)}. For each adjacent pair present, Δ is the mean "
             f"over seeds of the paired difference (higher setting minus lower, on `mean`); it is beyond noise "
             f"when |Δ| > 2 × SE, SE = sd(differences) / √n, n = {checks[0]['n']}.", ""]
    for c in checks:
        numbers = f"Δ = {c['diff']:+.3f}, 2 × SE = {2 * c['se']:.3f}"
        if c["verdict"] == "within noise":
            sign = "holds" if c["diff"] > 0 else "is reversed" if c["diff"] < 0 else "is zero"
            lines.append(f"- {c['lower']} < {c['higher']}: within noise (the mean difference {sign}): {numbers}")
        else:
            lines.append(f"- {c['lower']} < {c['higher']}: **{c['verdict']}**, beyond noise: {numbers}")
    return "\n".join(lines)


def report_ablation_seeds(sweeps: list[dict[str, dict]], sweep_ids: list[str]) -> str:
    """Ablation settings over seeds, one `q3e ablate` sweep per seed: the final model's main scores as
    mean ± std per setting, the difference to `full` paired by seed, and whether the paper's ordering
    holds beyond the noise. `sweeps` are load_sweep's dicts, in the order of `sweep_ids`."""
    _check_sweeps(sweeps, sweep_ids)
    n, settings = len(sweeps), list(sweeps[0])
    first = sweeps[0][settings[0]]
    values = ablation_scores(sweeps)
    tasks = [t for t in next(iter(values.values())) if t != "mean"]

    listed = [(sid, setting, sweep[setting]) for sid, sweep in zip(sweep_ids, sweeps) for setting in settings]
    seeds = [summary.get("seeds") or {} for _, _, summary in listed]
    varying = sorted({k for d in seeds for k in d if len({str(x.get(k)) for x in seeds}) > 1})
    runs = ["| sweep | setting | run | seeds | date |", "|---|---|---|---|---|"]
    for (sid, setting, summary), sd in zip(listed, seeds):
        shown = ", ".join(f"{k}={sd.get(k)}" for k in varying) or (f"seed={sd['seed']}" if "seed" in sd else DASH)
        runs.append(f"| `{sid}` | {setting} | `{summary['run_id']}` | {shown} | {run_date(summary)} |")

    lines = ["| setting | " + " | ".join(tasks) + " | mean | Δ mean vs full | seed values |",
             "|---|" + "---:|" * (len(tasks) + 2) + "---|"]
    for setting in settings:
        cells = ["{:.3f} ± {:.3f}".format(*_mean_std(values[setting][t])) for t in tasks + ["mean"]]
        if "full" in values and setting != "full":
            paired = [m - f for m, f in zip(values[setting]["mean"], values["full"]["mean"])]
            cells.append("{:+.3f} ± {:.3f}".format(*_mean_std(paired)))
        else:
            cells.append(DASH)
        cells.append(" / ".join(f"{v:.3f}" for v in values[setting]["mean"]))
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    finals = ", ".join(f"{s}: {sweeps[0][s]['final_model']}" for s in settings)

    head = [f"## Ablations over {n} sweeps: preset `{first['preset']}`", "",
            f"Commit `{short_commit(first['git_commit'])}`, data `{first['dvc_data_md5']}`. Each sweep is one "
            f"`q3e ablate` (one seed); a setting's runs differ only by seed, and the sweeps are paired by seed."
            + ("" if varying else " No seed differs between these sweeps: the spread is nondeterminism alone."),
            "", *machines_lines([s for sweep in sweeps for s in sweep.values()]),
            f"Regenerate this text: `q3e report --ablations {' '.join(sweep_ids)}`",
            *dirty_warning(first["git_commit"])]
    sections = ["\n".join(head),
                "### Runs\n\n" + "\n".join(runs),
                f"### Main scores of each setting's final model, mean ± std over {n} sweeps\n\n" + "\n".join(lines)
                + f"\n\nMain score of each task (nDCG@10 for retrieval, Spearman for STS) of each setting's final "
                  f"model ({finals}). `mean` is the mean over tasks within a sweep, then over sweeps; "
                  f"`Δ mean vs full` is the mean ± std over sweeps of the setting's `mean` minus full's in the "
                  f"same sweep (paired by seed); `seed values` are the setting's `mean` in each sweep, in the "
                  f"order of the sweeps given. std is the sample standard deviation (n − 1).",
                "### Ordering\n\n" + ordering_markdown(ordering_checks({s: v["mean"] for s, v in values.items()}))]
    return "\n\n".join(sections) + "\n"
