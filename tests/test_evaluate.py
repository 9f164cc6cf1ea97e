"""Evaluation (tasks/evaluation/): local tasks through mteb on the micro model, metrics mteb must
reproduce exactly on hand-computable rankings, reranking, the embedding cache and `q3e eval`."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from tasks.config import EvalConfig
from tasks.data import DataError, write_jsonl
from tasks.evaluation.cache import EmbeddingCache
from tasks.evaluation.encoders import MtebEmbedder, MtebReranker
from tasks.evaluation.fingerprints import parameters_fingerprint
from tasks.evaluation.local_tasks import beir_task, pair_classification_task, sts_task
from tasks.evaluation.prompts import TaskPrompts
from tasks.evaluation.run import (
    evaluate_model, evaluate_reranking, rerank_run, resolve_tasks, run_task, score_run,
)

INV_LOG2_3 = 1 / math.log2(3)  # nDCG@10 of a single relevant document found at rank 2


# ---------------------------------------------------------------- tiny hand-made corpus + oracle models

DOCS = {f"d{i}": f"document number {i}" for i in range(6)}
QUERIES = {"q0": "query zero", "q1": "query one", "q2": "query two"}
QRELS = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d2": 1}}


def _tiny_beir(root: Path) -> Path:
    write_jsonl(root / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in DOCS.items()])
    write_jsonl(root / "queries.jsonl", [{"_id": k, "text": v} for k, v in QUERIES.items()])
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, r in QRELS.items() for d in r))
    return root


class OracleEncoder(AbsEncoder):
    """Documents are one-hot; a query sits on its relevant document, or, with `second`, mostly on a
    wrong document (d3/d4/d5) and a little on the right one, so the right one ranks exactly 2nd."""

    def __init__(self, second: bool = False, inverted: bool = False):
        self.second, self.inverted = second, inverted
        self.mteb_model_meta = ModelMeta.create_empty(
            {"name": f"test/oracle-{second}-{inverted}", "revision": "1"})

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(len(DOCS), dtype=np.float32)
        doc = {t: i for i, t in enumerate(DOCS.values())}
        if text in doc:
            v[doc[text]] = 1
            return v
        i = list(QUERIES.values()).index(text)
        if self.inverted:  # the relevant document scores lowest of all
            v[:] = 1.0
            v[i] = -1.0
        elif self.second:
            v[i], v[i + 3] = 0.4, 0.9
        else:
            v[i] = 1
        return v / np.linalg.norm(v)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        return np.stack([self._vec(t) for batch in inputs for t in batch["text"]])


class OracleReranker:
    """An mteb cross-encoder that knows the qrels."""

    def __init__(self):
        self.mteb_model_meta = ModelMeta.create_empty(
            {"name": "test/oracle-reranker", "revision": "1", "model_type": ["cross-encoder"]})
        self.text_to_id = {**{v: k for k, v in DOCS.items()}, **{v: k for k, v in QUERIES.items()}}

    def predict(self, inputs1, inputs2, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        qs = [self.text_to_id[t] for b in inputs1 for t in b["text"]]
        ds = [self.text_to_id[t] for b in inputs2 for t in b["text"]]
        return np.array([float(QRELS[q].get(d, 0)) for q, d in zip(qs, ds)])


# ---------------------------------------------------------------- metrics mteb must reproduce exactly

def test_score_run_hand_computed():
    qrels = {"a": {"x": 1}, "b": {"x": 1, "z": 1}}
    run = {"a": {"y": 0.9, "x": 0.5, "z": 0.1},   # relevant at rank 2
           "b": {"x": 0.9, "y": 0.5, "z": 0.1}}   # relevant at ranks 1 and 3
    s = score_run(run, qrels)
    ndcg_b = (1 + 1 / math.log2(4)) / (1 + INV_LOG2_3)
    assert s["ndcg_at_10"] == pytest.approx((INV_LOG2_3 + ndcg_b) / 2, abs=1e-5)
    assert s["mrr_at_10"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-5)
    assert s["map_at_10"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2, abs=1e-5)
    assert s["recall_at_1"] == pytest.approx((0 + 0.5) / 2, abs=1e-5)
    assert s["recall_at_100"] == pytest.approx(1.0)
    # a query absent from the run scores zero rather than disappearing
    assert score_run({"a": run["a"]}, qrels)["ndcg_at_10"] == pytest.approx(INV_LOG2_3 / 2, abs=1e-5)


def test_oracle_encoder_through_mteb_gives_exact_ndcg(tmp_path):
    folder = _tiny_beir(tmp_path / "tiny")
    perfect = run_task(OracleEncoder(), beir_task(folder))
    assert perfect["ndcg_at_10"] == pytest.approx(1.0) and perfect["main_score"] == pytest.approx(1.0)
    assert perfect["mrr_at_10"] == pytest.approx(1.0)
    second = run_task(OracleEncoder(second=True), beir_task(folder))
    assert second["ndcg_at_10"] == pytest.approx(INV_LOG2_3, abs=1e-5)  # 0.63093
    assert second["mrr_at_10"] == pytest.approx(0.5, abs=1e-5)
    assert second["recall_at_1"] == 0 and second["recall_at_3"] == pytest.approx(1.0)
    # the pipeline's path: what to evaluate comes from an EvalConfig
    res = evaluate_model(OracleEncoder(second=True), EvalConfig(task_dirs=[str(folder)]),
                         out=tmp_path / "cfg.json", show=False)
    assert res["tiny"]["ndcg_at_10"] == pytest.approx(INV_LOG2_3, abs=1e-5)


# ---------------------------------------------------------------- reranking

def test_rerank_run_with_oracle_scores_fixes_a_poor_first_stage():
    first = {"q0": {"d5": 0.9, "d4": 0.8, "d3": 0.7, "d2": 0.6, "d1": 0.5, "d0": 0.4}}
    before = score_run(first, {"q0": QRELS["q0"]})
    after = score_run(rerank_run(first, lambda qs, ds: [QRELS[q].get(d, 0) for q, d in zip(qs, ds)], top_k=6),
                      {"q0": QRELS["q0"]})
    assert before["ndcg_at_10"] == pytest.approx(1 / math.log2(7), abs=1e-5)
    assert after["ndcg_at_10"] == pytest.approx(1.0)
    # documents beyond top_k are dropped, so a relevant one there cannot be recovered
    cut = rerank_run(first, lambda qs, ds: [1.0] * len(qs), top_k=3)
    assert set(cut["q0"]) == {"d5", "d4", "d3"}


def test_oracle_reranker_through_mteb_improves_ndcg(tmp_path):
    task = beir_task(_tiny_beir(tmp_path / "tiny"))
    before, after = evaluate_reranking(task, OracleEncoder(inverted=True), OracleReranker(), top_k=6)
    assert before["ndcg_at_10"] == pytest.approx(1 / math.log2(7), abs=1e-5)  # relevant doc last of 6
    assert after["ndcg_at_10"] == pytest.approx(1.0)
    assert after["recall_at_100"] == pytest.approx(before["recall_at_100"])


def test_micro_reranker_end_to_end(micro_embedder, micro_reranker, shared_data, tmp_path):
    cfg = EvalConfig(task_dirs=[str(shared_data / "beir/nq-msmarco-hardneg")], max_queries=3, max_corpus=30,
                     rerank_top_k=5)
    res = evaluate_model(micro_embedder, cfg, reranker=micro_reranker, out=tmp_path / "r.json",
                         embedding_cache=tmp_path / "emb", show=False)
    before, after = res["nq-msmarco-hardneg"], res["nq-msmarco-hardneg/rerank"]
    for m in ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100"):
        assert 0 <= after[m] <= 1 and math.isfinite(after[m])
    # the reranker only reorders the first stage's top 5: its recall@100 is the first stage's recall@5
    assert after["recall_at_100"] == pytest.approx(before["recall_at_5"], abs=1e-5)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rerank_top_k"] == 5 and "nq-msmarco-hardneg/rerank" in saved["results"]


# ---------------------------------------------------------------- local tasks on the micro model

def test_local_tasks_through_mteb_on_micro(micro_embedder, shared_data, tmp_path):
    out = tmp_path / "eval.json"
    cfg = EvalConfig(
        task_dirs=[str(shared_data / "beir/nq-msmarco-hardneg"), str(shared_data / "beir/stsb-en-traindev")],
        sts=[str(shared_data / "sts-en/stsbenchmark-train-dev.tsv")],
        pairclf=[str(shared_data / "zh-pairclf/PAWSX.valid.tsv")],
        max_queries=8, max_corpus=60, max_pairs=80)
    res = evaluate_model(micro_embedder, cfg, out=out, embedding_cache=tmp_path / "emb", show=True)
    assert set(res) == {"nq-msmarco-hardneg", "stsb-en-traindev", "stsbenchmark-train-dev", "PAWSX.valid"}
    for name in ("nq-msmarco-hardneg", "stsb-en-traindev"):
        s = res[name]
        assert s["main_score"] == s["ndcg_at_10"]
        assert all(0 <= s[m] <= 1 for m in ("ndcg_at_10", "map_at_10", "mrr_at_10", "recall_at_100"))
    assert -1 <= res["stsbenchmark-train-dev"]["main_score"] <= 1
    assert res["stsbenchmark-train-dev"]["main_score"] == res["stsbenchmark-train-dev"]["cosine_spearman"]
    assert 0 <= res["PAWSX.valid"]["main_score"] <= 1
    assert all(math.isfinite(v) for s in res.values() for v in s.values())
    saved = json.loads(out.read_text())
    assert saved["results"] == res and saved["revision"] == parameters_fingerprint(
        micro_embedder, micro_embedder.cfg.model_dump_json())
    assert saved["instructions"]["stsbenchmark-train-dev"] == "Retrieve semantically similar text."


def test_eval_stage_scores_every_listed_mrl_dimension(micro_embedder, shared_data, tmp_path):
    """eval.dims: the full dimension gives the main scores, each listed dimension its own entries
    (as `<task>@<dim>`, with its own results file), computed on embeddings cut to that prefix."""
    from tasks.stages import eval_stage

    cfg = EvalConfig(task_dirs=[str(shared_data / "beir/nq-msmarco-hardneg")], max_queries=8, max_corpus=60,
                     dims=[4, 16])
    res = eval_stage(micro_embedder, cfg, str(tmp_path))["results"]
    task = "nq-msmarco-hardneg"
    assert set(res) == {task, f"{task}@4", f"{task}@16"}
    assert (tmp_path / "results@4.json").is_file() and (tmp_path / "results@16.json").is_file()
    direct = evaluate_model(micro_embedder, cfg, dim=4, show=False, out=tmp_path / "direct@4.json")
    assert res[f"{task}@4"] == direct[task] and res[task] != res[f"{task}@4"]


def test_beir_subsample_keeps_judged_docs_and_is_deterministic(shared_data):
    folder = shared_data / "beir/nq-msmarco-hardneg"
    a, b = beir_task(folder, max_queries=4, max_corpus=40), beir_task(folder, max_queries=4, max_corpus=40)
    a.load_data(), b.load_data()
    da, db = a.dataset["default"]["test"], b.dataset["default"]["test"]
    assert da["queries"]["id"] == db["queries"]["id"] and da["corpus"]["id"] == db["corpus"]["id"]
    assert len(da["queries"]) == 4 and len(da["corpus"]) == 40
    judged = {d for docs in da["relevant_docs"].values() for d in docs}
    assert judged <= set(da["corpus"]["id"])
    assert a.metadata.revision != beir_task(folder, max_queries=5).metadata.revision


def test_sts_and_pair_files_in_every_supported_format(shared_data, tmp_path):
    formats = {
        "stsbenchmark-train-dev.tsv": (shared_data / "sts-en/stsbenchmark-train-dev.tsv", 7249, (0, 5)),
        "STS-B.valid.data": (shared_data / "sts-zh/STS-B.valid.data", 1458, (0, 5)),
        "SICK_trial.txt": (shared_data / "sts-en/SICK_trial.txt", 500, (1, 5)),
    }
    jsonl = tmp_path / "pairs.jsonl"
    write_jsonl(jsonl, [{"sentence1": "a cat", "sentence2": "a dog", "score": 1.5},
                        {"sentence1": "a cat", "sentence2": "a cat", "score": 5}])
    formats["pairs.jsonl"] = (jsonl, 2, (1.5, 5))
    for label, (path, n, (lo, hi)) in formats.items():
        task = sts_task(path)
        task.load_data()
        ds = task.dataset["default"]["test"]
        assert len(ds) == n, label
        assert (min(ds["score"]), max(ds["score"])) == (lo, hi), label
        assert all(isinstance(s, str) and s for s in ds["sentence1"][:50] + ds["sentence2"][:50]), label
    for path, n in (("zh-pairclf/PAWSX.valid.tsv", 2000), ("zh-pairclf/AFQMC.dev.jsonl", 4316)):
        task = pair_classification_task(shared_data / path)
        task.load_data()
        ds = task.dataset["default"]["test"]
        assert len(ds) == n and set(ds["labels"]) == {0, 1}
        assert task.metadata.eval_langs == ["cmn-Hans"]
    sub = sts_task(formats["SICK_trial.txt"][0], max_pairs=50)
    sub.load_data()
    assert len(sub.dataset["default"]["test"]) == 50


def test_bad_inputs_name_file_line_and_field(tmp_path):
    bad_score = tmp_path / "bad.tsv"
    bad_score.write_text("a\tb\t1\nc\td\tnot-a-number\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: field 'score'"):
        sts_task(bad_score)
    bad_label = tmp_path / "bad_label.tsv"
    bad_label.write_text("a\tb\t1\nc\td\t0\ne\tf\t7\n")
    with pytest.raises(DataError, match=r"bad_label\.tsv:3: field 'label'"):
        pair_classification_task(bad_label)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "score": 2}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'sentence2'"):
        sts_task(bad_json)
    folder = _tiny_beir(tmp_path / "beir")
    (folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(DataError, match=r"beir: BEIR folder is missing qrels/test\.tsv"):
        beir_task(folder)


# ---------------------------------------------------------------- instructions

def test_task_prompts_lookup_and_overrides(tmp_path):
    import mteb

    p = TaskPrompts.load()
    assert p.instruction("NFCorpus") == ("Given a question, retrieve relevant documents that best answer "
                                         "the question")
    assert p.instruction("CQADupstackUnixRetrieval").startswith("Given a question, retrieve detailed question")
    assert p.instruction("xquad-de") == "Given a question, retrieve Wikipedia passages that answer the question"
    assert p.instruction("SomeNewTask", "Retrieval", {"query": "Find it"}) == "Find it"  # the task's prompt
    assert p.instruction("SomeNewTask", "STS") == "Retrieve semantically similar text."     # its type
    assert p.instruction("SomeNewTask") == p.table["default"]
    override = tmp_path / "prompts.json"
    override.write_text(json.dumps({"NFCorpus": "Mine", "STS": "Same meaning?"}))
    q = TaskPrompts.load(override)
    assert q.instruction("NFCorpus") == "Mine" and q.instruction("X", "STS") == "Same meaning?"
    assert TaskPrompts.load({"NFCorpus": "Dict"}).instruction("NFCorpus") == "Dict"
    # every task of the two benchmarks has its own entry in the table (by name or glob)
    for bench in ("MTEB(eng, v2)", "MTEB(cmn, v1)"):
        for t in mteb.get_benchmark(bench).tasks:
            name = t.metadata.name
            assert name in p.table or any(fnmatch.fnmatchcase(name, g) for g in p.globs), name


def test_queries_get_the_instruction_documents_none_symmetric_both(micro_embedder):
    enc = MtebEmbedder(micro_embedder, name="micro", fingerprint="x")
    retrieval = resolve_tasks(tasks=["NFCorpus"])[0].metadata
    sts = resolve_tasks(tasks=["STSBenchmark"])[0].metadata
    assert enc.instruction(retrieval, PromptType.query) == TaskPrompts.load().instruction("NFCorpus")
    assert enc.instruction(retrieval, PromptType.document) is None
    # STS: mteb passes prompt_type None for both sides, and both get the instruction
    assert enc.instruction(sts, None) == "Retrieve semantically similar text."


def test_a_symmetric_local_set_gives_its_documents_the_instruction(micro_embedder, shared_data):
    """eval.symmetric: an STS set laid out as retrieval is still a symmetric task (SPEC 1): its
    documents get the query's instruction, which changes their vectors; a name matching no task is refused."""
    from tasks.config import load_config

    folder = shared_data / "beir/stsb-zh-valid"
    task = beir_task(folder, max_queries=4, max_corpus=12)
    plain = MtebEmbedder(micro_embedder, name="micro", fingerprint="x")
    sym = MtebEmbedder(micro_embedder, name="micro", fingerprint="x", symmetric=[task.metadata.name])
    assert plain.instruction(task.metadata, PromptType.document) is None
    assert sym.instruction(task.metadata, PromptType.document) == sym.instruction(task.metadata, PromptType.query)
    assert plain.instruction(task.metadata, PromptType.query) == sym.instruction(task.metadata, PromptType.query)
    docs = ["一个男人在弹吉他。"]
    assert not np.allclose(sym.embed(docs, instruction=sym.instruction(task.metadata, PromptType.document),
                                     max_length=32),
                           plain.embed(docs, instruction=None, max_length=32))
    cfg = load_config("micro", [f"eval.task_dirs=[{folder}]", "eval.symmetric=[no-such-task]"]).eval
    with pytest.raises(ValueError, match="no-such-task"):
        evaluate_model(micro_embedder, cfg, out=None, show=False, embedding_cache=False)


