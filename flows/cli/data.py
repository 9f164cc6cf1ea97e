"""`q3e` commands on training data: synth (LLM-synthesised pairs), filter (keep the pairs the model
agrees with) and `data check` (a preset's sources, counted and sampled, without training)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from flows.cli.common import (ConfigOpt, OverridesArg, PresetOpt, app, catalog_ready, data_ready, fail,
                              resolve_config, setup_logging)


@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="output folder: shard-*.jsonl, rejected/, stats.json; "
                                                      "rerunning it generates only the missing shards"),
    passages: Optional[List[Path]] = typer.Option(None, "--passages", help="passage JSONL (BEIR corpus.jsonl or "
                                                  "records with text/passage); repeatable; replaces synth.passages"),
    personas: Optional[Path] = typer.Option(None, "--personas", help="persona file, one per line "
                                            "(default synth.personas)"),
    num_passages: Optional[int] = typer.Option(None, "--num-passages", "-n", help="use the first N passages"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Ray actors, each loading the generator once"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default "
                                              "infra.ray_address, then $RAY_ADDRESS, else a local instance)"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Synthesise training pairs with an LLM (paper §3.3, A.1): retrieval (persona configuration, then
    query generation), bitext, STS and classification, mixed by synth.kinds.

    Example: q3e synth -o runs/synth -n 16 --passages ../shared/data/passages/en-nq-msmarco.jsonl
    --personas ../shared/data/personas/personahub-5k.txt synth.generator.max_new_tokens=64
    """
    from pydantic import ValidationError

    from tasks.config import SynthConfig
    from tasks.data import DataError
    from tasks.distributed import init_ray, place_actors
    from tasks.models import ModelLoadError
    from tasks.synthesis.generators import GeneratorError
    from tasks.synthesis.run import synthesize

    setup_logging()
    cfg = resolve_config(preset, overrides, files)
    if not passages:
        data_ready(cfg)
    update = {k: v for k, v in {"passages": [str(p) for p in passages] if passages else None,
                                "personas": str(personas) if personas else None,
                                "num_passages": num_passages, "workers": workers}.items() if v is not None}
    address = ray_address or cfg.infra.ray_address
    try:
        scfg = SynthConfig.model_validate(cfg.synth.model_dump() | update)
        init_ray(address, cfg.infra.ray_num_cpus)
        res = synthesize(scfg, out, placement=place_actors(scfg, "synth", address=address), progress=True)
    except (ValidationError, DataError, ModelLoadError, GeneratorError, ValueError, FileNotFoundError) as e:
        raise fail(e) from None
    typer.echo(f"{res.stats['accepted']} pairs accepted, {res.stats['rejected']} rejected, "
               f"{len(res.shards)} shards -> {out} (stats.json, rejected/)")


