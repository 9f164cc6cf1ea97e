"""Ablation sweeps (paper Table 5) and their reproducibility, on the micro preset with real Prefect,
Ray, MLflow and DVC (retraining and the schedule: tests/test_retrain.py)."""

from __future__ import annotations

import math

import pytest

from tests.configs import dvc_project, pipeline_overrides

pytestmark = pytest.mark.slow

PAPER = ["full", "no-merge", "no-synthetic", "only-synthetic"]
# The sweep runs Table 5's settings and one more ablation end to end (a data change: a setting
# outside the paper's four goes through the same sweep); every other overlay is checked to load and
# to change only what its name says (tests/test_config.py), and each loss switch against the
# reference loss (tests/test_losses.py).
SWEEP = PAPER + ["no-hard-negatives"]
# The same sweep in a fresh project: `full` runs every stage again, `no-synthetic` a stage 2 from the backbone.
FRESH = ["full", "no-synthetic"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, shared_data, llm_url, prefect_server, ray_session, monkeypatch_module):
    from flows.ablate import ablate

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = dvc_project(tmp_path_factory, "sweep-a")
    b = dvc_project(tmp_path_factory, "sweep-b")
    sweep = ablate(preset="micro", only=SWEEP, overrides=pipeline_overrides(shared_data, llm_url), project_dir=str(a))
    fresh = ablate(preset="micro", only=FRESH, overrides=pipeline_overrides(shared_data, llm_url), project_dir=str(b))
    return {"a": (a, sweep), "b": (b, fresh)}


def test_sweep_has_its_settings_and_the_differences_to_full(sweeps):
    _, res = sweeps["a"]
    table = res["table"]
    assert list(table) == SWEEP
    for setting, row in table.items():
        assert 0 <= row["nq-msmarco-hardneg"] <= 1
        assert math.isclose(row["delta_vs_full"], row["mean"] - table["full"]["mean"], abs_tol=1e-12)
    assert table["full"]["delta_vs_full"] == 0
    assert "| only-synthetic |" in res["markdown"]


def test_settings_are_what_their_names_say(sweeps):
    _, res = sweeps["a"]
    s = res["summaries"]
    assert s["full"]["final_model"] == "merged" and s["no-merge"]["final_model"] == "stage2"
    assert s["only-synthetic"]["final_model"] == "stage1"
    stages = {t["stage"] for t in s["no-synthetic"]["stages"]}
    assert "synthesis" not in stages and "stage1" not in stages and "stage2" in stages
    # no-merge scores exactly the stage-2 model of the full run (shared, cached stage)
    assert s["no-merge"]["scores"]["stage2"] == s["full"]["scores"]["stage2"]
    no_merge_stage2 = next(t for t in s["no-merge"]["stages"] if t["stage"] == "stage2")
    assert no_merge_stage2["cached"]


def test_sweep_mlflow_structure_and_artifacts(sweeps):
    import mlflow

    from tasks import tracking

    root, res = sweeps["a"]
    tracking.setup(root / "runs", "qwen3-embedding")
    client = mlflow.MlflowClient()
    parent = client.get_run(res["run_id"])
    assert parent.data.tags["ablation"] == "sweep"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert sorted(c.data.tags["ablation"] for c in children) == sorted(res["table"])
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"table.md", "table.csv", "table.png", "summaries.json"} <= arts
    assert "ablation/full/mean" in parent.data.metrics


def test_same_sweep_in_a_fresh_project_gives_identical_metrics(sweeps):
    _, a = sweeps["a"]
    _, b = sweeps["b"]
    assert list(b["table"]) == FRESH
    for setting in FRESH:
        assert a["table"][setting] == b["table"][setting], setting


def test_report_over_two_identical_sweeps_has_their_means_and_no_spread(sweeps):
    from tasks.ablation import report_ablation_seeds
    from tasks.report import load_sweep
    from tests.summaries import table_rows

    loaded, ids = [], []
    for name in ("a", "b"):
        root, res = sweeps[name]
        sweep = load_sweep(root / "runs", res["run_id"])
        loaded.append({s: sweep[s] for s in FRESH})
        ids.append(res["run_id"])
    md = report_ablation_seeds(loaded, ids)
    rows = table_rows(md, "| setting |")
    columns = rows[0][1:]
    assert [r[0] for r in rows[1:]] == FRESH and columns[-2:] == ["Δ mean vs full", "seed values"]
    for name in ("a", "b"):
        table = sweeps[name][1]["table"]
        for setting, *cells in rows[1:]:
            for col, cell in zip(columns[:-2], cells):
                assert cell == f"{table[setting][col]:.3f} ± 0.000", (name, setting, col)
            delta = table[setting]["delta_vs_full"]
            assert cells[-2] == ("–" if setting == "full" else f"{delta:+.3f} ± 0.000"), (name, setting)
            assert cells[-1] == f"{table[setting]['mean']:.3f} / {table[setting]['mean']:.3f}"
    assert "No seed differs between these sweeps" in md


def test_rerun_reproduces_a_run_from_mlflow(sweeps, tmp_path):
    from flows.ablate import rerun_args
    from flows.pipeline import pipeline

    root, res = sweeps["b"]
    run_id = res["summaries"]["no-synthetic"]["run_id"]
    args = rerun_args(run_id, root / "runs", "qwen3-embedding")
    assert args["preset"] == "micro" and args["ablation"] == "no-synthetic"
    again = pipeline(preset=args["preset"], ablation=args["ablation"], config_files=args["config_files"],
                     project_dir=str(root))
    assert again["scores"] == res["summaries"]["no-synthetic"]["scores"]
