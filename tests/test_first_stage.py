"""A fixed first stage for reranking (tasks/evaluation/first_stage.py; the paper's Table 4 reranks one
top-100 for every reranker): eval.save_first_stage writes each query's top-k, eval.first_stage makes
the reranker rerank a file's top-k instead of the embedder's. Offline, on a real BEIR set with the
micro models."""

from __future__ import annotations

import json
import logging

import pytest

from tasks.config import EvalConfig
from tasks.data import DataError
from tasks.evaluation.encoders import as_mteb_encoder
from tasks.evaluation.first_stage import FirstStage, first_stage_path, read_predictions, truncate_run
from tasks.evaluation.local_tasks import beir_task
from tasks.evaluation.run import evaluate_model, evaluate_task

TASK = "nq-msmarco-hardneg"
TOP_K = 5


@pytest.fixture
def cfg(shared_data) -> EvalConfig:
    return EvalConfig(task_dirs=[str(shared_data / "beir" / TASK)], max_queries=6, max_corpus=40, rerank_top_k=TOP_K)


@pytest.fixture
def direct(micro_embedder, micro_reranker, cfg, tmp_path):
    """Reranking the embedder's own top-k, saving that top-k as a first stage on the way."""
    out = tmp_path / "direct.json"
    res = evaluate_model(micro_embedder, cfg.model_copy(update={"save_first_stage": True}), reranker=micro_reranker,
                         out=out, embedding_cache=tmp_path / "emb", show=False)
    return res, first_stage_path(out)


def _scored_pairs(monkeypatch, reranker) -> list[tuple[str, str]]:
    """Every (query, document) text pair the reranker scores from now on."""
    pairs: list[tuple[str, str]] = []
    real = reranker.score
    monkeypatch.setattr(reranker, "score", lambda qs, ds, **k: pairs.extend(zip(qs, ds)) or real(qs, ds, **k))
    return pairs


def test_the_saved_file_has_each_querys_top_k(direct, micro_embedder, cfg, tmp_path):
    res, path = direct
    assert path == tmp_path / "direct.first_stage.json"
    saved = json.loads(path.read_text())
    record = json.loads((tmp_path / "direct.json").read_text())
    assert (saved["model"], saved["revision"]) == (record["model"], record["revision"])
    assert saved["top_k"] == TOP_K and saved["dim"] is None and record["first_stage_file"] == str(path)
    run = saved["tasks"][TASK]                              # one subset, one split: {qid: {docid: score}}
    assert len(run) == 6 and all(len(docs) == TOP_K for docs in run.values())
    for docs in run.values():
        scores = list(docs.values())
        assert scores == sorted(scores, reverse=True)       # best first
    # exactly the first TOP_K of mteb's own full ranking of the same task by the same model
    task = beir_task(cfg.task_dirs[0], max_queries=6, max_corpus=40)
    evaluate_task(as_mteb_encoder(micro_embedder), task, prediction_folder=tmp_path / "pred")
    full = read_predictions(tmp_path / "pred" / task.prediction_file_name)["default"]["test"]
    assert all(len(docs) == 40 for docs in full.values())   # the whole (subsampled) corpus, ranked
    assert run == truncate_run(full, TOP_K)
    assert {q: list(d) for q, d in run.items()} == {q: list(d) for q, d in truncate_run(full, TOP_K).items()}


def test_a_saved_first_stage_reranks_exactly_as_reranking_directly(direct, micro_embedder, micro_reranker, cfg,
                                                                     tmp_path, monkeypatch):
    res, path = direct
    pairs = _scored_pairs(monkeypatch, micro_reranker)
    again = evaluate_model(micro_embedder, cfg.model_copy(update={"first_stage": str(path)}), reranker=micro_reranker,
                           out=tmp_path / "fixed.json", embedding_cache=tmp_path / "emb", show=False)
    assert again[f"{TASK}/rerank"] == res[f"{TASK}/rerank"]  # bit for bit
    assert again[TASK] == res[TASK]                          # the embedder's own scores are still there
    assert len(pairs) == 6 * TOP_K
    record = json.loads((tmp_path / "fixed.json").read_text())
    assert record["first_stage"]["file"] == str(path) and record["first_stage"]["top_k"] == TOP_K
    # the reranker only reorders the first stage: its recall@100 is the first stage's recall@5
    assert again[f"{TASK}/rerank"]["recall_at_100"] == pytest.approx(res[TASK]["recall_at_5"], abs=1e-5)


