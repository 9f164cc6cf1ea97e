"""Bad input is refused where it is first read, with the file, the line and the field, and leaves
no output that could pass for complete. The reader-level cases of tests/test_data.py are not
repeated: these go through the boundaries users hit (trainer, CLI, config, synthesis, filtering,
model loading) and cover what that file does not."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import ConfigError, DataSource, FilterConfig, ModelConfig, load_config
from tasks.data import DataError, load_source, load_sources
from tasks.models import Embedder, ModelLoadError, resolve_backbone
from tasks.training import list_checkpoints, train

GOOD = {"query": "what is the capital of France", "response": "Paris is the capital of France."}


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _good(i: int) -> str:
    return json.dumps({"query": f"question {i}", "response": f"answer {i}"})


def _nothing_trained(out: Path) -> bool:
    return not (out / "final").exists() and not list_checkpoints(out)


# ----------------------------------------------------------------------------- training data

@pytest.mark.parametrize("bad, message", [
    (b'{"query": "caf\xe9", "response": "d"}', r"not valid UTF-8 \(byte 14"),
    ('{"query": "q", "response": "\\ud800"}', "field 'response' is not valid Unicode"),
    ('{"query": "q", "response": "d", "symmetric": "yes"}', "field 'symmetric' must be true or false"),
    ('{"query": "q", "pos": ["p"], "neg": ["  "]}', r"field 'neg'\[0\] is empty"),
    ('{"anchor": "a", "positive": ["p"]}', "field 'positive' must be a string, got list"),
    ('{"query": "q", "response": "d", "instruction": 7}', "field 'instruction' must be a string"),
    ('{"query": "q", "response": ' + "9" * 5000 + "}", "unreadable JSON"),
    ("[" * 100_000, "unreadable JSON|malformed JSON"),
])
def test_bad_training_line_stops_the_trainer_before_it_writes_anything(micro_cfg, tmp_path, bad, message):
    """A bad line in the third shard of a synthetic-data folder: the error names that shard and line."""
    shards = tmp_path / "shards"
    _jsonl(shards / "shard-00000.jsonl", [_good(0), _good(1)])
    _jsonl(shards / "shard-00001.jsonl", [_good(2)])
    bad_file = _jsonl(shards / "shard-00002.jsonl", [_good(3), "", bad])
    cfg = micro_cfg.stage2.model_copy(update={"data": [DataSource(path=str(shards))], "steps": 2})
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad_file))}:3: ({message})"):
        train(cfg, micro_cfg.model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = _jsonl(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + _good(0).encode(), _good(1)])
    assert [p.query for p in load_source(DataSource(path=str(path)))] == ["question 0", "question 1"]


def test_the_cli_names_file_line_and_field_without_a_traceback(tmp_path):
    data = _jsonl(tmp_path / "pairs.jsonl", [_good(0), '{"query": " ", "response": "d"}'])
    res = CliRunner().invoke(app, ["train", "--preset", "micro", "--out", str(tmp_path / "out"), "--data", str(data),
                                   "stage2.steps=2"])
    assert res.exit_code == 1
    assert f"error: {data}:2: field 'query' is empty" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- BEIR folders

def _beir(folder: Path, corpus: list[str | bytes], queries: list[str | bytes], qrels: bytes | None) -> Path:
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "queries.jsonl", queries)
    if qrels is not None:
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        (folder / "qrels" / "test.tsv").write_bytes(qrels)
    return folder


CORPUS = ['{"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."}',
          '{"_id": "d2", "text": "Berlin is the capital of Germany."}']
QUERIES = ['{"_id": "q1", "text": "capital of France"}']
HEADER = b"query-id\tcorpus-id\tscore\n"


@pytest.mark.parametrize("corpus, queries, qrels, message", [
    (CORPUS, QUERIES, HEADER + b"q9\td1\t1\n", r"qrels/test.tsv:2: field 'query-id' 'q9' is not in queries.jsonl"),
    (CORPUS, QUERIES, HEADER + b"q1\td1\t1\nq1\td\xff2\t0\n", r"qrels/test.tsv:3: not valid UTF-8"),
    (CORPUS, QUERIES, HEADER + b"q1\td1\tinf\n", r"qrels/test.tsv:2: field 'score' must be a number, got 'inf'"),
    (CORPUS, QUERIES, HEADER + b"q1 d1 1\n", r"qrels/test.tsv:2: expected 3 columns"),
    (CORPUS, QUERIES, HEADER, r"qrels/test.tsv: no judgements"),
    (CORPUS + [b'{"_id": "d3", "text": "M\xfcnchen"}'], QUERIES, HEADER + b"q1\td1\t1\n",
     r"corpus.jsonl:3: not valid UTF-8"),
    (CORPUS, ['{"_id": "q1", "text": "a"}', '{"_id": "q1", "text": "b"}'], HEADER + b"q1\td1\t1\n",
     r"queries.jsonl:2: duplicate _id 'q1'"),
    (CORPUS, ['{"_id": ["q1"], "text": "a"}'], HEADER, r"queries.jsonl:1: field '_id' must be a string"),
    (CORPUS, QUERIES, None, r"BEIR folder is missing qrels/test.tsv"),
])
def test_beir_errors_name_file_line_and_field(tmp_path, corpus, queries, qrels, message):
    folder = _beir(tmp_path / "beir", corpus, queries, qrels)
    with pytest.raises(DataError, match=message):
        load_source(DataSource(path=str(folder), format="beir"))


def test_a_beir_folder_missing_its_corpus_is_named_as_such(tmp_path):
    """Not mistaken for a folder of pair shards (which would complain about queries.jsonl's format)."""
    folder = _beir(tmp_path / "beir", [], QUERIES, HEADER + b"q1\td1\t1\n")
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=r"BEIR folder is missing corpus.jsonl"):
        load_source(DataSource(path=str(folder)))


