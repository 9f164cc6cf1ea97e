"""`q3e` commands on pipeline runs: run (the whole pipeline), ablate, rerun, retrain, schedule, and
reading runs back: `runs compare`, lineage, report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flows.cli.common import (ConfigOpt, OverridesArg, PresetOpt, app, base_default, catalog_ready, fail,
                              resolve_config, setup_logging, tracking_ready)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    scores = summary["scores"]
    tasks_ = sorted({t for s in scores.values() for t in s})
    table = Table(title=f"main scores ({summary['preset']}, {summary['ablation']})")
    table.add_column("model")
    for t in tasks_:
        table.add_column(t, justify="right", overflow="fold")
    for name, s in scores.items():
        table.add_row(name + (" (final)" if name == summary["final_model"] else ""),
                      *[f"{s[t]:.4f}" if t in s else "" for t in tasks_])
    console.print(table)
    checks = summary.get("checks") or []
    if checks:
        ct = Table(title="stage checks (each model against the one it was made from)")
        for col in ("check", "on", "score", "input", "result"):
            ct.add_column(col, justify="right" if col in ("score", "input") else "left")
        for c in checks:
            ct.add_row(f"{c['model']} {'≥' if c['op'] == '>=' else '>'} {c['baseline']}", c["task"],
                       f"{c['score']:.4f}", f"{c['baseline_score']:.4f}",
                       "pass" if c["passed"] else "[bold red]FAIL[/bold red]")
        console.print(ct)
    st = Table(title="stages")
    for col in ("stage", "cached", "wall s", "compute s"):
        st.add_column(col, justify="right" if col.endswith("s") else "left")
    for t in summary["stages"]:
        st.add_row(t["stage"], "yes" if t["cached"] else "", f"{t['wall_s']:.1f}", f"{t['compute_s']:.1f}")
    console.print(st)
    console.print(f"total {summary['wall_s']:.0f} s, stage compute {summary['compute_s']:.0f} s, "
                  f"orchestration overhead {summary['overhead_s']:.0f} s")
    uri = summary["tracking_uri"]
    console.print(f"MLflow run [bold]{summary['run_id']}[/bold]; open the results with:\n"
                  f"  .venv/bin/mlflow ui --backend-store-uri {uri}")


@app.command("run")
def run_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    ablation: Optional[str] = typer.Option(None, help="conf/ablations/<name>.yaml overlay (no-synthetic, ...)"),
    project: Path = typer.Option(Path("."), help="project folder: data/, data.dvc, datasets/, runs/"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Run the whole pipeline (the main job): data -> synthesis -> stage 1 -> filtering -> stage 2 ->
    slerp merge -> reranker -> evaluation, as a Prefect flow with Ray tasks, tracked in MLflow and DVC.

    Stages whose inputs did not change are reused; a failed run resumes at the stage that failed."""
    setup_logging()
    cfg = resolve_config(preset, overrides, files, ablation)
    catalog_ready(cfg)  # validate before starting any service
    tracking_ready(cfg, project)
    from flows.pipeline import pipeline

    summary = pipeline(preset=preset, overrides=list(overrides or []), ablation=ablation,
                       config_files=[str(f) for f in files or []], project_dir=str(project))
    _print_summary(summary)


