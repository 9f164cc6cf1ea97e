"""`q3e`: the command line of the pipeline. Every command has --help.

Configuration options shared by most commands:
  --preset NAME        conf/presets/NAME.yaml (micro, smol, qwen3-0.6b, qwen3-4b, qwen3-8b)
  --config FILE        extra YAML overlays (repeatable)
  KEY.SUB=VALUE ...    overrides, e.g. stage2.steps=10 stage2.loss.temperature=0.02
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="Train and evaluate Qwen3-Embedding-style embedding and reranker models "
         "(arXiv 2506.05176): synthesis, filtering, contrastive pre-training, SFT, slerp merging, MTEB.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

PresetOpt = typer.Option("smol", "--preset", "-p", help="conf/presets/<name>.yaml: micro, smol, qwen3-0.6b, ...")
ConfigOpt = typer.Option(None, "--config", "-c", help="extra YAML overlay files, applied in order")
OverridesArg = typer.Argument(None, help="overrides key.sub=value, e.g. stage2.steps=10")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(preset: str, overrides: Optional[List[str]], files: Optional[List[Path]] = None, ablation: str | None = None):
    from tasks.config import ConfigError, load_config

    try:
        return load_config(preset, overrides or [], files=files or [], ablation=ablation)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg="red", err=True)
    return typer.Exit(1)


@app.command("config")
def config_cmd(preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
               ablation: Optional[str] = typer.Option(None, help="conf/ablations/<name>.yaml overlay"),
               overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the fully resolved configuration (base + preset + ablation + files + overrides) as YAML."""
    from tasks.config import dump_yaml

    typer.echo(dump_yaml(_config(preset, overrides, files, ablation)))


@app.command("train")
def train_cmd(
    stage: str = typer.Option("stage2", help="which stage's settings to use: stage1, stage2 or reranker"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (checkpoints/, final/, metrics.jsonl); "
                                                      "rerunning resumes from its newest checkpoint"),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help="training data (pairs JSONL or BEIR folder); "
                                                                       "replaces the stage's configured data"),
    init: Optional[Path] = typer.Option(None, help="start from this saved model instead of the backbone"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Train one stage (embedding: improved InfoNCE; reranker: yes/no SFT) and save checkpoints + final model."""
    from tasks.config import DataSource
    from tasks.data import DataError
    from tasks.train import train

    _setup_logging()
    cfg = _config(preset, overrides, files)
    if stage not in ("stage1", "stage2", "reranker"):
        raise _fail(ValueError(f"--stage must be stage1, stage2 or reranker, got {stage!r}"))
    tcfg = getattr(cfg, stage)
    if data:
        tcfg = tcfg.model_copy(update={"data": [DataSource(path=d) for d in data]})
    model_cfg = cfg.reranker_backbone if tcfg.objective == "reranker" else cfg.model
    try:
        res = train(tcfg, model_cfg, out, init=init)
    except (DataError, ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    first, last = (res.history[0]["loss"], res.history[-1]["loss"]) if res.history else (float("nan"),) * 2
    typer.echo(f"trained {len(res.history)} steps: loss {first:.4f} -> {last:.4f}; "
               f"{res.seconds_per_step:.2f} s/step (median); peak memory {res.peak_memory_mb:.0f} MiB")
    typer.echo(f"model: {res.final}")


@app.command("merge")
def merge_cmd(
    checkpoints: List[Path] = typer.Argument(..., help="two or more model folders (e.g. stage-2 checkpoints)"),
    out: Path = typer.Option(..., "--out", "-o", help="merged model folder (written atomically)"),
    weights: Optional[List[float]] = typer.Option(None, "--weight", "-w", help="one weight per checkpoint (default equal)"),
    base: Optional[Path] = typer.Option(None, help="task-vector variant: slerp the deltas from this model"),
) -> None:
    """Slerp-merge checkpoints tensor by tensor (paper §3.5); linear fallback for near-parallel tensors."""
    from tasks.merge import slerp_merge

    try:
        path = slerp_merge(checkpoints, out, weights=weights or None, base=base)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(e) from None
    typer.echo(f"merged {len(checkpoints)} checkpoints -> {path}")


@app.command("encode")
def encode_cmd(
    model: str = typer.Argument(..., help="saved model folder, backbone spec (micro, bundled:smollm2) or hub name"),
    texts: List[str] = typer.Argument(..., help="texts to embed"),
    instruction: Optional[str] = typer.Option(None, help="task instruction: formats texts as queries"),
    dim: Optional[int] = typer.Option(None, help="MRL dimension"),
) -> None:
    """Embed texts and print the cosine similarity matrix (a quick look at a model)."""
    import numpy as np

    from tasks.models import Embedder

    emb = Embedder.load(model).encode(texts, instruction=instruction, dim=dim)
    sims = emb @ emb.T
    typer.echo(f"embeddings: {emb.shape[0]} x {emb.shape[1]}")
    for t, row in zip(texts, sims):
        typer.echo(f"{t[:40]:40s} " + " ".join(f"{x:6.3f}" for x in np.asarray(row)))


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="a saved embedding or reranker model folder"),
    out: Path = typer.Option(..., "--out", "-o", help="export folder"),
) -> None:
    """Re-export a model: embedding -> SentenceTransformer folder; reranker -> causal LM + cross-encoder/."""
    from tasks.models import load_any

    m = load_any(model, device="cpu")
    m.save(out)
    typer.echo(f"exported {type(m).__name__.lower()} -> {out}")


# --- commands of the other stages are registered below (synth, filter, eval, run, ...) ---


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
