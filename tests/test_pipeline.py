"""The whole flow on the micro preset: real Prefect (one local server), real Ray (local), a real
MLflow store and a real DVC repository in a temporary project. Synthesis talks to an
OpenAI-compatible endpoint served by this test on loopback (a scripted LLM, so the synthetic pairs
are valid and the run is fast); everything else is the production code path.
The ablation sweeps (paper Table 5) run in the same project after these runs, and once more in a
fresh one (retraining and the schedule: tests/test_retrain.py)."""

from __future__ import annotations

import json
import math

import pytest

from tests.configs import dvc_project, pipeline_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(module_tmp):
    return dvc_project(module_tmp("project"))


# more filter actors than the tests' Ray (two CPUs) holds: the flow must hand the stage two
WORKERS = "filter.workers=3"


def run(project, shared_data, llm_url, *extra):
    from flows.pipeline import pipeline

    return pipeline(preset="micro", overrides=pipeline_overrides(shared_data, llm_url, WORKERS, *extra),
                    project_dir=str(project))


def cached(summary) -> dict[str, bool]:
    return {t["stage"]: t["cached"] for t in summary["stages"]}


@pytest.fixture(scope="module")
def runs(project, shared_data, llm_url, prefect_server, ray_session, monkeypatch_module):
    """The sequence of runs every test below inspects (they are expensive, so run them once)."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = {}
    with pytest.raises(Exception, match="missing.jsonl"):
        run(project, shared_data, llm_url, "stage2.data=[{path: data/missing.jsonl}]")
    out["resumed"] = run(project, shared_data, llm_url)
    out["again"] = run(project, shared_data, llm_url)
    out["changed_lr"] = run(project, shared_data, llm_url, "stage2.lr=0.002")
    return out


def test_every_stage_runs_and_leaves_its_artifacts(runs, project):
    s = runs["resumed"]
    assert set(s["scores"]) == {"backbone", "stage1", "stage2", "merged", "reranker"}
    assert s["final_model"] == "merged"
    for name, scores in s["scores"].items():
        assert 0 <= scores["nq-msmarco-hardneg"] <= 1, name
    assert "nq-msmarco-hardneg/rerank" in s["scores"]["reranker"]
    synth = next(project.glob("datasets/synthetic/*/stats.json"))
    assert json.loads(synth.read_text())["accepted"] > 0
    assert list(synth.parent.glob("shard-*.jsonl"))
    assert list(project.glob("datasets/filtered/*/report.json"))
    for stage in ("stage1", "stage2", "reranker"):
        assert list(project.glob(f"runs/artifacts/{stage}/*/final/model.safetensors")), stage
    assert list(project.glob("runs/artifacts/merge/*/model/merge.json"))
    assert (project / "runs" / "runs" / s["run_id"] / "summary.json").is_file()


def test_the_flow_sizes_the_actor_pools_to_its_ray(runs, project):
    """The flow decides the pools from the config and the cluster: synthesis asks for one actor and
    gets it; filtering asks for three on two CPUs and runs two (a third would never start, and
    the stage would wait for its shard for ever)."""
    synth = json.loads(next(project.glob("datasets/synthetic/*/stats.json")).read_text())
    report = json.loads(next(project.glob("datasets/filtered/*/report.json")).read_text())
    assert synth["run"]["workers"] == 1 and report["run"]["workers"] == 2


def test_backbone_is_scored_with_the_presets_model_settings(runs, project):
    """The untrained backbone row is like-for-like: same max lengths (micro: 32/64, not the 64/128
    defaults) and the same layers as every trained model."""
    settings = {}
    for name in ("backbone", "stage2"):
        res = json.loads(next(project.glob(f"runs/artifacts/eval-{name}/*/results.json")).read_text())
        settings[name] = res["model_settings"]
    assert settings["backbone"] == settings["stage2"]
    assert settings["backbone"]["max_query_length"] == 32 and settings["backbone"]["max_doc_length"] == 64


def test_failed_run_resumed_at_the_failed_stage(runs):
    flags = cached(runs["resumed"])
    assert flags["synthesis"] and flags["stage1"] and flags["filter"]
    assert not flags["stage2"]


def test_second_run_recomputes_nothing(runs):
    assert all(cached(runs["again"]).values()), cached(runs["again"])
    assert runs["again"]["scores"] == runs["resumed"]["scores"]


def test_changed_training_parameter_recomputes_only_downstream(runs):
    flags = cached(runs["changed_lr"])
    upstream = ["synthesis", "stage1", "filter", "reranker", "reranker-merge", "eval-backbone", "eval-stage1"]
    downstream = ["stage2", "merge", "eval-stage2", "eval-merged", "eval-reranker"]
    assert all(flags[s] for s in upstream), flags
    assert not any(flags[s] for s in downstream), flags


def test_mlflow_has_the_parent_and_nested_runs(runs, project):
    import mlflow

    from tasks import tracking

    tracking.setup(project / "runs", "qwen3-embedding")
    client = mlflow.MlflowClient()
    s = runs["resumed"]
    parent = client.get_run(s["run_id"])
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    for key in ("git_commit", "config_hash", "dvc_data_md5", "preset", "ablation", "dvc_synthetic_md5",
                "dvc_filtered_md5", "model_uri.embedding", "model_uri.reranker"):
        assert tags.get(key), key
    assert tags["preset"] == "micro" and params["stage2.loss.temperature"] == "0.05"
    assert "final/nq-msmarco-hardneg" in metrics and "eval/backbone/nq-msmarco-hardneg" in metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s['run_id']}'")
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert {"synthesis", "stage1", "filter", "stage2", "merge", "reranker", "reranker-merge",
            "eval-backbone", "eval-reranker"} <= set(by_stage)
    stage2 = by_stage["stage2"]
    history = client.get_metric_history(stage2.info.run_id, "train/loss")
    assert len(history) == 8 and [m.step for m in history] == list(range(1, 9))
    assert "train/lr" in stage2.data.metrics and "train/pairs_per_s" in stage2.data.metrics
    arts = {a.path for a in client.list_artifacts(stage2.info.run_id)}
    assert "loss.png" in arts
    assert "stats.json" in {a.path for a in client.list_artifacts(by_stage["synthesis"].info.run_id)}
    assert any(a.path.endswith(".png") for a in client.list_artifacts(by_stage["filter"].info.run_id))
    assert any(k.startswith("eval/") for k in by_stage["eval-merged"].data.metrics)


def test_final_models_load_back_from_mlflow(runs, project):
    import mlflow
    import pandas as pd

    from tasks import tracking

    tracking.setup(project / "runs", "qwen3-embedding")
    tags = mlflow.MlflowClient().get_run(runs["resumed"]["run_id"]).data.tags
    emb = mlflow.pyfunc.load_model(tags["model_uri.embedding"]).predict(["a dog runs", "a cat sleeps"])
    assert emb.shape == (2, 64)
    rr = mlflow.pyfunc.load_model(tags["model_uri.reranker"]).predict(
        pd.DataFrame({"query": ["who runs"], "document": ["a dog runs"]}))
    assert 0 < float(rr[0]) < 1


def test_dvc_versions_are_recorded_and_consistent(runs, project):
    import yaml

    from tasks.lineage import is_clean, read_dvc_file

    s = runs["resumed"]
    assert s["data_md5"] == read_dvc_file(project / "data.dvc")["md5"]
    assert is_clean(project, "data")
    dvc_files = list(project.glob("datasets/synthetic/*.dvc")) + list(project.glob("datasets/filtered/*.dvc"))
    assert len(dvc_files) >= 2
    recorded = {yaml.safe_load(f.read_text())["outs"][0]["md5"] for f in dvc_files}
    import mlflow

    tags = mlflow.MlflowClient().get_run(s["run_id"]).data.tags
    assert tags["dvc_synthetic_md5"] in recorded and tags["dvc_filtered_md5"] in recorded


def test_lineage_and_compare_commands(runs, project):
    from typer.testing import CliRunner

    from flows.cli import app

    r = CliRunner().invoke(app, ["lineage", runs["resumed"]["run_id"], "--run-dir", str(project / "runs")])
    assert r.exit_code == 0, r.output
    assert "dvc_data_md5" in r.output and "stage2" in r.output
    out = project / "cmp"
    r = CliRunner().invoke(app, ["runs", "compare", "--run-dir", str(project / "runs"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert runs["resumed"]["run_id"] in out.with_suffix(".csv").read_text()



BALANCES = ["stage2.data=[{path: data/triplets-en/snli_dev_triplets.jsonl, limit: 100},"
            " {path: data/triplets-en/snli_test_triplets.jsonl, limit: 100, task_type: nli}]",
            "stage2_balances=[{weights: {retrieval: 3, nli: 1}}, {weights: {retrieval: 1, nli: 3}}]",
            "merge.method=task_slerp", "reranker.enabled=false"]


def test_stage2_under_two_balances_merged_with_task_slerp_from_stage1(project, shared_data, llm_url, prefect_server,
                                                                      ray_session, monkeypatch):
    """stage2_balances: one stage 2 per task balance, each in its own stage2/<key> folder, then the merge
    of their two finals by task_slerp from stage 1's final (where both started); "stage2" is the first."""
    import mlflow

    from tasks import tracking
    from tasks.config import load_config
    from tasks.merge import MERGE_RECORD
    from tasks.stages import eval_key

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = run(project, shared_data, llm_url, *BALANCES)
    keys = {t["stage"]: t["key"] for t in s["stages"]}
    assert {"stage2-balance0", "stage2-balance1", "merge"} <= set(keys) and "stage2" not in keys
    balances = s["stage2_balances"]
    assert [(b["stage"], b["key"]) for b in balances] == [(n, keys[n]) for n in ("stage2-balance0", "stage2-balance1")]
    assert balances[0]["weights"] == {"retrieval": 3.0, "nli": 1.0} and balances[0]["key"] != balances[1]["key"]
    finals = [b["final"] for b in balances]
    assert finals == [str(project / "runs" / "artifacts" / "stage2" / b["key"] / "final") for b in balances]

    stage1 = json.loads((project / "runs" / "artifacts" / "stage1" / keys["stage1"] / "done.json").read_text())
    merged = json.loads((project / "runs" / "artifacts" / "merge" / keys["merge"] / "model" / MERGE_RECORD).read_text())
    assert merged["method"] == "task_slerp" and merged["checkpoints"] == finals and merged["base"] == stage1["final"]
    assert s["final_model"] == "merged" and s["merge"]["checkpoints"] == ["stage2-balance0", "stage2-balance1"]
    # the results' stage2 is the first balance's model
    cfg = load_config("micro", pipeline_overrides(shared_data, llm_url, WORKERS, *BALANCES))
    assert keys["eval-stage2"] == eval_key(cfg.eval, model=balances[0]["key"], reranker=None, data=s["data_md5"],
                                           root=project)
    assert s["benchmarks"] == {} and s["first_stage"] is None

    tracking.setup(project / "runs", "qwen3-embedding")
    client = mlflow.MlflowClient()
    children = client.search_runs([client.get_run(s["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{s['run_id']}'")
    params = {c.data.tags["stage"]: c.data.params for c in children}
    assert params["stage2-balance1"]["stage2.sampling.mode"] == "task_balanced"
    assert float(params["stage2-balance1"]["stage2.sampling.weights.nli"]) == 3.0

    again = run(project, shared_data, llm_url, *BALANCES)  # every stage reused from its own folder
    assert all(cached(again).values()) and again["scores"] == s["scores"]

# ----------------------------------------------------------------------------- ablation sweeps (paper Table 5)
# The sweep runs in this module's project, after the runs above: `full` is the run `runs` made, so it
# and `no-merge` / `only-synthetic` reuse every stage (as a user's sweep after a run does), and only
# the settings that change a stage train. The same sweep in a fresh project runs everything again.

PAPER = ["full", "no-merge", "no-synthetic", "only-synthetic"]
# Table 5's settings and one more ablation end to end (a data change: a setting outside the paper's
# four goes through the same sweep); every other overlay is checked to load and to change only what
# its name says (tests/test_config.py), and each loss switch against the reference loss
# (tests/test_losses.py).
SWEEP = PAPER + ["no-hard-negatives"]
# The same sweep in a fresh project: `full` runs every stage again, `no-synthetic` a stage 2 from the backbone.
FRESH = ["full", "no-synthetic"]


@pytest.fixture(scope="module")
def sweeps(runs, project, module_tmp, shared_data, llm_url, prefect_server, ray_session, monkeypatch_module):
    from flows.ablate import ablate

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh = dvc_project(module_tmp("sweep-fresh"))
    overrides = pipeline_overrides(shared_data, llm_url, WORKERS)
    sweep = ablate(preset="micro", only=SWEEP, overrides=overrides, project_dir=str(project))
    again = ablate(preset="micro", only=FRESH, overrides=overrides, project_dir=str(fresh))
    return {"a": (project, sweep), "b": (fresh, again)}


def test_the_sweep_reuses_the_run_it_follows(sweeps, runs):
    """`full` in the sweep is the run the module made: every stage reused, the same scores."""
    _, res = sweeps["a"]
    full = res["summaries"]["full"]
    assert all(t["cached"] for t in full["stages"]), full["stages"]
    assert full["scores"] == runs["resumed"]["scores"]
    _, fresh = sweeps["b"]
    assert not any(t["cached"] for t in fresh["summaries"]["full"]["stages"])


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


def test_sweep_mlflow_structure_and_artifacts(sweeps, monkeypatch):
    import mlflow

    from tasks import tracking

    root, res = sweeps["a"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store of the sweep's project, not the last one set
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