def test_the_reranker_scores_a_symmetric_set_in_both_orders(micro_reranker, shared_data):
    """eval.rerank_symmetric: on a set named in eval.symmetric the reranker's score of (a, b) is the
    mean of its yes/no judgements of (a, b) and (b, a), the same whichever text is the query; on any
    other set it is the one judgement of (query, document), which is not symmetric."""
    task = beir_task(shared_data / "beir/stsb-zh-valid", max_queries=4, max_corpus=12)
    a, b = ["一个男人在弹吉他。", "一个女人在切土豆。"], ["一个人在演奏乐器。", "一个女人在切西兰花。"]
    kw = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default")
    instruction = TaskPrompts.load().for_task(task.metadata)
    one = lambda x, y: micro_reranker.score(x, y, instruction=instruction, max_length=128)
    plain = MtebReranker(micro_reranker, name="micro", fingerprint="x")
    both = MtebReranker(micro_reranker, name="micro", fingerprint="x", both_orders=[task.metadata.name])
    other = MtebReranker(micro_reranker, name="micro", fingerprint="x", both_orders=["another-task"])
    forward, backward = one(a, b), one(b, a)
    assert not np.allclose(forward, backward)  # the judgement alone is not symmetric
    np.testing.assert_allclose(plain.predict(a, b, **kw), forward, rtol=1e-6)
    np.testing.assert_allclose(other.predict(a, b, **kw), forward, rtol=1e-6)
    np.testing.assert_allclose(both.predict(a, b, **kw), (forward + backward) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.predict(b, a, **kw), both.predict(a, b, **kw),
                               rtol=1e-6)


