"""Filtering (paper §3.3): cos(query with its instruction, document) > threshold, on Ray actors.
Scores are checked by recomputing them one text at a time with `Embedder.encode`; the pool of
actors is the one the caller hands over (each actor reports what Ray gave it)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tasks.config import FilterConfig
from tasks.data import write_jsonl
from tasks.distributed import Placement
from tasks.filter import filter_pairs, score_pairs
from tasks.synthesis.prompts import INSTRUCTIONS

EXAMPLES = "flagembedding-examples"


def _records(shared_data: Path) -> list[dict]:
    """Real pairs in the synthesis output format: retrieval (query, positive) and (query, hard
    negative) from MS MARCO / NQ, and symmetric STS pairs from STS-B."""
    recs = []
    for name, lang in (("embedder__retrieval__msmarco.jsonl", "English"), ("embedder__retrieval__nq.jsonl", "English")):
        for line in (shared_data / EXAMPLES / name).read_text().splitlines()[:6]:
            row = json.loads(line)
            for doc in (row["pos"][0], row["neg"][0]):
                recs.append({"query": row["query"], "response": doc, "rejected_response": [],
                             "instruction": INSTRUCTIONS["retrieval"],
                             "meta": {"task": "retrieval", "language": lang, "passage_id": f"{name}:{len(recs)}"}})
    rows = (shared_data / "sts-en" / "stsbenchmark-train-dev.tsv").read_text().splitlines()[1:9]
    for row in rows:
        cols = row.split("\t")
        recs.append({"query": cols[6], "response": cols[7], "rejected_response": [], "instruction":
                     INSTRUCTIONS["sts"], "symmetric": True,
                     "meta": {"task": "sts", "language": "English", "passage_id": f"sts:{cols[4]}"}})
    recs.append({"query": "Das Wetter ist heute schön.", "response": "The weather is nice today.",
                 "rejected_response": [], "meta": {"task": "bitext", "language": "German"}})  # no instruction
    return recs


@pytest.fixture
def pairs_dir(shared_data, tmp_path) -> Path:
    recs = _records(shared_data)
    d = tmp_path / "pairs"
    write_jsonl(d / "shard-00000.jsonl", recs[:16])
    write_jsonl(d / "shard-00001.jsonl", recs[16:])
    write_jsonl(d / "rejected" / "rejected-00000.jsonl", [{"reason": "not a pair"}])  # must be ignored
    return d


def _recompute(embedder, rec: dict) -> float:
    ins = rec.get("instruction")
    q = embedder.encode([rec["query"]], instruction=ins, is_query=True)
    d = embedder.encode([rec["response"]], instruction=ins if rec.get("symmetric") else None)
    return float(q[0] @ d[0])


def test_filter_keeps_exactly_the_pairs_above_threshold(ray_session, micro_cfg, micro_embedder, pairs_dir,
                                                        tmp_path):
    recs = [json.loads(line) for f in sorted(pairs_dir.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    expected = np.array([_recompute(micro_embedder, r) for r in recs])
    s = np.sort(expected)
    mid = len(s) // 2
    threshold = float((s[mid - 1] + s[mid]) / 2)  # halfway between two scores: no ties at the boundary
    assert s[mid] - s[mid - 1] > 1e-4

    cfg = FilterConfig(threshold=threshold, workers=2, batch_size=4)
    res = filter_pairs(cfg, pairs_dir, tmp_path / "filtered", embedder=micro_cfg.model, progress=False)

    kept = [json.loads(line) for f in res.shards for line in f.read_text().splitlines()]
    dropped = [json.loads(line) for f in sorted((tmp_path / "filtered" / "dropped").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(kept) + len(dropped) == len(recs)
    by_key = {(r["query"], r["response"]): r for r in kept + dropped}
    shards = [[json.loads(line) for line in f.read_text().splitlines()] for f in sorted(pairs_dir.glob("shard-*.jsonl"))]
    for rec, score in zip(recs, expected):
        got = by_key[(rec["query"], rec["response"])]
        assert got["meta"]["filter_score"] == pytest.approx(score, abs=1e-4)
        assert (got in kept) == (score > threshold)
        assert {k: v for k, v in got.items() if k != "meta"} == {k: v for k, v in rec.items() if k != "meta"}
        assert {k: v for k, v in got["meta"].items()
                if k not in ("filter_score", "filter_mismatched_score")} == rec["meta"]
    for shard in shards:  # the mismatched score: the query against the next record's document (cyclic)
        for i, rec in enumerate(shard):
            nxt = shard[(i + 1) % len(shard)]
            ins = rec.get("instruction")
            q = micro_embedder.encode([rec["query"]], instruction=ins, is_query=True)[0]
            d = micro_embedder.encode([nxt["response"]], instruction=nxt.get("instruction") if nxt.get("symmetric")
                                      else None)[0]
            got = by_key[(rec["query"], rec["response"])]["meta"]["filter_mismatched_score"]
            assert got == pytest.approx(float(q @ d), abs=1e-4)
    assert [p.name for p in res.shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]

    report = json.loads((tmp_path / "filtered" / "report.json").read_text())
    assert report["total"] == len(recs) and report["kept"] == int((expected > threshold).sum()) == len(kept)
    assert report["kept_fraction"] == pytest.approx(len(kept) / len(recs), abs=1e-4)
    assert report["by_task"]["sts"]["total"] == 8 and report["by_language"]["German"]["total"] == 1
    assert sum(v["kept"] for v in report["by_task"].values()) == len(kept)
    assert report["score_quantiles"]["p50"] == pytest.approx(float(np.median(expected)), abs=1e-3)
    assert report["score_quantiles"]["min"] == pytest.approx(s[0], abs=1e-4)
    assert res.histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.histogram.stat().st_size > 5000

    _resumes_and_refuses_other_settings(cfg, pairs_dir, tmp_path / "filtered", "shard-00001.jsonl",
                                        micro_cfg.model, {"threshold": 0.5})


def _resumes_and_refuses_other_settings(cfg, pairs_dir, out, shard, model, other: dict) -> None:
    """A lost shard is rescored to the same bytes; other settings in the same folder are refused."""
    first = (out / shard).read_bytes()
    (out / shard).unlink()
    again = filter_pairs(cfg, pairs_dir, out, embedder=model, progress=False)
    assert (out / shard).read_bytes() == first and again.report["run"]["shards_scored"] == 1
    with pytest.raises(ValueError, match="other settings"):
        filter_pairs(cfg.model_copy(update=other), pairs_dir, out, embedder=model, progress=False)


class ReportingEncoder:
    """The scoring model, built in a Ray actor that first writes what it holds to `folder/<pid>.json`:
    the resources Ray assigned it and its torch threads."""

    def __init__(self, folder: Path, spec):
        import ray
        import torch

        from tasks.models.specs import load_encoder

        held = {"resources": ray.get_runtime_context().get_assigned_resources(),
                "threads": torch.get_num_threads()}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{os.getpid()}.json").write_text(json.dumps(held))
        self.inner = load_encoder(spec, device="cpu")

    def encode(self, texts, **kw):
        return self.inner.encode(texts, **kw)


def test_the_filter_runs_the_pool_it_is_handed(ray_session, micro_cfg, pairs_dir, tmp_path):
    """The config asks for one actor; the placement decides: two actors of one CPU, then one of two
    CPUs (the fixture's Ray has two), with the same pairs kept either way."""
    cfg = FilterConfig(threshold=0.2, workers=1, batch_size=4)
    outputs = []
    for placement in (Placement(actors=2, cpus=1.0), Placement(actors=1, cpus=2.0)):
        held = tmp_path / f"held-{placement.actors}"
        factory = functools.partial(ReportingEncoder, held, micro_cfg.model)
        out = tmp_path / f"filtered-{placement.actors}"
        res = filter_pairs(cfg, pairs_dir, out, embedder=micro_cfg.model, placement=placement,
                           encoder_factory=factory, progress=False)
        actors = [json.loads(p.read_text()) for p in held.glob("*.json")]
        assert len(actors) == placement.actors == res.report["run"]["workers"]
        assert all(a["resources"].get("CPU") == placement.cpus and not a["resources"].get("GPU")
                   and a["threads"] == placement.threads for a in actors), actors
        outputs.append({str(p.relative_to(out)): [json.loads(x) for x in p.read_text().splitlines()]
                        for p in out.rglob("*.jsonl")})
    # the same split and scores (to float noise: a different number of torch threads sums differently)
    assert len(outputs[0]) == 4 and outputs[0].keys() == outputs[1].keys()  # 2 kept + 2 dropped shards
    for name, records in outputs[0].items():
        assert [r["query"] for r in records] == [r["query"] for r in outputs[1][name]]
        assert [r["meta"]["filter_score"] for r in records] == \
            pytest.approx([r["meta"]["filter_score"] for r in outputs[1][name]], abs=1e-5)


def test_sentence_transformer_scorer_ranks_positives_above_negatives(shared_data):
    from tasks.models.specs import load_encoder

    recs = [r for r in _records(shared_data) if r["meta"]["task"] == "retrieval"]
    scores = score_pairs(load_encoder("bundled:all-minilm-l6-v2"), recs, batch_size=8)
    pos, neg = scores[0::2], scores[1::2]  # (query, positive), (query, hard negative) alternate
    assert np.all(np.abs(scores) <= 1 + 1e-5) and pos.mean() > neg.mean()


def test_the_report_says_when_the_scorer_cannot_tell_real_pairs_from_mismatched_ones(ray_session, micro_cfg,
                                                                                    pairs_dir, tmp_path):
    """MiniLM separates real pairs from mismatched ones (a query with another pair's document); the
    untrained micro model, whose cosines sit in a narrow band, passes mismatched pairs as readily as
    real ones at a threshold that keeps most pairs, and the report says so."""
    minilm = filter_pairs(FilterConfig(threshold=0.5, workers=1, batch_size=8), pairs_dir, tmp_path / "minilm",
                          embedder="bundled:all-minilm-l6-v2", progress=False).report
    assert minilm["mismatched"]["total"] == minilm["total"]
    assert minilm["mismatched"]["kept_fraction"] < 0.2 < minilm["kept_fraction"]
    assert minilm["mismatched"]["score_quantiles"]["p50"] < minilm["score_quantiles"]["p50"]
    assert "warning" not in minilm

    scores = np.sort(score_pairs(__import__("tasks.models", fromlist=["Embedder"]).Embedder.load(
        micro_cfg.model, device="cpu"), [json.loads(x) for f in sorted(pairs_dir.glob("shard-*.jsonl"))
                                         for x in f.read_text().splitlines()]))
    low = float(scores[1]) - 1e-6  # keeps all but the lowest-scored pair
    micro = filter_pairs(FilterConfig(threshold=low, workers=1, batch_size=8), pairs_dir, tmp_path / "micro",
                         embedder=micro_cfg.model, progress=False).report
    assert micro["mismatched"]["kept_fraction"] > 0.5
    assert "passes" in micro["warning"] and "mismatched pairs" in micro["warning"]
    assert json.loads((tmp_path / "micro" / "report.json").read_text())["warning"] == micro["warning"]


def test_one_spec_loader_for_filter_and_evaluation_and_no_instruction_for_sentence_transformers():
    """The filter and evaluation read `bundled:all-minilm-l6-v2` the same way, and a model never
    trained with `Instruct: ...\nQuery:` gets no instruction (it would only add noise to the cosine)."""
    from tasks.evaluation.encoders import load_embedding_model
    from tasks.models.specs import load_encoder, sentence_transformers_source

    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    enc = load_encoder("bundled:all-minilm-l6-v2", device="cpu")
    plain = enc.encode(texts)
    assert np.array_equal(enc.encode(texts, instruction="Retrieve semantically similar text.", is_query=True), plain)
    loaded = load_embedding_model("bundled:all-minilm-l6-v2", device="cpu").model
    assert np.allclose(loaded.encode(texts, normalize_embeddings=True), plain, atol=1e-6)
    assert sentence_transformers_source("bundled:smollm2") is None and sentence_transformers_source("micro") is None
    assert sentence_transformers_source("st:some/hub-name") == "some/hub-name"


def test_filter_cli_reuses_finished_shards(ray_session, pairs_dir, tmp_path, micro_cfg):
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "cli"
    args = ["filter", str(pairs_dir), "--out", str(out), "--embedder", "micro", "--threshold", "0.2",
            "--preset", "micro"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "kept" in first.output and (out / "report.json").is_file() and (out / "scores.png").is_file()
    snapshot = {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")}
    second = CliRunner().invoke(app, args)  # every shard is done: no Ray, same files
    assert second.exit_code == 0, second.output
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")} == snapshot
    assert json.loads((out / "report.json").read_text())["run"]["shards_scored"] == 0
    bad = CliRunner().invoke(app, ["filter", str(tmp_path / "nothing"), "--out", str(out), "--embedder", "micro"])
    assert bad.exit_code == 1 and "no shard-*.jsonl" in bad.output


def test_round_trip_keeps_a_pair_only_when_its_query_finds_its_document(ray_session, micro_cfg, micro_embedder,
                                                                        pairs_dir, tmp_path):
    """filter.round_trip_k: the rank of each pair's document among the documents of every pair with
    its instruction, recomputed one text at a time, decides with the threshold; a shard lost and
    rescored ranks against the same candidates."""
    recs = [json.loads(line) for f in sorted(pairs_dir.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]

    def doc(r, text):
        ins = r.get("instruction")
        return micro_embedder.encode([text], instruction=ins if r.get("symmetric") else None)[0]

    expected = []
    for r in recs:
        q = micro_embedder.encode([r["query"]], instruction=r.get("instruction"), is_query=True)[0]
        own = float(q @ doc(r, r["response"]))
        others = {(x.get("instruction") if x.get("symmetric") else None, x["response"]): x for x in recs}
        expected.append(1 + sum(float(q @ doc(x, t)) > own for (_, t), x in others.items() if t != r["response"]))
    expected = np.array(expected)
    assert len(set(expected)) > 3  # the micro model ranks, it does not tie everything

    cfg = FilterConfig(threshold=-1.0, round_trip_k=2, workers=2, batch_size=4)
    out = tmp_path / "rt"
    res = filter_pairs(cfg, pairs_dir, out, embedder=micro_cfg.model, progress=False)
    rows = [json.loads(line) for f in res.shards + sorted((out / "dropped").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    kept = {(r["query"], r["response"]) for f in res.shards for r in map(json.loads, f.read_text().splitlines())}
    ranks = {(r["query"], r["response"]): r["meta"]["filter_rank"] for r in rows}
    assert [ranks[(r["query"], r["response"])] for r in recs] == expected.tolist()
    assert kept == {(r["query"], r["response"]) for r, k in zip(recs, expected) if k <= 2}
    assert res.report["round_trip"]["dropped_by_rank"] == int((expected > 2).sum()) > 0
    assert res.report["kept"] == int((expected <= 2).sum())

    _resumes_and_refuses_other_settings(cfg, pairs_dir, out, "shard-00000.jsonl", micro_cfg.model, {"round_trip_k": 3})


def test_round_trip_pool_is_a_seeded_sample_of_distinct_documents(pairs_dir):
    from tasks.filter import round_trip_pool

    shards = sorted(pairs_dir.glob("shard-*.jsonl"))
    full = round_trip_pool(shards, 100)
    assert len(full) == len(set(full)) == 24 + 8 + 1  # retrieval documents, STS sentences, the German pair's
    sts = [json.loads(x) for x in shards[1].read_text().splitlines() if '"symmetric": true' in x]
    assert len(sts) == 8 and all((INSTRUCTIONS["sts"], r["response"]) in full for r in sts)  # encoded as its pair does
    assert (None, "The weather is nice today.") in full
    small = round_trip_pool(shards, 5)
    assert len(small) == 5 and set(small) <= set(full) and small == round_trip_pool(shards, 5)
    assert small != round_trip_pool(shards, 5, seed=1)
