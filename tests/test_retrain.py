"""Scheduled retraining (flows/retrain.py): the promotion rule (which score a run is judged by, and
when a new model replaces the champion), the retraining flow on the micro preset with real Prefect,
Ray, MLflow and DVC, and the schedule's deployment."""

from __future__ import annotations

import re

import pytest

from flows.retrain import decide, score_of
from tests.configs import dvc_project


def test_decision_rule():
    champ = {"version": "3", "score": 0.5}
    assert decide(0.4, None, "mean", 0.0)[0] == "promoted"
    assert decide(0.5, champ, "mean", 0.0)[0] == "promoted"
    assert decide(0.49, champ, "mean", 0.0)[0] == "kept"
    assert decide(0.49, champ, "mean", 0.02)[0] == "promoted"


def test_the_reason_names_both_scores_and_the_champion():
    decision, reason = decide(0.41, {"version": "7", "score": 0.5}, "nq-msmarco-hardneg", 0.05)
    assert decision == "kept"
    assert "0.4100" in reason and "champion v7 0.5000" in reason and "champion kept" in reason


def test_score_of_is_the_mean_or_one_named_task():
    scores = {"nq-msmarco-hardneg": 0.25, "stsb-en": 0.75}
    assert score_of(scores, "mean") == 0.5
    assert score_of(scores, "stsb-en") == 0.75
    missing = "retrain.metric 'sick' is not an evaluated task; have ['nq-msmarco-hardneg', 'stsb-en']"
    with pytest.raises(ValueError, match=re.escape(missing)):
        score_of(scores, "sick")
    with pytest.raises(ValueError, match="no evaluation scores"):
        score_of({}, "mean")


@pytest.mark.slow
def test_retraining_promotes_skips_and_follows_the_rule(tmp_path, shared_data, prefect_server, ray_session,
                                                         monkeypatch):
    from flows.retrain import champion, decide, retrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = dvc_project(tmp_path)
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
