"""Property-based fuzzing of the readers and the config parser: whatever the input, the outcome is
either parsed data or the project's own error (DataError naming the file, and the line where one
line is at fault; ConfigError naming the key), never another exception.

Derandomized and database-free, so a run is the same everywhere; the example counts keep the file
at a few seconds."""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tasks.config import ConfigError, PipelineConfig, flatten, load_config
from tasks.data import DataError, PairFile, load_beir, read_pairs

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIELDS = ["query", "response", "rejected_response", "pos", "neg", "anchor", "positive", "negative",
          "instruction", "prompt", "symmetric", "meta", "_id", "text", "title"]
# JSON strings may hold what no file text can: lone surrogates, written as \ud800 escapes
json_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=10)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | json_text, max_size=5)
extremes = st.sampled_from(['{"query": ' + "9" * 5000 + "}", "[" * 5000, '{"query": 1e999, "response": "r"}',
                            '"\\ud800"', "\ufeff{}", "{}\x00"])
lines = st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40), extremes)


def _file(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _assert_names_the_place(err: DataError, path: Path) -> None:
    # "<file>:<line>: <reason>", or "<file>: <reason>" for what concerns the whole file
    assert re.match(rf"{re.escape(str(path))}(:\d+)?: \S", str(err)), str(err)


@FUZZ
@given(data=st.binary(max_size=300) | st.lists(lines, max_size=6).map(lambda xs: "\n".join(xs).encode()))
def test_pair_reader_parses_or_names_file_and_line(data):
    with tempfile.TemporaryDirectory() as d:
        path = _file(d, "pairs.jsonl", data)
        try:
            pairs, report = read_pairs(path)
        except DataError as e:
            _assert_names_the_place(e, path)
            assert re.match(rf"{re.escape(str(path))}:\d+: ", str(e)), str(e)  # a line is always at fault here
            return
        for p in pairs:
            for text in (p.query, p.positive, *p.negatives):
                assert isinstance(text, str) and text.strip()
                text.encode("utf-8")
        # skipping never fails, and keeps exactly what the strict read accepted
        assert read_pairs(path, skip_bad_lines=True)[0] == pairs


@FUZZ
@given(data=st.lists(lines, max_size=8).map(lambda xs: "\n".join(xs).encode()), limit=st.none() | st.integers(1, 5))
def test_streamed_pairs_equal_the_pairs_read_in_order(data, limit):
    """PairFile (offsets + re-parsing on access) gives the same pairs, by index and by iteration,
    as reading the file top to bottom; with skip_bad_lines it never raises."""
    with tempfile.TemporaryDirectory() as d:
        path = _file(d, "pairs.jsonl", data)
        lazy = PairFile(path, instruction="find it", limit=limit, skip_bad_lines=True)
        eager, _ = read_pairs(path, instruction="find it", limit=limit, skip_bad_lines=True)
        assert len(lazy) == len(eager) and list(lazy) == eager
        assert [lazy[i] for i in reversed(range(len(lazy)))] == eager[::-1]
        if eager:
            assert lazy[-1] == eager[-1] and lazy[1:] == eager[1:]
        with pytest.raises(IndexError):
            lazy[len(eager)]


beir_line = st.one_of(
    st.builds(lambda i, t: json.dumps({"_id": i, "text": t}), st.sampled_from(["d1", "d2", "q1", 3, None, "", [1]]),
              json_text),
    lines)
qrels_line = st.one_of(
    st.builds(lambda q, c, s: f"{q}\t{c}\t{s}", st.sampled_from(["q1", "q2", ""]), st.sampled_from(["d1", "d2", "x"]),
              st.sampled_from(["1", "0", "2.5", "-1", "inf", "nan", "1e400", "x", "1\t2"])),
    st.text(max_size=20))
# mostly well-formed folders, so that the fuzzed lines reach every check (qrels are read last)
VALID_CORPUS = ['{"_id": "d1", "text": "Paris"}', '{"_id": "d2", "title": "B", "text": "Berlin"}']
VALID_QUERIES = ['{"_id": "q1", "text": "capital"}']


@FUZZ
@given(corpus=st.lists(beir_line, max_size=3), queries=st.lists(beir_line, max_size=2),
       qrels=st.lists(qrels_line, min_size=1, max_size=4), garbage=st.binary(max_size=20), where=st.integers(0, 3),
       skip=st.booleans())
def test_beir_reader_parses_or_names_file_and_line(corpus, queries, qrels, garbage, where, skip):
    with tempfile.TemporaryDirectory() as d:
        files = {"corpus.jsonl": "\n".join(VALID_CORPUS + corpus).encode(),
                 "queries.jsonl": "\n".join(VALID_QUERIES + queries).encode(),
                 "qrels/test.tsv": ("query-id\tcorpus-id\tscore\n" + "\n".join(qrels)).encode()}
        if where < 3:  # arbitrary bytes appended to one of the files
            name = sorted(files)[where]
            files[name] += b"\n" + garbage
        for name, data in files.items():
            _file(d, name, data)
        try:
            beir = load_beir(d, skip_bad_lines=skip)
        except DataError as e:
            assert any(re.match(rf"{re.escape(str(Path(d) / n))}(:\d+)?: \S", str(e)) for n in files), str(e)
            return
        assert beir.qrels and all(q in beir.queries and set(j) <= set(beir.corpus) for q, j in beir.qrels.items())


@FUZZ
@given(data=st.binary(max_size=200) | st.lists(st.text(max_size=30), max_size=5).map(lambda xs: "\n".join(xs).encode()),
       suffix=st.sampled_from([".tsv", ".jsonl"]))
def test_sts_and_pair_classification_reader_parses_or_names_the_file(data, suffix):
    from tasks.evaluation.local_tasks import SCORE_FIELDS, read_pairs_file

    with tempfile.TemporaryDirectory() as d:
        path = _file(d, "pairs" + suffix, data)
        try:
            rows = read_pairs_file(path, SCORE_FIELDS, "score")
        except DataError as e:
            _assert_names_the_place(e, path)
            return
        assert all(isinstance(s1, str) and s1.strip() and s2.strip() for s1, s2, _, _ in rows)


# ----------------------------------------------------------------------------- configuration

KEYS = sorted(flatten(load_config("micro").model_dump(mode="json")))
key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0]),
                st.text(string.ascii_lowercase + "._", min_size=1, max_size=12))
