"""Scheduled retraining: pick up a new DVC version of data/, train, evaluate, and promote the new
embedding model (MLflow registry alias `champion`) only if it is not worse than the current one.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline, run_logger
from tasks import lineage, tracking
from tasks.config import load_config


def score_of(scores: dict[str, float], metric: str) -> float:
    if metric == "mean":
        if not scores:
            raise ValueError("no evaluation scores to compare")
        return sum(scores.values()) / len(scores)
    if metric not in scores:
        raise ValueError(f"retrain.metric {metric!r} is not an evaluated task; have {sorted(scores)}")
    return scores[metric]


def decide(new_score: float, current: dict | None, metric: str, tolerance: float) -> tuple[str, str]:
    """("promoted" | "kept", why): promote when there is no champion or new >= champion - tolerance."""
    if current is None:
        return "promoted", f"no champion yet; new {metric} {new_score:.4f}"
    if new_score >= current["score"] - tolerance:
        return "promoted", f"new {metric} {new_score:.4f} >= champion v{current['version']} {current['score']:.4f} - {tolerance}"
    return "kept", (f"new {metric} {new_score:.4f} < champion v{current['version']} {current['score']:.4f} - {tolerance}: "
                    "champion kept")


def champion(name: str, alias: str) -> dict | None:
    """The model version behind `alias` with the tags recorded at promotion, or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    t = mv.tags
    return {"version": mv.version, "run_id": mv.run_id or t.get("run_id"), "score": float(t["score"]),
            "data_md5": t.get("data_md5"), "config_hash": t.get("config_hash"), "source": mv.source}


@flow(name="qwen3-embedding-retrain", log_prints=True)
def retrain(preset: str = "smol", overrides: list[str] | None = None, config_files: list[str] | None = None,
            project_dir: str = ".") -> dict:
    import mlflow

    logger = run_logger()
    cfg = load_config(preset, overrides or [], files=config_files or [])
    rc = cfg.retrain
    root = Path(project_dir).resolve()
    data_md5 = lineage.ensure_config_data(root, cfg)
    tracking.setup(root / cfg.run_dir, cfg.infra.mlflow_experiment, cfg.infra.mlflow_tracking_uri)
    current = champion(rc.registered_model, rc.alias)
    if current and current["data_md5"] == data_md5 and current["config_hash"] == cfg.digest():
        msg = (f"data ({data_md5[:10]}) and config ({cfg.digest()}) unchanged since champion "
               f"v{current['version']}: nothing to retrain")
        logger.info(msg)
        return {"decision": "skipped", "reason": msg, "champion": current}

    summary = pipeline(preset=preset, overrides=overrides, config_files=config_files, project_dir=project_dir)
    new_score = score_of(summary["scores"][summary["final_model"]], rc.metric)
    client = mlflow.MlflowClient()
    pid = summary["run_id"]
    uri = summary.get("model_uris", {}).get("embedding")
    if uri is None:
        raise RuntimeError(f"run {pid} produced no trained embedding model to promote")
    decision, reason = decide(new_score, current, rc.metric, rc.tolerance)
    if decision == "promoted":
        mv = mlflow.register_model(uri, rc.registered_model, tags={
            "score": str(new_score), "metric": rc.metric, "data_md5": data_md5, "config_hash": cfg.digest(),
            "run_id": pid})
        client.set_registered_model_alias(rc.registered_model, rc.alias, mv.version)
        version = mv.version
    else:
        version = current["version"]
    logger.info("retrain: %s (%s)", decision, reason)
    client.set_tag(pid, "retrain.decision", decision)
    client.set_tag(pid, "retrain.reason", reason)
    tracking.log_metrics(pid, {"retrain/new_score": new_score,
                               **({"retrain/champion_score": current["score"]} if current else {})})
    return {"decision": decision, "reason": reason, "version": version, "score": new_score,
            "champion": current, "run_id": pid}


def register_schedule(cron: str, preset: str = "smol", overrides: list[str] | None = None,
                      project_dir: str = ".", name: str | None = None, config_files: list[str] | None = None):
    """The retraining flow as a Prefect deployment on a cron schedule (returns the RunnerDeployment)."""
    return retrain.to_deployment(
        name=name or f"retrain-{preset}", cron=cron,
        parameters={"preset": preset, "overrides": overrides or [], "config_files": config_files or [],
                    "project_dir": str(Path(project_dir).resolve())},
        description=f"Retrain the {preset} preset on the newest data version; promote if not worse.",
        tags=["qwen3-embedding", preset])
