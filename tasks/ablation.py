"""The Table-5-shaped comparison of ablation settings: rows = settings, columns = tasks + mean,
plus each setting's difference to `full`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


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