value = st.one_of(st.sampled_from(["-1", "0", "1.5", "true", "null", "[]", "{}", "[1, -2]", "{a: 1}", "1e400", "x",
                                   "'1'", "[[1]]", "2026-01-01", "!!binary aGk=", "{path: x, limt: 1}", ": :"]),
                  st.text(max_size=10))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", key, value), st.text(max_size=12)), max_size=4)


@FUZZ
@given(overrides=overrides)
def test_config_overrides_give_a_valid_config_or_a_config_error(overrides):
    try:
        cfg = load_config("micro", overrides)
    except ConfigError as e:
        text = str(e)
        assert text.startswith(("invalid configuration", "override ")), text
        if text.startswith("invalid configuration"):  # every complaint line names a key
            assert all(re.match(r"  \S+: ", line) for line in text.splitlines()[1:]), text
        return
    assert isinstance(cfg, PipelineConfig)
    cfg.digest()  # a valid config is also serialisable (run records, cache keys)
    load_config("micro", [f"{k}={json.dumps(v)}" for k, v in cfg.flat().items() if v is not None and v != {}])


@FUZZ
@given(doc=st.one_of(st.text(max_size=60), st.dictionaries(st.sampled_from(KEYS + ["stage2", "model", "x"]),
                                                             value, max_size=3).map(json.dumps)))
def test_config_files_give_a_valid_config_or_a_config_error(doc):
    with tempfile.TemporaryDirectory() as d:
        path = _file(d, "extra.yaml", doc.encode())
        try:
            load_config("micro", files=[path])
        except ConfigError as e:
            assert str(path) in str(e), str(e)
