"""Ablation sweeps (paper Table 5), reproducibility, retraining with champion promotion, and the
schedule, on the micro preset with real Prefect, Ray, MLflow and DVC."""

from __future__ import annotations

import math

import pytest

from tests.configs import pipeline_overrides

pytestmark = pytest.mark.slow

PAPER = ["full", "no-merge", "no-synthetic", "only-synthetic"]


def _project(tmp_path_factory, name):
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp(name)
    Repo.init(str(root), no_scm=True)
    return root


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, shared_data, llm_url, prefect_server, ray_session, monkeypatch_module):
    from flows.ablate import ablate

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = _project(tmp_path_factory, "sweep-a")
    b = _project(tmp_path_factory, "sweep-b")
    all_settings = ablate(preset="micro", overrides=pipeline_overrides(shared_data, llm_url),
                          project_dir=str(a))
    paper_only = ablate(preset="micro", only=PAPER, overrides=pipeline_overrides(shared_data, llm_url),
                        project_dir=str(b))
    return {"a": (a, all_settings), "b": (b, paper_only)}


def test_sweep_has_every_setting_and_the_differences_to_full(sweeps):
    from tasks.config import load_config

    _, res = sweeps["a"]
    table = res["table"]
    assert list(table) == load_config("micro").ablations.settings
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
    for setting in PAPER:
        assert a["table"][setting] == b["table"][setting], setting


def test_report_over_two_identical_sweeps_has_their_means_and_no_spread(sweeps):
    from tasks.ablation import report_ablation_seeds
    from tasks.report import load_sweep
    from tests.summaries import table_rows

    loaded, ids = [], []
    for name in ("a", "b"):
        root, res = sweeps[name]
        sweep = load_sweep(root / "runs", res["run_id"])
        loaded.append({s: sweep[s] for s in PAPER})
        ids.append(res["run_id"])
    md = report_ablation_seeds(loaded, ids)
    rows = table_rows(md, "| setting |")
    columns = rows[0][1:]
    assert [r[0] for r in rows[1:]] == PAPER and columns[-2:] == ["Δ mean vs full", "seed values"]
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


def test_retraining_promotes_skips_and_follows_the_rule(tmp_path_factory, shared_data, prefect_server, ray_session,
                                                         monkeypatch):
    from flows.retrain import champion, decide, retrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _project(tmp_path_factory, "retrain")
    ov = [f"data.source={shared_data}", "data.include=[triplets-en, beir/nq-msmarco-hardneg]", "data.derived=[]",
          "synth.enabled=false", "stage1.enabled=false", "filter.enabled=false", "reranker.enabled=false",
          "stage2.data=[{path: data/triplets-en/snli_dev_triplets.jsonl, limit: 120}]"]
    first = retrain(preset="micro", overrides=ov, project_dir=str(root))
    assert first["decision"] == "promoted" and first["champion"] is None
    c1 = champion("qwen3-embedding", "champion")
    assert c1["version"] == first["version"]

    same = retrain(preset="micro", overrides=ov, project_dir=str(root))
    assert same["decision"] == "skipped"

    # new data: a new DVC version of data/ (more training pairs) -> retrain, then the rule decides
    extra = (shared_data / "triplets-en" / "snli_test_triplets.jsonl").read_text().splitlines()[:80]
    target = root / "data" / "triplets-en" / "snli_dev_triplets.jsonl"
    target.write_text("\n".join(extra) + "\n" + target.read_text())
    new = retrain(preset="micro", overrides=ov, project_dir=str(root))
    assert new["decision"] in ("promoted", "kept")
    expected, _ = decide(new["score"], new["champion"], "mean", 0.0)
    assert new["decision"] == expected
    now = champion("qwen3-embedding", "champion")
    if expected == "promoted":
        assert now["version"] == new["version"] != c1["version"]
        assert now["data_md5"] != c1["data_md5"]  # the champion now points at the new data version
    else:
        assert now == c1


def test_schedule_registers_a_deployment(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.retrain import register_schedule

    dep_id = register_schedule("0 3 * * 0", "micro", ["stage2.steps=2"], ".", name="retrain-test").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    dep = asyncio.run(read())
    assert dep.name == "retrain-test"
    assert dep.parameters["preset"] == "micro" and dep.parameters["overrides"] == ["stage2.steps=2"]
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 0"]