@app.command("filter")
def filter_cmd(
    pairs: Path = typer.Argument(..., help="folder of synthetic shards (the --out of q3e synth)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: kept shard-*.jsonl, dropped/, report.json, "
                                                      "scores.png; rerunning it scores only the missing shards"),
    embedder: Optional[str] = typer.Option(None, "--embedder", "-e", help="scoring model: a saved model folder (the "
                                           "stage-1 model), micro, bundled:smollm2, bundled:all-minilm-l6-v2 or a "
                                           "sentence-transformers folder (default filter.embedder)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="keep pairs with cosine > this "
                                              "(default filter.threshold, 0.7)"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Ray actors, each loading the model once"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default "
                                              "infra.ray_address, then $RAY_ADDRESS, else a local instance)"),
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Filter synthetic pairs (paper §3.3): keep those whose cos(query with its instruction, document)
    under the scoring model is above the threshold (and, with filter.round_trip_k, whose document
    is among the scorer's top k for its query)."""
    from pydantic import ValidationError

    from tasks.config import FilterConfig
    from tasks.data import DataError
    from tasks.distributed import init_ray, place_actors
    from tasks.filter import filter_pairs
    from tasks.models import ModelLoadError

    setup_logging()
    cfg = resolve_config(preset, overrides, files)
    update = {k: v for k, v in {"threshold": threshold, "workers": workers}.items() if v is not None}
    address = ray_address or cfg.infra.ray_address
    try:
        fcfg = FilterConfig.model_validate(cfg.filter.model_dump() | update)
        init_ray(address, cfg.infra.ray_num_cpus)
        res = filter_pairs(fcfg, pairs, out, embedder=embedder or fcfg.embedder,
                           placement=place_actors(fcfg, "filter", address=address), progress=True)
    except (ValidationError, DataError, ModelLoadError, ValueError, FileNotFoundError) as e:
        raise fail(e) from None
    r = res.report
    rule = f"cos > {r['threshold']:g}" + (f", document in the top {r['round_trip']['k']}" if r.get("round_trip") else "")
    typer.echo(f"kept {r['kept']} of {r['total']} pairs ({rule}) -> {out} "
               f"(report.json, {res.histogram.name})")


data_app = typer.Typer(help="A preset's training data: local files, BEIR folders and the data catalog "
                              "(conf/catalog.yaml: the paper's Table 6 sets on the hub).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    offline: bool = typer.Option(False, "--offline", help="every catalog source reads its entry's local stand-in "
                                 "(data.catalog_offline=true): no hub needed"),
    samples: int = typer.Option(100, "--samples", "-n", min=1, help="pairs streamed per catalog source (a bounded "
                                "scan; files and BEIR folders are counted whole)"),
    project: Path = typer.Option(Path("."), help="project folder: data/ (restored when missing)"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Check a preset's training data without training: each stage1 / stage2 / reranker source with its
    kind (file, BEIR, catalog), task type, how many pairs it gives and one sample pair.

    Catalog sources are streamed from the hub up to -n pairs (nothing is cached); --offline reads their
    local stand-ins. Example: q3e data check --preset qwen3-0.6b --offline
    """
    from rich.console import Console
    from rich.table import Table

    from tasks.data import DataError, resolve_path
    from tasks.data.sources import check_source
    from tasks.lineage import LineageError, ensure_config_data

    cfg = resolve_config(preset, list(overrides or []) + (["data.catalog_offline=true"] if offline else []), files)
    stages = [(name, getattr(cfg, name)) for name in ("stage1", "stage2", "reranker") if getattr(cfg, name).enabled]
    catalog_ready(cfg)  # a bad catalog entry is one line before anything is restored or read
    paths = [s for _, st in stages for s in st.data if s.path is not None]
    if paths and not (project / cfg.data.dir).exists():
        try:
            version = ensure_config_data(project, cfg)
        except LineageError as e:
            raise fail(e) from None
        typer.echo(f"data: restored {cfg.data.dir}/ (version {version[:10]})", err=True)
    rows = []
    try:
        for name, st in stages:
            for src in st.data:
                c = check_source(src, project, max_pairs=samples)
                rows.append((name, _source_label(src), c.kind, ", ".join(c.tasks), _pairs_label(c), _sample(c.first)))
            synthetic = _synthetic_row(cfg, name, project, samples)
            if synthetic:
                rows.append((name, *synthetic))
    except DataError as e:
        raise fail(e) from None
    table = Table(title=f"training data of {preset}" + (" (catalog: local stand-ins)" if offline else ""))
    for i, col in enumerate(("stage", "source", "kind", "task", "pairs", "sample")):
        # a source is never cut (its first line is the whole path or entry name); task types fold
        widest = max((len(r[i].splitlines()[0]) for r in rows if r[i]), default=0) if col == "source" else None
        table.add_column(col, justify="right" if col == "pairs" else "left", no_wrap=col == "sample",
                         min_width=widest, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if cfg.synth.reuse and not resolve_path(cfg.synth.reuse, project).exists():
        typer.echo(f"note: synth.reuse {cfg.synth.reuse} not found under {project}: the run would synthesise")


def _cut(text: str, n: int) -> str:
    """`text` on one line, at most n characters (an ellipsis where it was cut)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _source_label(src) -> str:
    name = src.catalog + (" (stand-in)" if src.offline else "") if src.catalog else src.path
    name = name if len(name) <= 40 else "…" + name[-39:]
    return name + (f" limit {src.limit:,}" if src.limit else "")


def _pairs_label(c) -> str:
    if c.complete:
        return f"{c.pairs:,}"
    if c.limit and c.pairs >= c.limit:
        return f"{c.pairs:,} (limit)"
    return f"streaming: >={c.pairs:,} in {c.rows:,} rows"


def _sample(pair) -> str:
    if pair is None:
        return "(no pairs)"
    return f"{_cut(pair.query, 32)} -> {_cut(pair.positive, 40)} [{len(pair.negatives)} neg]"


def _synthetic_row(cfg, stage: str, project: Path, samples: int) -> tuple[str, ...] | None:
    """The synthetic pairs the pipeline adds to a stage (stage 1: all; stage 2, reranker: the filtered)."""
    from tasks.config import DataSource
    from tasks.data import resolve_path
    from tasks.data.sources import check_source

    if not cfg.synth.enabled or (stage != "stage1" and not cfg.filter.enabled):
        return None
    if stage != "stage1":
        return ("filtered synthetic pairs (made by the run)", "synthetic", ", ".join(cfg.synth.kinds), "-", "")
    reuse = cfg.synth.reuse and resolve_path(cfg.synth.reuse, project)
    if not reuse or not reuse.is_dir():
        return ("synthetic pairs (made by the run)", "synthetic", ", ".join(cfg.synth.kinds), "-", "")
    c = check_source(DataSource(path=str(reuse)), max_pairs=10**9)
    return (f"{cfg.synth.reuse} (synth.reuse)", "synthetic", ", ".join(c.tasks), _pairs_label(c),
            _sample(c.first))
