"""Ablation sweep (paper Table 5) and reruns.

Each setting is the pipeline with one `conf/ablations/<name>.yaml` overlay (`full` = none), run as
a subflow under one MLflow parent run. Stages shared between settings have the same content keys,
so they are computed once: a sweep costs little more than its distinct parts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline, run_logger
from tasks import tracking
from tasks.ablation import ablation_table, plot_ablation, table_markdown
from tasks.config import load_config
from tasks.data import atomic_write_text


@flow(name="qwen3-embedding-ablations", log_prints=True)
def ablate(preset: str = "smol", only: list[str] | None = None, overrides: list[str] | None = None,
           config_files: list[str] | None = None, project_dir: str = ".") -> dict:
    """Run every setting (or `only` those), then build the Table-5-shaped comparison."""
    import mlflow

    logger = run_logger()
    cfg = load_config(preset, overrides or [], files=config_files or [])
    settings = list(only or cfg.ablations.settings)
    for name in settings:  # fail before anything runs if a setting has no overlay
        load_config(preset, overrides or [], ablation=name, files=config_files or [])
    root = Path(project_dir).resolve()
    run_dir = root / cfg.run_dir
    experiment_id = tracking.setup(run_dir, cfg.infra.mlflow_experiment, cfg.infra.mlflow_tracking_uri)
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, run_name=f"ablations-{preset}", tags={
        "preset": preset, "ablation": "sweep", "pipeline": "ablations", "config_hash": cfg.digest(),
        "git_commit": tracking.git_commit(root), "settings": ",".join(settings), **tracking.driver_tags()})
    pid = parent.info.run_id
    t0 = time.perf_counter()
    summaries: dict[str, dict] = {}
    status = "FAILED"
    try:
        for name in settings:
            logger.info("ablation %s", name)
            summaries[name] = pipeline(preset=preset, overrides=overrides, ablation=name,
                                       config_files=config_files, project_dir=project_dir, parent_run_id=pid)
        table = ablation_table({n: s["scores"][s["final_model"]] for n, s in summaries.items()})
        out = run_dir / "ablations" / pid
        atomic_write_text(out / "table.md", table_markdown(table))
        table.to_csv(out / "table.csv.tmp", index_label="setting")
        (out / "table.csv.tmp").replace(out / "table.csv")
        plot_ablation(table, out / "table.png", title=f"ablations ({preset})")
        atomic_write_text(out / "summaries.json", json.dumps(summaries, indent=2, default=str))
        for f in ("table.md", "table.csv", "table.png", "summaries.json"):
            client.log_artifact(pid, str(out / f))
        metrics = {}
        for setting, row in table.iterrows():
            for col, value in row.items():
                if value == value:  # not NaN
                    metrics[f"ablation/{setting}/{col}"] = float(value)
        metrics["time/wall_s"] = time.perf_counter() - t0
        tracking.log_metrics(pid, metrics)
        status = "FINISHED"
        return {"run_id": pid, "table": table.to_dict(orient="index"), "markdown": table_markdown(table),
                "dir": str(out), "summaries": summaries}
    finally:
        client.set_terminated(pid, status=status)


def rerun_args(run_id: str, run_dir: Path, experiment: str, configured_uri: str | None = None) -> dict:
    """The pipeline arguments that reproduce an MLflow run: its preset, ablation and the resolved
    configuration it logged (config.yaml), applied as a config file."""
    import mlflow

    tracking.setup(run_dir, experiment, configured_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    local = Path(client.download_artifacts(run_id, "config.yaml", str(run_dir / "reruns" / run_id)))
    tags = run.data.tags
    return {"preset": tags["preset"], "ablation": tags.get("ablation") or None, "config_files": [str(local)],
            "git_commit": tags.get("git_commit"), "dvc_data_md5": tags.get("dvc_data_md5")}
