"""Readers: every format of the real data, and bad input refused with file, line and field."""

from __future__ import annotations

import json

import pytest

from tasks.config import DataSource
from tasks.data import DataError, load_beir, load_source, pairs_from_beir, read_pairs, write_jsonl


def test_reads_flagembedding_msswift_and_triplets(shared_data, tmp_path):
    fe, _ = read_pairs(shared_data / "flagembedding-examples" / "embedder__retrieval__nli.jsonl")
    assert len(fe) >= 10 and all(p.query and p.positive for p in fe)
    assert fe[1].instruction == "Retrieve semantically similar text."  # the record's own prompt
    tri, _ = read_pairs(shared_data / "triplets-en" / "snli_dev_triplets.jsonl", limit=5)
    assert len(tri) == 5 and len(tri[0].negatives) == 1
    out = write_jsonl(tmp_path / "p.jsonl", (p.to_record() for p in fe))
    back, _ = read_pairs(out)
    assert back == fe  # ms-swift round trip
    rec = json.loads(out.read_text().splitlines()[0])
    assert {"query", "response", "rejected_response"} <= rec.keys()


def test_reads_beir_folders(shared_data):
    beir = load_beir(shared_data / "beir" / "nq-msmarco-hardneg")
    assert len(beir.queries) == 20 and len(beir.corpus) == 1246
    pairs = pairs_from_beir(beir, instruction="find")
    assert len(pairs) >= 20 and pairs[0].instruction == "find"
    pairs2 = load_source(DataSource(path=str(shared_data / "beir" / "nq-msmarco-hardneg"), limit=5))
    assert len(pairs2) == 5


def _write(tmp_path, name, text: bytes | str):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "response": "d"', "malformed JSON"),
    ('{"response": "d"}', "missing field 'query'"),
    ('{"text": "d"}', "unknown record format"),
    ('{"query": "q", "pos": []}', "field 'pos' is empty"),
    ('{"query": "", "response": "d"}', "field 'query' is empty"),
    ('{"query": 3, "response": "d"}', "field 'query' must be a string"),
    ('{"query": "q", "response": "d", "rejected_response": "x"}', None),  # a single string is accepted
    ('{"query": "q", "response": "d", "rejected_response": [1]}', "field 'rejected_response'\\[0\\] must be a string"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    p = _write(tmp_path, "bad.jsonl", '{"query": "fine", "response": "ok"}\n' + line + "\n")
    if message is None:
        assert len(read_pairs(p)[0]) == 2
        return
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        read_pairs(p)
    pairs, report = read_pairs(p, skip_bad_lines=True)
    assert len(pairs) == 1 and len(report.skipped) == 1 and ":2:" in report.skipped[0]


def test_non_utf8_is_refused_with_the_line(tmp_path):
    p = _write(tmp_path, "latin.jsonl", b'{"query": "a", "response": "b"}\n{"query": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match="latin.jsonl:2: not valid UTF-8"):
        read_pairs(p)


def test_beir_errors(tmp_path):
    (tmp_path / "qrels").mkdir()
    _write(tmp_path, "corpus.jsonl", '{"_id": "d1", "text": "doc"}\n')
    _write(tmp_path, "queries.jsonl", '{"_id": "q1", "text": "query"}\n')
    with pytest.raises(DataError, match="missing qrels/test.tsv"):
        load_beir(tmp_path)
    _write(tmp_path, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(DataError, match="test.tsv:2: field 'corpus-id' 'd9' is not in corpus.jsonl"):
        load_beir(tmp_path)
    _write(tmp_path, "qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(DataError, match="test.tsv:2: field 'score' must be a number"):
        load_beir(tmp_path)
    _write(tmp_path, "corpus.jsonl", '{"_id": "d1", "text": "doc"}\n{"text": "no id"}\n')
    with pytest.raises(DataError, match="corpus.jsonl:2: missing field '_id'"):
        load_beir(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_pairs(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """Atomic writes go through mkstemp (0600) but land with the mode a plain open() would give."""
    import os

    from tasks.data import atomic_write_text

    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_models_checkpoints_and_merges_honour_the_umask(micro_cfg, shared_data, tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask: every file of a trained stage's output (its
    checkpoints, the final model with its sentence-transformers files) and of a merge lands with the
    umask's mode."""
    import os

    from tasks.config import DataSource
    from tasks.merge import slerp_merge
    from tasks.training import train

    cfg = micro_cfg.stage2.model_copy(update={
        "data": [DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=16)],
        "steps": 2, "batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 2})
    old = os.umask(umask)
    try:
        res = train(cfg, micro_cfg.model, tmp_path / "train", progress=False)
        merged = slerp_merge(res.checkpoints[-2:], tmp_path / "merged")
    finally:
        os.umask(old)
    files = [p for d in (tmp_path / "train", merged) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and len(files) > 10
    assert {p.stat().st_mode & 0o777 for p in files} == {mode}, \
        sorted((oct(p.stat().st_mode & 0o777), str(p)) for p in files if p.stat().st_mode & 0o777 != mode)