# ----------------------------------------------------------------------------- skip_bad_lines

def test_skip_bad_lines_is_a_data_source_setting_and_the_count_is_logged(tmp_path, caplog):
    path = _jsonl(tmp_path / "mixed.jsonl", [_good(0), "{oops", _good(1), '{"query": "q"}', _good(2),
                                             b'{"query": "\xff", "response": "r"}'])
    override = f"stage2.data=[{{path: {path}, skip_bad_lines: true}}]"
    cfg = load_config("micro", [override])
    assert cfg.stage2.data[0].skip_bad_lines is True
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        pairs = load_sources(cfg.stage2.data)
    assert [p.query for p in pairs] == ["question 0", "question 1", "question 2"]
    assert f"{path}: skipped 3 bad line(s) of 6" in caplog.text and f"{path}:2: malformed JSON" in caplog.text
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):  # off by default
        load_sources(load_config("micro", [f"stage2.data=[{{path: {path}}}]"]).stage2.data)


def test_skipping_a_mostly_bad_file_counts_every_line_but_keeps_few_messages(tmp_path, caplog):
    from tasks.data import PairFile

    path = _jsonl(tmp_path / "dirty.jsonl", [_good(0)] + ['{"query": "", "response": "r"}'] * 250 + [_good(1)])
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        pairs = PairFile(path, skip_bad_lines=True)
    assert len(pairs) == 2 and pairs.report.n_skipped == 250 and len(pairs.report.skipped) == 100
    assert f"{path}: skipped 250 bad line(s) of 252 (skip_bad_lines); first: {path}:2: field 'query' is empty" \
        in caplog.text