def test_standard_benchmarks_resolve_offline():
    assert len(resolve_tasks("MTEB(eng, v2)")) == 41
    assert len(resolve_tasks("MTEB(cmn, v1)")) == 31
    assert len(resolve_tasks("MTEB(Code, v1)")) == 12
    assert len(resolve_tasks("MTEB(Multilingual)")) > 100
    assert [t.metadata.name for t in resolve_tasks(tasks=["SciFact", "STS12"])] == ["SciFact", "STS12"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        resolve_tasks("MTEB(klingon)")


# ---------------------------------------------------------------- embedding cache, MRL, MLflow

def test_embedding_cache_skips_encode_and_misses_on_another_fingerprint(micro_embedder, shared_data, tmp_path,
                                                                        monkeypatch):
    calls = []
    real = micro_embedder.encode
    monkeypatch.setattr(micro_embedder, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = EmbeddingCache(tmp_path / "emb")
    folder = shared_data / "beir/nq-msmarco-hardneg"

    def run(fingerprint, dim=None):
        enc = MtebEmbedder(micro_embedder, name="micro", fingerprint=fingerprint, cache=cache, dim=dim)
        return run_task(enc, beir_task(folder, max_queries=3, max_corpus=20))

    first = run("fp-a")
    assert len(calls) == 2  # queries (with instruction) + corpus
    assert run("fp-a") == first and len(calls) == 2 and cache.hits == 2
    run("fp-b")
    assert len(calls) == 4  # another checkpoint never reads fp-a's vectors
    small = run("fp-a", dim=16)
    assert len(calls) == 6 and 0 <= small["ndcg_at_10"] <= 1
    with pytest.raises(ValueError, match="larger than the model's embedding size"):
        MtebEmbedder(micro_embedder, name="micro", fingerprint="x", dim=10_000)


def test_log_eval_results_writes_eval_metrics_to_an_existing_run(tmp_path, monkeypatch):
    import mlflow

    from tasks.tracking import log_eval_results

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    result_file = tmp_path / "r.json"
    result_file.write_text("{}")
    results = {"nq/rerank": {"ndcg_at_10": 0.5, "main_score": 0.5, "nauc_at_10_max": 0.1}}
    log_eval_results(run_id, results, result_file)
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"eval/nq/rerank/ndcg_at_10": 0.5, "eval/nq/rerank/main_score": 0.5}
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/r.json"]


# ---------------------------------------------------------------- CLI

def test_cli_eval_micro_and_bad_task_dir(shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tasks.evaluation.run
    from flows.cli import app

    monkeypatch.setattr(tasks.evaluation.run, "default_embedding_cache",
                        lambda: EmbeddingCache(tmp_path / "emb"))
    out = tmp_path / "cli.json"
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "micro", "--task-dir", str(shared_data / "beir/nq-msmarco-hardneg"),
                              "--max-queries", "5", "--max-corpus", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "nq-msmarco-hardneg  main score 0." in res.output
    assert json.loads(out.read_text())["results"]["nq-msmarco-hardneg"]["main_score"] >= 0

    bad = _tiny_beir(tmp_path / "no-qrels")
    (bad / "qrels" / "test.tsv").unlink()
    res = runner.invoke(app, ["eval", "micro", "--task-dir", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}: BEIR folder is missing qrels/test.tsv" in res.output

    res = runner.invoke(app, ["eval", "micro"])
    assert res.exit_code == 1 and "nothing to evaluate" in res.output


def test_eval_autocast_scores_in_bf16_under_its_own_revision_and_leaves_the_model_alone(
        micro_embedder, micro_reranker, shared_data, tmp_path):
    """eval.autocast: the embedder and the reranker encode with bf16 matrix products; the record's
    revision (the embedding cache's namespace) is not float32's, and the live models keep their own
    setting."""
    cfg = EvalConfig(task_dirs=[str(shared_data / "beir/nq-msmarco-hardneg")], max_queries=6, max_corpus=60,
                     rerank_top_k=5)
    runs = {}
    for autocast in (None, "bfloat16"):
        out = tmp_path / f"{autocast}.json"
        evaluate_model(micro_embedder, cfg.model_copy(update={"autocast": autocast}), reranker=micro_reranker,
                       out=out, embedding_cache=tmp_path / "emb", show=False)
        runs[autocast] = json.loads(out.read_text())
    fp32, bf16 = runs[None], runs["bfloat16"]
    assert micro_embedder.cfg.autocast is None and micro_reranker.cfg.autocast is None
    assert fp32["model_settings"]["autocast"] is None and bf16["model_settings"]["autocast"] == "bfloat16"
    assert bf16["revision"] != fp32["revision"] and bf16["reranker_revision"] != fp32["reranker_revision"]
    assert bf16["revision"] == parameters_fingerprint(
        micro_embedder, micro_embedder.cfg.model_copy(update={"autocast": "bfloat16"}).model_dump_json())
    for task in ("nq-msmarco-hardneg", "nq-msmarco-hardneg/rerank"):  # close, not bit-equal
        assert bf16["results"][task]["ndcg_at_10"] == pytest.approx(fp32["results"][task]["ndcg_at_10"], abs=0.15)
