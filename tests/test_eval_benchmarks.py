"""Several mteb benchmarks in one evaluation (tasks/evaluation/benchmarks.py): the paper's names
resolve offline, shared tasks run once, Mean(Task) / Mean(Type) against hand-computed values, a
missing task is reported (never dropped from a mean), and the summaries reach the results JSON,
the pipeline stage's metrics, MLflow and `q3e report`. Plus eval.dims (MRL) and eval max lengths."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import mteb
import pytest
from mteb.types import PromptType

from tasks import report
from tasks.config import EvalConfig, load_config
from tasks.evaluation.benchmarks import (
    PAPER_BENCHMARKS, benchmark_metrics, benchmark_summary, resolve_benchmarks, scoped_score,
)
from tasks.evaluation.encoders import MtebEmbedder, MtebReranker
from tasks.evaluation.local_tasks import beir_task, sts_task
from tasks.evaluation.run import evaluate_model


# ---------------------------------------------------------------- the paper's benchmarks (metadata only)

def test_the_paper_benchmarks_resolve_offline_and_share_tasks_once():
    plan = resolve_benchmarks(PAPER_BENCHMARKS)
    assert list(plan.scopes) == ["MTEB(Multilingual, v2)", "MTEB(eng, v2)", "MTEB(cmn, v1)", "MTEB(Code, v1)"]
    assert [len(s) for s in plan.scopes.values()] == [131, 41, 31, 12]
    names = [t.metadata.name for t in plan.tasks]
    assert len(names) == len(set(names)) == len(set().union(*plan.scopes.values()))  # shared tasks run once
    # STS17: English only in MTEB(eng, v2), 11 language pairs in MTEB(Multilingual); run on the union
    sts17 = next(t for t in plan.tasks if t.metadata.name == "STS17")
    assert plan.scopes["MTEB(eng, v2)"]["STS17"] == (("test",), ("en-en",))
    assert len(plan.scopes["MTEB(Multilingual, v2)"]["STS17"][1]) == 11
    assert set(sts17.hf_subsets) == set(plan.scopes["MTEB(Multilingual, v2)"]["STS17"][1])
    assert plan.types["STS17"] == "STS" and plan.types["CodeSearchNetRetrieval"] == "Retrieval"
    # FollowIR is in MTEB(Multilingual): a retrieval task of type InstructionReranking, so rerankable
    assert plan.types["Core17InstructionRetrieval"] == "InstructionReranking"
    # an alias of a benchmark already listed adds nothing; an unversioned MTEB(Code) is not an mteb name
    assert list(resolve_benchmarks(["MTEB(Multilingual)", "MTEB(Multilingual, v2)"]).scopes) == ["MTEB(Multilingual, v2)"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'MTEB\(Code\)'.*MTEB\(Code, v1\)"):
        resolve_benchmarks(["MTEB(Code)"])


def test_eval_benchmark_takes_one_name_or_a_list():
    assert EvalConfig(benchmark="MTEB(eng, v2)").benchmarks == ["MTEB(eng, v2)"]
    assert EvalConfig(benchmark=None).benchmarks == []
    cfg = load_config("micro", ['eval.benchmark=["MTEB(eng, v2)", "MTEB(cmn, v1)"]', "eval.task_dirs=[]"]).eval
    assert cfg.benchmarks == ["MTEB(eng, v2)", "MTEB(cmn, v1)"]
    from tasks.evaluation.run import build_tasks

    assert len(build_tasks(cfg)) == 41 + 31  # no task in common
    with pytest.raises(ValueError, match="listed twice"):
        EvalConfig(benchmark=["MTEB(eng, v2)", "MTEB(eng, v2)"])


# ---------------------------------------------------------------- Mean(Task), Mean(Type)

TOY_TYPES = {"A": "Retrieval", "B": "Retrieval", "C": "STS", "D": "Classification"}


def test_mean_task_and_mean_type_hand_computed():
    s = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": 0.9, "D": 0.5}, TOY_TYPES)
    assert s["mean_task"] == pytest.approx((0.2 + 0.4 + 0.9 + 0.5) / 4)               # 0.5
    assert s["per_type"] == pytest.approx({"Classification": 0.5, "Retrieval": 0.3, "STS": 0.9})
    assert s["mean_type"] == pytest.approx((0.3 + 0.9 + 0.5) / 3)                      # 0.5667
    assert (s["n_tasks"], s["n_missing"], s["missing"]) == (4, 0, [])
    rr = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": 0.9, "D": 0.5}, TOY_TYPES,
                           reranked={"A": 0.6, "B": 0.5})
    assert rr["rerank"] == {"n_tasks": 2, "mean_embedder": pytest.approx(0.3), "mean_reranked": pytest.approx(0.55)}


def test_a_missing_task_is_reported_not_dropped_from_the_mean():
    # D never scored, C scored NaN: neither may vanish into a mean over the others
    s = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": float("nan")}, TOY_TYPES)
    assert s["mean_task"] is None and s["mean_type"] is None
    assert s["missing"] == ["C", "D"] and s["n_missing"] == 2 and s["n_tasks"] == 4
    assert s["per_type"] == {"Classification": None, "Retrieval": pytest.approx(0.3), "STS": None}
    assert s["scores"] == {"A": 0.2, "B": 0.4, "C": None, "D": None}
    # MLflow numbers: no mean to log, but the count of missing tasks is
    assert benchmark_metrics({"MTEB(eng, v2)": s}) == {
        "MTEB-eng-v2": {"n_missing": 2, "per_type": {"Retrieval": pytest.approx(0.3)}}}
    json.dumps(s, allow_nan=False)  # the results JSON is written with allow_nan=False


def test_a_benchmark_scores_a_shared_task_on_its_own_subsets_and_splits():
    result = SimpleNamespace(scores={
        "test": [{"hf_subset": "en-en", "main_score": 0.8}, {"hf_subset": "de-de", "main_score": 0.4},
                 {"hf_subset": "ar-ar", "main_score": 0.3}],
        "validation": [{"hf_subset": "en-en", "main_score": 0.6}]})
    assert scoped_score(result, (("test",), ("en-en",))) == pytest.approx(0.8)
    assert scoped_score(result, (("test",), ("en-en", "de-de", "ar-ar"))) == pytest.approx(0.5)
    assert scoped_score(result, (("validation", "test"), ("en-en",))) == pytest.approx(0.7)
    assert scoped_score(result, (("test",), ("fr-fr",))) is None  # nothing scored: missing


# ---------------------------------------------------------------- through evaluate_model, offline

@pytest.fixture
def local_benchmark(shared_data, monkeypatch):
    """An mteb benchmark of local tasks (two retrieval sets, one STS set) in place of a hub one."""
    tasks = [beir_task(shared_data / "beir/nq-msmarco-hardneg", max_queries=5, max_corpus=40),
             beir_task(shared_data / "beir/stsb-en-traindev", max_queries=5, max_corpus=40),
             sts_task(shared_data / "sts-en/SICK_trial.txt", max_pairs=40)]
    bench = SimpleNamespace(name="Local(bench, v1)", tasks=tasks)
    real = mteb.get_benchmark
    monkeypatch.setattr(mteb, "get_benchmark", lambda name: bench if name == bench.name else real(name))
    return bench


def test_evaluate_model_writes_each_benchmark_summary(micro_embedder, local_benchmark, tmp_path):
    cfg = EvalConfig(benchmark=[local_benchmark.name], task_dirs=[])
    res = evaluate_model(micro_embedder, cfg, out=tmp_path / "r.json", embedding_cache=tmp_path / "emb", show=True)
    r1, r2, s = (res[n]["main_score"] for n in ("nq-msmarco-hardneg", "stsb-en-traindev", "SICK_trial"))
    summary = json.loads((tmp_path / "r.json").read_text())["benchmarks"][local_benchmark.name]
    assert summary["mean_task"] == pytest.approx((r1 + r2 + s) / 3)
    assert summary["mean_type"] == pytest.approx(((r1 + r2) / 2 + s) / 2)
    assert summary["per_type"] == pytest.approx({"Retrieval": (r1 + r2) / 2, "STS": s})
    assert summary["missing"] == [] and summary["scores"]["SICK_trial"] == pytest.approx(s)


def test_eval_stage_metrics_and_mlflow_name_benchmarks_path_safely(micro_embedder, local_benchmark, tmp_path,
                                                                    monkeypatch):
    import mlflow

    from tasks.stages import eval_stage
    from tasks.tracking import log_eval_results

    cfg = EvalConfig(benchmark=local_benchmark.name, task_dirs=[], dims=[16])
    out = eval_stage(micro_embedder, cfg, str(tmp_path))
    assert set(out["benchmarks"]) == {"Local(bench, v1)", "Local(bench, v1)@16"}
    metrics = out["metrics"]["eval"]
    assert metrics["Local-bench-v1"]["mean_task"] == pytest.approx(out["benchmarks"]["Local(bench, v1)"]["mean_task"])
    assert metrics["Local-bench-v1@16"]["mean_type"] == pytest.approx(
        out["benchmarks"]["Local(bench, v1)@16"]["mean_type"])
    assert "nq-msmarco-hardneg@16" in out["results"]  # eval.dims: every listed dimension

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment(
        "bench", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    log_eval_results(run_id, {}, benchmarks={"Local(bench, v1)": out["benchmarks"]["Local(bench, v1)"]})
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/Local-bench-v1/mean_task"] == pytest.approx(out["benchmarks"]["Local(bench, v1)"]["mean_task"])
    assert {"eval/Local-bench-v1/mean_type", "eval/Local-bench-v1/per_type/STS",
            "eval/Local-bench-v1/n_missing"} <= set(logged)


def test_run_report_shows_mean_task_and_mean_type_per_benchmark():
    from tests.summaries import make_summary, table_rows

    summary = make_summary()
    full = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": 0.9, "D": 0.5}, TOY_TYPES)
    part = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": 0.9}, TOY_TYPES)
    reranked = benchmark_summary(list(TOY_TYPES), {"A": 0.2, "B": 0.4, "C": 0.9, "D": 0.5}, TOY_TYPES,
                                 reranked={"A": 0.6, "B": 0.5})
    summary["benchmarks"] = {"backbone": {"MTEB(eng, v2)": part}, "merged": {"MTEB(eng, v2)": full},
                             "reranker": {"MTEB(eng, v2)": reranked}}
    md = report.run_report(summary)
    rows = table_rows(md, "| model | MTEB(eng, v2)")
    assert rows[1:] == [["backbone", "– / – (1 of 4 missing)"], ["merged (final)", "0.500 / 0.567"],
                        ["reranker (top-k of merged)", "0.550 (2 reranked)"]]
    assert "### Benchmarks" in md and "### Benchmarks" not in report.run_report(make_summary())
    summary["first_stage"] = "runs/first.json"
    assert "reranker (top-k of the fixed first stage)" in report.run_report(summary)


# ---------------------------------------------------------------- eval.dims, eval max lengths

def test_eval_dims_must_be_positive_and_distinct():
    from tasks.config import ConfigError

    for bad in ("eval.dims=[-4]", "eval.dims=[0]", "eval.dims=[16, 16]"):
        with pytest.raises(ConfigError, match="eval.dims"):
            load_config("micro", [bad])
    assert load_config("micro", ["eval.dims=[8, 16]"]).eval.dims == [8, 16]


def test_eval_max_lengths_override_the_models_and_are_checked_against_its_context(micro_embedder,
                                                                                 micro_reranker, monkeypatch):
    default = MtebEmbedder(micro_embedder, name="micro", fingerprint="x")
    assert (default.max_query_length, default.max_doc_length) == (32, 64)  # the micro preset's training lengths
    longer = MtebEmbedder(micro_embedder, name="micro", fingerprint="x", max_query_length=48, max_doc_length=512)
    seen = []
    real = micro_embedder.encode
    monkeypatch.setattr(micro_embedder, "encode", lambda texts, **k: seen.append(k["max_length"]) or real(texts, **k))
    meta = SimpleNamespace(name="x", type="Retrieval", prompt=None)  # a retrieval task's metadata
    longer.encode(["a query"], task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    longer.encode(["a doc"], task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    assert seen == [48, 512]
    context = micro_embedder.backbone.config.max_position_embeddings  # 1024
    with pytest.raises(ValueError, match=rf"eval.max_doc_length {context + 1} is longer than the model's context"):
        MtebEmbedder(micro_embedder, name="micro", fingerprint="x", max_doc_length=context + 1)
    rr = MtebReranker(micro_reranker, name="micro", fingerprint="x", max_length=300)
    lengths = []
    real_ids = micro_reranker.token_ids
    monkeypatch.setattr(micro_reranker, "token_ids", lambda *a: lengths.append(a[3]) or real_ids(*a))
    batch = [{"text": ["q"]}], [{"text": ["d"]}]
    rr.predict(*batch, task_metadata=meta, hf_split="test", hf_subset="default")
    MtebReranker(micro_reranker, name="micro", fingerprint="x").predict(*batch, task_metadata=meta, hf_split="test",
                                                                         hf_subset="default")
    assert lengths == [300, 128]  # eval.max_rerank_length, else the model's max_rerank_length
    with pytest.raises(ValueError, match="eval.max_rerank_length"):
        MtebReranker(micro_reranker, name="micro", fingerprint="x", max_length=context + 1)


def test_eval_max_lengths_reach_the_scores_and_the_record(micro_embedder, shared_data, tmp_path):
    folder = shared_data / "beir/nq-msmarco-hardneg"
    base = EvalConfig(task_dirs=[str(folder)], max_queries=5, max_corpus=40)
    a = evaluate_model(micro_embedder, base, out=tmp_path / "a.json", embedding_cache=False, show=False)
    b = evaluate_model(micro_embedder, base.model_copy(update={"max_doc_length": 8}), out=tmp_path / "b.json",
                       embedding_cache=False, show=False)
    assert a["nq-msmarco-hardneg"] != b["nq-msmarco-hardneg"]  # documents cut to 8 tokens rank otherwise
    settings = [json.loads((tmp_path / f).read_text())["model_settings"] for f in ("a.json", "b.json")]
    assert settings[0]["max_doc_length"] == 64 and settings[1]["max_doc_length"] == 8
    assert all(math.isfinite(v) for v in b["nq-msmarco-hardneg"].values())