def test_skip_bad_lines_in_a_beir_folder_drops_the_judgements_of_skipped_documents(tmp_path, caplog):
    folder = _beir(tmp_path / "beir", CORPUS + ['{"_id": "d3", "text": ""}'], QUERIES,
                   HEADER + b"q1\td1\t1\nq1\td3\t0\nq1\td2\t0\n")
    with pytest.raises(DataError, match="corpus.jsonl:3: field 'text' is empty"):
        load_source(DataSource(path=str(folder)))
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        pairs = load_source(DataSource(path=str(folder), skip_bad_lines=True))
    assert len(pairs) == 1 and pairs[0].negatives == ("Berlin is the capital of Germany.",)
    assert "corpus.jsonl: skipped 1 bad line(s)" in caplog.text
    assert "test.tsv: skipped 1 bad line(s)" in caplog.text and "'d3' is not in corpus.jsonl" in caplog.text


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("override, message", [
    ("synth.generator.temperature=-0.1", r"synth.generator.temperature: Input should be greater than or equal to 0"),
    ("stage2.data=[{path: x.jsonl, limt: 3}]", r"stage2.data.0.limt: unknown key"),
    ("stage2.data=[{path: x.jsonl, skip_bad_lines: maybe}]",
     r"stage2.data.0.skip_bad_lines: Input should be a valid boolean"),
    ("filter.threshold=2", r"filter.threshold: Input should be less than or equal to 1"),
    ("model.max_query_length=1", r"model.max_query_length: Input should be greater than 1"),
    ("merge.weights=[1.0]", r"merge.weights has 1 entries, num_checkpoints is 3"),
    ("stage2.loss.mrl_dims=[64, -8]", r"stage2.loss.mrl_dims: Value error, MRL dims must be positive"),
    ("synth.generator.backend=gpt4", r"synth.generator.backend: Input should be 'transformers', 'openai'"),
    ("stage2.steps", r"override 'stage2.steps': expected key.sub=value"),
    ("stage2..steps=3", r"override 'stage2..steps=3': empty key"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("micro", [override])


def test_config_file_errors_name_the_file(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- stage2\n- steps\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(listing))}: top level must be a mapping"):
        load_config("micro", files=[listing])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("micro", files=[tmp_path / "missing.yaml"])


def test_mrl_dimensions_larger_than_the_model_are_refused(micro_cfg, shared_data, tmp_path):
    hidden = micro_cfg.model.micro.hidden_size
    with pytest.raises(ModelLoadError, match=f"model.embedding_dim {2 * hidden} is larger than the model's "
                                             f"hidden size {hidden}"):
        Embedder.load(micro_cfg.model.model_copy(update={"embedding_dim": 2 * hidden}), device="cpu")
    data = DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=16)
    loss = micro_cfg.stage2.loss.model_copy(update={"mrl_dims": [hidden // 2, 2 * hidden]})
    cfg = micro_cfg.stage2.model_copy(update={"data": [data], "steps": 2, "batch_size": 4, "loss": loss})
    with pytest.raises(ValueError, match=rf"loss.mrl_dims \[{2 * hidden}\] larger than the model's hidden size {hidden}"):
        train(cfg, micro_cfg.model, tmp_path / "out", progress=False)
    assert _nothing_trained(tmp_path / "out")


# ----------------------------------------------------------------------------- models

def test_a_missing_model_path_fails_the_cli_before_any_output(shared_data, tmp_path):
    data = shared_data / "triplets-en" / "snli_dev_triplets.jsonl"
    res = CliRunner().invoke(app, ["train", "--preset", "micro", "--out", str(tmp_path / "out"), "--data", str(data),
                                   f"model.backbone={tmp_path / 'no-such-model'}", "stage2.steps=2"])
    assert res.exit_code == 1 and "model path does not exist" in res.output and "Traceback" not in res.output
    assert _nothing_trained(tmp_path / "out")


def test_a_corrupt_gguf_is_refused_and_leaves_no_half_converted_model(tmp_path, monkeypatch):
    monkeypatch.setenv("Q3E_CACHE_DIR", str(tmp_path / "cache"))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file, renamed")
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(not_gguf))}: not a GGUF file"):
        resolve_backbone(ModelConfig(backbone=str(not_gguf)))
    cut = tmp_path / "cut.gguf"  # the right magic bytes, then garbage: a download cut short
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(cut))}: cannot read this GGUF file"):
        resolve_backbone(ModelConfig(backbone=str(cut)))
    assert not any((tmp_path / "cache" / "gguf").glob("*"))  # no folder that a later run would take as done


# ----------------------------------------------------------------------------- synthesis and filtering inputs

def test_a_bad_passage_stops_synthesis_before_its_output_folder_exists(micro_cfg, shared_data, tmp_path):
    from tasks.synthesis.run import synthesize

    passages = _jsonl(tmp_path / "passages.jsonl", ['{"_id": "p1", "text": "Paris is the capital of France."}',
                                                    '{"_id": "p2", "title": "Berlin"}'])
    cfg = micro_cfg.synth.model_copy(update={"passages": [str(passages)],
                                             "personas": str(shared_data / "personas" / "personahub-5k.txt")})
    with pytest.raises(DataError, match=rf"{re.escape(str(passages))}:2: missing or empty field 'text'"):
        synthesize(cfg, tmp_path / "synthetic", progress=False)
    assert not (tmp_path / "synthetic").exists()


def test_a_bad_synthetic_shard_stops_filtering_before_any_shard_is_written(tmp_path):
    from tasks.filter import filter_pairs

    pairs = tmp_path / "pairs"
    _jsonl(pairs / "shard-00000.jsonl", [json.dumps(GOOD)])
    bad = _jsonl(pairs / "shard-00001.jsonl", [json.dumps(GOOD), '{"query": "q", "response": ""}'])
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:2: missing or empty field 'response'"):
        filter_pairs(FilterConfig(), pairs, tmp_path / "filtered", embedder="micro", progress=False)
    out = tmp_path / "filtered"
    assert not list(out.glob("shard-*.jsonl")) and not (out / "report.json").exists()