@app.command("ablate")
def ablate_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only these settings (repeatable)"),
    project: Path = typer.Option(Path("."), help="project folder"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Run the ablation sweep (paper Table 5: full, no-merge, no-synthetic, only-synthetic, plus the loss
    ablations) under one MLflow parent run and print the Table-5-shaped comparison with each setting's
    difference to `full`. Each setting is conf/ablations/<name>.yaml; add your own there."""
    setup_logging()
    tracking_ready(resolve_config(preset, overrides, files), project)
    from flows.ablate import ablate

    res = ablate(preset=preset, only=list(only or []) or None, overrides=list(overrides or []),
                 config_files=[str(f) for f in files or []], project_dir=str(project))
    typer.echo(res["markdown"])
    typer.echo(f"table, bar chart and summaries: {res['dir']} (MLflow run {res['run_id']})")


@app.command("rerun")
def rerun_cmd(
    run_id: str = typer.Argument(..., help="MLflow run id of a pipeline run"),
    project: Path = typer.Option(Path("."), help="project folder"),
    run_dir: Path = typer.Option(Path(base_default("run_dir")), help="run folder of the embedded MLflow store"),
    experiment: str = typer.Option(base_default("infra.mlflow_experiment"), help="MLflow experiment name"),
) -> None:
    """Reproduce a run from MLflow: same preset, ablation and resolved configuration (its config.yaml)."""
    setup_logging()
    from flows.ablate import rerun_args
    from flows.pipeline import pipeline
    from tasks import tracking

    args = rerun_args(run_id, project / run_dir if not run_dir.is_absolute() else run_dir, experiment)
    commit = tracking.git_commit(project.resolve())
    if args["git_commit"] and args["git_commit"] != commit:
        typer.secho(f"warning: run {run_id} was made at commit {args['git_commit']}, this is {commit}", fg="yellow")
    summary = pipeline(preset=args["preset"], ablation=args["ablation"], config_files=args["config_files"],
                       project_dir=str(project))
    if args["dvc_data_md5"] and args["dvc_data_md5"] != summary["data_md5"]:
        typer.secho(f"warning: data version differs: run had {args['dvc_data_md5']}, now {summary['data_md5']}",
                    fg="yellow")
    _print_summary(summary)


@app.command("retrain")
def retrain_cmd(
    preset: str = PresetOpt, files: Optional[List[Path]] = ConfigOpt,
    project: Path = typer.Option(Path("."), help="project folder"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Retrain on the newest data version and promote the new model (registry alias `champion`) only if
    it is not worse than the current champion on the configured metric (retrain.*)."""
    setup_logging()
    tracking_ready(resolve_config(preset, overrides, files), project)
    from flows.retrain import retrain

    res = retrain(preset=preset, overrides=list(overrides or []), config_files=[str(f) for f in files or []],
                  project_dir=str(project))
    typer.echo(f"{res['decision']}: {res['reason']}")


@app.command("schedule")
def schedule_cmd(
    cron: str = typer.Option(..., help='cron schedule, e.g. "0 3 * * 0" (Sundays 03:00)'),
    preset: str = PresetOpt,
    project: Path = typer.Option(Path("."), help="project folder the scheduled runs use"),
    name: Optional[str] = typer.Option(None, help="deployment name (default retrain-<preset>)"),
    files: Optional[List[Path]] = ConfigOpt,
    register_only: bool = typer.Option(False, "--register-only",
                                       help="register the deployment with the Prefect API and exit "
                                            "(a worker or `prefect deploy` runs it)"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Serve the retraining flow as a Prefect deployment on a cron schedule.

    Without --register-only this process serves the schedule (keep it running). Scheduling needs a
    Prefect server: `prefect server start` locally, or PREFECT_API_URL pointing at yours; to use a
    work pool instead, see infra/prefect/prefect.yaml and `prefect deploy`."""
    setup_logging()
    resolve_config(preset, overrides, files)
    from flows.retrain import register_schedule

    deployment = register_schedule(cron, preset, list(overrides or []), str(project), name,
                                   config_files=[str(Path(f).resolve()) for f in files or []])
    if register_only:
        dep_id = deployment.apply()
        typer.echo(f"registered deployment {deployment.name!r} ({dep_id}) with cron {cron!r}")
        return
    from prefect import serve

    serve(deployment)


runs_app = typer.Typer(help="Compare pipeline runs recorded in MLflow.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("compare")
def runs_compare_cmd(
    experiment: str = typer.Option(base_default("infra.mlflow_experiment"), help="MLflow experiment name"),
    filter_string: str = typer.Option("", "--filter", help="MLflow search filter, e.g. \"tags.preset = 'smol'\""),
    run_dir: Path = typer.Option(Path(base_default("run_dir")), help="run folder of the embedded MLflow store"),
    out: Path = typer.Option(Path("runs/compare"), help="writes <out>.csv and <out>.md"),
    metric_prefix: str = typer.Option("final/", help="which metrics become columns"),
) -> None:
    """Print the comparison table of pipeline runs (mlflow.search_runs) and write it as CSV and Markdown."""
    from tasks import tracking

    tracking.setup(run_dir, experiment)
    df = tracking.comparison_table(experiment, filter_string, metric_prefix)
    if df.empty:
        typer.echo("no runs found")
        raise typer.Exit(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    md = df.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else df.to_string(index=False)
    out.with_suffix(".md").write_text(md + "\n")
    typer.echo(md)
    typer.echo(f"\nwritten: {out.with_suffix('.csv')}, {out.with_suffix('.md')}")


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


@app.command("lineage")
def lineage_cmd(
    run_id: str = typer.Argument(..., help="an MLflow pipeline run id"),
    run_dir: Path = typer.Option(Path(base_default("run_dir")), help="run folder of the embedded MLflow store"),
    experiment: str = typer.Option(base_default("infra.mlflow_experiment"), help="MLflow experiment name"),
) -> None:
    """Print where a run's models came from: git commit, config hash, DVC versions of the input data
    and of the generated data sets, and each stage's artifact folder and content key."""
    import mlflow

    from tasks import tracking

    tracking.setup(run_dir, experiment)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise fail(ValueError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}: {e}")) from None
    t = run.data.tags
    typer.echo(f"run {run_id} ({run.info.run_name}), status {run.info.status}")
    for key in ("preset", "ablation", "git_commit", "config_hash", "dvc_data_md5", "dvc_synthetic_md5",
                "dvc_filtered_md5", "model_uri.embedding", "model_uri.reranker"):
        if key in t:
            typer.echo(f"  {key:20s} {t[key]}")
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    for c in children:
        ct = c.data.tags
        typer.echo(f"  stage {ct.get('stage', c.info.run_name):16s} key {ct.get('stage_key', '')} "
                   f"{'(cached) ' if ct.get('cached') == 'true' else ''}{ct.get('artifact_dir', '')}")


# Typer keeps the line breaks of a help text's later paragraphs: each paragraph is one string here.
REPORT_HELP = "\n\n".join([
    "Print the Markdown report of pipeline runs from their summary.json alone (no MLflow), to paste or --out "
    "into README.md and docs/: the numbers then come from a command at a known commit.",
    "One run: header (run id, preset, ablation, git commit, config hash, data version, date, the command that "
    "reproduces it), main score of every model per task, stage checks (stage 1 >= backbone, stage 2 >= stage 1, "
    "merged >= stage 2, reranker > final embedder), synthesis acceptance, wall time per stage.",
    "Several runs (one configuration over seeds): mean ± std per model and task; runs of different commits, "
    "data versions or configurations other than their seeds are refused.",
    "Example: q3e report --latest --out docs/results-smol.md",
    "--ablations: the ids are `q3e ablate` sweep ids (their MLflow parent runs; each sweep wrote "
    "<run-dir>/ablations/<sweep id>/summaries.json), one sweep per seed, e.g. each run with stage1.seed=S "
    "stage2.seed=S reranker.seed=S: each setting's final-model scores as mean ± std over the sweeps, its "
    "difference to full paired by seed, the per-seed means, and whether the paper's ordering only-synthetic < "
    "no-synthetic < no-merge < full holds beyond the noise (|mean difference| > 2 standard errors). --plot "
    "PATH also draws the settings over seeds as a bar chart (PNG).",
    "Example: q3e report --ablations SWEEP_0 SWEEP_1 SWEEP_2 --out docs/ablations-smol.md "
    "--plot docs/ablations-smol.png",
])


@app.command("report", help=REPORT_HELP)
def report_cmd(
    run_ids: Optional[List[str]] = typer.Argument(None, help="MLflow run id(s) of pipeline runs; several = one "
                                                  "configuration over seeds; with --ablations: sweep ids"),
    latest: bool = typer.Option(False, "--latest", help="report the run whose summary.json was written last"),
    run_dir: Path = typer.Option(Path(base_default("run_dir")), "--run-dir", help="the runs' run_dir: summaries are "
                                 "<run-dir>/runs/<run id>/summary.json"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the Markdown to this file (atomically) "
                                       "instead of stdout"),
    ablations: bool = typer.Option(False, "--ablations", help="the ids are `q3e ablate` sweep ids, one sweep per "
                                   "seed: each setting over seeds and the paper's ordering"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="with --ablations: also write a bar chart (PNG) of "
                                        "the settings over seeds to this file"),
) -> None:
    """Markdown report of one run, of one configuration over seeds, or of ablation sweeps over seeds
    (see REPORT_HELP)."""
    from tasks.data import atomic_write_text
    from tasks.ablation import report_ablation_seeds
    from tasks.report import ReportError, latest_run_id, load_summary, load_sweep, report_seeds, run_report

    try:
        if ablations and latest:
            raise ReportError("--latest picks one run, not sweeps: with --ablations give the sweep ids")
        if plot is not None and not ablations:
            raise ReportError("--plot draws ablation sweeps over seeds: use it with --ablations")
        if latest and run_ids:
            raise ReportError("give run ids or --latest, not both")
        ids = [latest_run_id(run_dir)] if latest else list(run_ids or [])
        if not ids:
            raise ReportError("give two or more sweep ids" if ablations else "give one or more run ids, or --latest")
        if ablations:
            sweeps = [load_sweep(run_dir, sid) for sid in ids]
            text = report_ablation_seeds(sweeps, ids)
        else:
            summaries = [load_summary(run_dir, rid) for rid in ids]
            text = run_report(summaries[0]) if len(summaries) == 1 else report_seeds(summaries)
    except ReportError as e:
        raise fail(e) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}")
    if plot is not None:
        from tasks.ablation import plot_ablation_seeds

        preset = next(iter(sweeps[0].values()))["preset"]
        plot_ablation_seeds(sweeps, plot, title=f"ablations ({preset}) over {len(sweeps)} seeds")
        typer.echo(f"wrote {plot}", err=out is None)  # not into the Markdown on stdout
