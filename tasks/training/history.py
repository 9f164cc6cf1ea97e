"""The metrics history of a training run: `metrics.jsonl` (one line per optimizer step, appended
as the run goes, cut back to a checkpoint's length on resume) and its loss / learning-rate plot."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import TrainConfig
from tasks.data import atomic_write_text


def step_record(cfg: TrainConfig, step: int, loss: float, lr: float, grad_norm: float, dt: float,
                n_pairs: int, count: int) -> dict:
    """One line of metrics.jsonl; `count` = texts encoded (embedding) or tokens (reranker)."""
    rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
           "pairs_per_s": n_pairs / dt}
    rec["texts_per_s" if cfg.objective == "embedding" else "tokens_per_s"] = count / dt
    return rec


def write_history(out_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl = exactly `history` (atomic)."""
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def append_history(out_dir: Path, rec: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_history(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the checkpoint's history_len drops it
            break
    return out


def plot_history(history: list[dict], path: Path, title: str = "") -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [r["loss"] for r in history], marker=".")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("loss"), ax[0].set_title(f"{title} loss")
    ax[1].plot(steps, [r["lr"] for r in history], color="tab:orange")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("learning rate"), ax[1].set_title("schedule")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