def test_a_hand_edited_first_stage_changes_what_gets_reranked(direct, micro_embedder, micro_reranker, cfg,
                                                              tmp_path, monkeypatch):
    res, path = direct
    task = beir_task(cfg.task_dirs[0], max_queries=6, max_corpus=40)
    task.load_data()
    data = task.dataset["default"]["test"]
    relevant = data["relevant_docs"]
    text = dict(zip(data["corpus"]["id"], data["corpus"]["text"]))
    saved = json.loads(path.read_text())
    # each query: its judged documents plus the embedder's 5th, in place of the embedder's top 5
    edited = {q: {**{d: 1.0 for d in relevant[q]}, list(docs)[-1]: 0.5} for q, docs in saved["tasks"][TASK].items()}
    saved["tasks"][TASK] = edited
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps(saved))
    pairs = _scored_pairs(monkeypatch, micro_reranker)
    out = evaluate_model(micro_embedder, cfg.model_copy(update={"first_stage": str(hand)}), reranker=micro_reranker,
                         out=tmp_path / "hand-out.json", embedding_cache=tmp_path / "emb", show=False)
    wanted = sorted(text[d] for docs in edited.values() for d in list(docs)[:TOP_K])
    assert sorted(d for _, d in pairs) == wanted          # the reranker scored the file's documents, no others
    after = out[f"{TASK}/rerank"]
    assert after["recall_at_100"] == pytest.approx(1.0)   # every judged document was a candidate
    assert after != res[f"{TASK}/rerank"]


def test_a_bare_task_mapping_is_a_first_stage_too(tmp_path, shared_data):
    task = beir_task(shared_data / "beir" / TASK, max_queries=2, max_corpus=20)
    task.load_data()
    data = task.dataset["default"]["test"]
    q, d = data["queries"]["id"][0], data["corpus"]["id"][0]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({TASK: {q: {d: 3}}}))
    fs = FirstStage.load(bare)
    assert fs.meta == {} and fs.cells(task) == {"default": {"test": {q: {d: 3}}}}


def test_bad_first_stage_files_are_refused_naming_file_task_query(micro_embedder, micro_reranker, cfg, tmp_path,
                                                                   shared_data, caplog):
    task = beir_task(cfg.task_dirs[0], max_queries=6, max_corpus=40)
    task.load_data()
    qid = task.dataset["default"]["test"]["queries"]["id"][0]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"tasks": {"SomeOtherTask": {qid: {"x": 1.0}}}}))
    with pytest.raises(DataError, match=rf"other\.json: no first stage for task\(s\) {TASK}"):
        evaluate_model(micro_embedder, cfg.model_copy(update={"first_stage": str(other)}), reranker=micro_reranker,
                       out=tmp_path / "o.json", embedding_cache=False, show=False)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({TASK: {qid: {"no-such-doc": 1.0}}}))
    with pytest.raises(DataError, match=rf"unknown\.json: task '{TASK}': query '{qid}': document 'no-such-doc'"):
        FirstStage.load(unknown).cells(task)
    for text, msg in (('{"t": {"q": {"d": "high"}}}', r"query 'q': the score of 'd' must be a number"),
                      ('{"t": [1, 2]}', r"task 't': expected"), ("{", r"bad\.json:1: malformed JSON")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DataError, match=msg):
            FirstStage.load(bad)
    # no reranker: the file is not read, and the log says so
    with caplog.at_level(logging.WARNING, logger="tasks.evaluation.run"):
        evaluate_model(micro_embedder, cfg.model_copy(update={"first_stage": str(other)}), out=tmp_path / "n.json",
                       embedding_cache=tmp_path / "emb", show=False)
    assert "is not used: there is no reranker" in caplog.text


def test_instruction_retrieval_tasks_are_reranked_by_type(micro_embedder, micro_reranker, cfg, tmp_path):
    """eval.rerank_types: an mteb InstructionRetrieval task (FollowIR-like) is an AbsTaskRetrieval,
    reranked like Retrieval; a type left out of the list is not reranked."""
    def instruction_task():
        task = beir_task(cfg.task_dirs[0], name="local-instruct", max_queries=6, max_corpus=40)
        type(task).metadata = task.metadata.model_copy(update={"type": "InstructionRetrieval"})
        return task

    both = evaluate_model(micro_embedder, cfg.model_copy(update={"task_dirs": []}), reranker=micro_reranker,
                          extra_tasks=[instruction_task()], out=tmp_path / "a.json", embedding_cache=tmp_path / "e",
                          show=False)
    assert set(both) == {"local-instruct", "local-instruct/rerank"}
    only = evaluate_model(micro_embedder, cfg.model_copy(update={"task_dirs": [], "rerank_types": ["Retrieval"]}),
                          reranker=micro_reranker, extra_tasks=[instruction_task()], out=tmp_path / "b.json",
                          embedding_cache=tmp_path / "e", show=False)
    assert set(only) == {"local-instruct"} and only["local-instruct"] == both["local-instruct"]
