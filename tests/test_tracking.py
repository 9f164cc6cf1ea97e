"""MLflow at the edge (tasks/tracking.py): where runs go, what the logging helpers write, the run
comparison table, git provenance and runs left RUNNING by a dead driver. A file MLflow store in
tmp_path (fast to create, read back through the real client); the SQLite default is what the
pipeline tests use."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tasks import tracking


@pytest.fixture
def store(tmp_path, monkeypatch) -> tuple[str, mlflow.MlflowClient]:
    """(experiment id, client) of a fresh file store; MLflow 3 refuses a file store without the opt-in."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = tracking.setup(tmp_path / "runs", "qwen3-embedding", (tmp_path / "mlruns").as_uri())
    return experiment, mlflow.MlflowClient()


def test_the_store_is_the_configured_one_then_the_environment_then_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri(Path("runs"), "http://configured:5000") == "http://configured:5000"
    assert tracking.tracking_uri(Path("runs")) == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(Path("runs")) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # absolute


def test_setup_creates_the_experiment_once_with_artifacts_in_run_dir(store, tmp_path):
    experiment, client = store
    exp = client.get_experiment(experiment)
    assert exp.name == "qwen3-embedding"
    assert exp.artifact_location == (tmp_path / "runs" / "mlartifacts").resolve().as_uri()
    assert tracking.setup(tmp_path / "runs", "qwen3-embedding", (tmp_path / "mlruns").as_uri()) == experiment


def test_params_lists_as_json_long_values_cut_and_more_than_one_batch(store):
    experiment, client = store
    run = client.create_run(experiment).info.run_id
    params = {f"p{i:03d}": i for i in range(150)}  # log_batch takes at most 100 params a call
    params |= {"stage2.data": [{"path": "a.jsonl", "limit": 5}], "eval.tasks": None,
               "synth.prompt": "x" * 7000}
    tracking.log_params(run, params)
    logged = client.get_run(run).data.params
    assert len(logged) == 153 and logged["p149"] == "149" and logged["eval.tasks"] == "None"
    assert json.loads(logged["stage2.data"]) == [{"path": "a.jsonl", "limit": 5}]
    assert logged["synth.prompt"] == "x" * 6000


def test_metrics_keep_finite_numbers_only_under_legal_keys(store):
    experiment, client = store
    run = client.create_run(experiment).info.run_id
    tracking.log_metrics(run, {"eval/nq@64": 0.5, "count": 3, "ok": True, "loss": math.nan, "peak": math.inf,
                               "name": "micro", "eval/ndcg(10)": 0.25}, step=4)
    logged = client.get_run(run).data.metrics
    assert logged == {"eval/nq_64": 0.5, "count": 3.0, "eval/ndcg_10_": 0.25}
    assert [m.step for m in client.get_metric_history(run, "count")] == [4]


def test_history_is_logged_per_step_under_a_prefix(store):
    experiment, client = store
    run = client.create_run(experiment).info.run_id
    history = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "note": "warm-up"} for s in (1, 2, 3)]
    tracking.log_history(run, history)
    assert [(m.step, m.value) for m in client.get_metric_history(run, "train/loss")] == \
        [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert set(client.get_run(run).data.metrics) == {"train/loss", "train/lr"}


def test_eval_results_go_to_an_existing_run_without_the_abstention_metrics(store, tmp_path):
    experiment, client = store
    run = client.create_run(experiment).info.run_id
    results = tmp_path / "results.json"
    results.write_text("{}")
    tracking.log_eval_results(run, {"NFCorpus": {"ndcg_at_10": 0.3, "nauc_ndcg_at_10_max": 0.1}}, results)
    assert client.get_run(run).data.metrics == {"eval/NFCorpus/ndcg_at_10": 0.3}
    assert [a.path for a in client.list_artifacts(run, "eval")] == ["eval/results.json"]
    assert len(client.search_runs([experiment])) == 1  # no run of its own


def test_comparison_table_has_one_row_per_pipeline_run_and_its_final_metrics(store):
    experiment, client = store
    for i, preset in enumerate(("micro", "smol")):
        tags = {"preset": preset, "ablation": "full", "dvc_data_md5": f"{i}" * 32 + ".dir"}
        parent = client.create_run(experiment, start_time=1_700_000_000_000 + 1000 * i, tags=tags).info.run_id
        tracking.log_metrics(parent, {"final/nq": 0.1 * (i + 1), "eval/stage2/nq": 0.05})
        client.create_run(experiment, tags={"mlflow.parentRunId": parent, "stage": "stage2"})
    table = tracking.comparison_table("qwen3-embedding")
    assert list(table.columns) == ["run_id", "start", "status", "preset", "ablation", "data", "final/nq"]
    assert list(table["preset"]) == ["smol", "micro"]  # newest first
    assert list(table["data"]) == ["1" * 10, "0" * 10]
    assert list(table["final/nq"]) == pytest.approx([0.2, 0.1])
    assert list(tracking.comparison_table("qwen3-embedding", "tags.preset = 'micro'")["preset"]) == ["micro"]
    assert tracking.comparison_table("qwen3-embedding", "tags.preset = 'none'").empty


def test_a_run_whose_driver_died_is_marked_killed_and_compare_shows_status(store):
    """A driver killed with SIGKILL leaves its MLflow run RUNNING; the next start marks it KILLED
    (with its stage runs), leaves a live driver's run alone, and `runs compare` has a status column."""
    experiment, client = store
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tags = tracking.driver_tags()
    gone = client.create_run(experiment, tags={**tags, "driver_pid": str(dead.pid), "driver_start": "1"})
    child = client.create_run(experiment, tags={"mlflow.parentRunId": gone.info.run_id})
    alive = client.create_run(experiment, tags=tags)  # this very process: alive
    elsewhere = client.create_run(experiment, tags={**tags, "driver_host": "another-host", "driver_pid": "1"})
    assert tracking.mark_dead_runs(experiment) == [gone.info.run_id]
    status = {r: client.get_run(r).info.status for r in (gone.info.run_id, child.info.run_id,
                                                           alive.info.run_id, elsewhere.info.run_id)}
    assert list(status.values()) == ["KILLED", "KILLED", "RUNNING", "RUNNING"]
    table = tracking.comparison_table("qwen3-embedding")
    assert dict(zip(table["run_id"], table["status"]))[gone.info.run_id] == "KILLED"


def test_git_commit_names_the_commit_and_a_dirty_tree(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"  # not a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    head = head.stdout.strip()
    assert tracking.git_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("new\n")  # untracked files do not make a run irreproducible
    assert tracking.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2\n")
    assert tracking.git_commit(tmp_path) == head + "-dirty"


def test_machine_names_the_cpu_its_bf16_instructions_and_torch():
    import torch

    from tasks.models.backbone import native_bf16

    m = tracking.machine()
    assert set(m) == {"cpu", "cpus", "cpu_bf16", "gpu", "torch"}
    assert m["torch"] == torch.__version__ and int(m["cpus"]) >= 1 and m["cpu"]
    # the same test the models use to resolve `autocast: auto`
    assert (m["cpu_bf16"] != "none") == native_bf16("cpu")
    assert (m["gpu"] == "none") == (not torch.cuda.is_available())
