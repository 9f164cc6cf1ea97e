"""Resource limits: training data larger than memory streams from disk, texts longer than the
model's limits are cut with a warning that counts them, and a disk too small for a write is
reported before anything is written (on a real 24 MiB filesystem where the OS allows one)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import DataSource, load_config
from tasks.data import PairFile, load_sources, read_pairs
from tasks.training import list_checkpoints, train

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- streaming

def _pairs_file(path: Path, n: int) -> Path:
    """n FlagEmbedding records of ~600 bytes, each with two positives (2n pairs)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"query": f"query {i} " + "q" * 90, "pos": [f"first {i} " + "p" * 200,
                                                                          f"second {i} " + "p" * 200],
                                "neg": [f"negative {i} " + "n" * 100]}) + "\n")
    return path


def _retained_and_peak(load, *where: str) -> tuple[object, int, int]:
    """(result, bytes it holds, peak bytes while loading), as Python's allocator saw them.

    The bytes held count only blocks allocated by code in the folders `where` names, so a thread
    another test left running (Ray's, Prefect's) cannot add its own blocks to the figure; the peak
    is the whole process's."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = load()
    gc.collect()
    peak = tracemalloc.get_traced_memory()[1]
    held = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f"*/{w}/*") for w in where])
    tracemalloc.stop()
    return result, sum(t.size for t in held.traces), peak - base


def test_the_pair_loader_holds_offsets_not_texts(tmp_path):
    small = _pairs_file(tmp_path / "small.jsonl", 2_000)
    big = _pairs_file(tmp_path / "big.jsonl", 8_000)  # ~5 MB: 4x the lines

    lazy_small, held_small, peak_small = _retained_and_peak(lambda: load_sources([DataSource(path=str(small))]),
                                                          "tasks/data")
    lazy_big, held_big, peak_big = _retained_and_peak(lambda: load_sources([DataSource(path=str(big))]), "tasks/data")
    assert len(lazy_small) == 4_000 and len(lazy_big) == 16_000
    per_pair = (held_big - held_small) / 12_000
    assert per_pair < 24, per_pair  # 8-byte offset + 4-byte slot (+ array over-allocation)
    assert big.stat().st_size / 16_000 > 250  # ... for pairs of ~300 bytes of text each
    # reading holds one line at a time: the peak does not grow with the file beyond the index
    assert peak_big - peak_small < 24 * 12_000 + 256 * 1024, (peak_small, peak_big)

    # the same measurement on the in-memory reader: it does see texts held (the check can fail);
    # its strings are allocated by the json decoder, called from tasks/data/
    eager, held_eager, _ = _retained_and_peak(lambda: read_pairs(small)[0], "tasks/data", "json")
    assert held_eager / 4_000 > 10 * max(per_pair, 1)
    assert list(lazy_small) == eager and lazy_small[3999] == eager[3999]


def test_streamed_training_data_gives_the_same_run_as_data_in_memory(micro_cfg, shared_data, tmp_path):
    """The trainer's seeded batch order indexes the streamed pairs exactly like a list."""
    source = DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=40)
    cfg = micro_cfg.stage2.model_copy(update={"data": [source], "steps": 2, "batch_size": 8, "hard_negatives": 1,
                                              "checkpoint_every": 2})
    streamed = load_sources(cfg.data)
    assert isinstance(streamed.parts[0], PairFile)
    a = train(cfg, micro_cfg.model, tmp_path / "streamed", progress=False)  # loads cfg.data itself
    b = train(cfg, micro_cfg.model, tmp_path / "in-memory", pairs=list(streamed), progress=False)
    wa, wb = load_file(str(a.final / "model.safetensors")), load_file(str(b.final / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


# ----------------------------------------------------------------------------- sequence lengths

LONG = "word " * 300


def test_long_texts_are_truncated_with_a_warning_that_counts_them(micro_cfg, caplog):
    from tasks.models import Embedder, Reranker

    model = Embedder.load(micro_cfg.model, device="cpu")  # its own truncation counter
    with caplog.at_level(logging.WARNING, logger="tasks.models"):
        ids = model.token_ids([LONG, "short text", LONG], max_length=16)
    assert [len(x) for x in ids][::2] == [16, 16] and len(ids[1]) < 16 and all(x[-1] == model.end_id for x in ids)
    assert "2 of 3 texts were longer than 16 tokens and were truncated (2 so far); raise " \
           "model.max_query_length / model.max_doc_length" in caplog.text

    # a long run warns when the count has doubled, not at every batch
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.models"):
        for _ in range(9):
            model.encode([LONG], max_length=16)
    assert [r.getMessage().split("(")[1].split(" so far")[0] for r in caplog.records] == ["4", "8"]
    assert model.truncation.count == 11

    reranker = Reranker.load(micro_cfg.model, device="cpu")
    with caplog.at_level(logging.WARNING, logger="tasks.models"):
        ids = reranker.token_ids(["query", "query"], [LONG, "a short document"])
    assert len(ids[0]) == micro_cfg.model.max_rerank_length and len(ids[1]) < micro_cfg.model.max_rerank_length
    assert ids[0][-len(reranker.suffix_ids):] == reranker.suffix_ids  # the template survives the cut
    assert "1 of 2 texts were longer than" in caplog.text and "raise model.max_rerank_length" in caplog.text


# ----------------------------------------------------------------------------- disk space

def fill_a_small_disk(folder: str, data: str) -> dict:
    """Run with `folder` on a 24 MiB filesystem: a small write, a 20 MiB shard, a training run
    whose first checkpoint (~13 MiB of weights) does not fit. Returns what happened."""
    from tasks.data import write_jsonl
    from tasks.diskspace import DiskSpaceError

    folder = Path(folder)
    out: dict = {}
    write_jsonl(folder / "small.jsonl", [{"query": "q", "response": "r"}])
    try:
        write_jsonl(folder / "shard-00000.jsonl", [{"query": "q" * 1000, "response": "r"}] * 20_000)
    except DiskSpaceError as e:
        out["shard_error"] = str(e)
    cfg = load_config("micro")
    stage = cfg.stage2.model_copy(update={"data": [DataSource(path=data, limit=16)], "steps": 4, "batch_size": 4,
                                          "checkpoint_every": 2, "hard_negatives": 1})
    try:
        train(stage, cfg.model, folder / "train", progress=False)
    except DiskSpaceError as e:
        out["checkpoint_error"] = str(e)
    out["disk_total"] = shutil.disk_usage(folder).total
    out["checkpoints"] = [c.name for c in list_checkpoints(folder / "train")]
    out["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return out


def _on_a_24mib_tmpfs(folder: Path, data: Path) -> dict | None:
    """`fill_a_small_disk` in a child process with its own mount namespace holding a 24 MiB tmpfs
    at `folder` (unshare -rm: no privilege needed where user namespaces are allowed); None where
    the OS refuses."""
    if shutil.which("unshare") is None:
        return None
    code = ("import json, sys; from tests.reliability.test_resource_limits import fill_a_small_disk; "
            "print('RESULT ' + json.dumps(fill_a_small_disk(sys.argv[1], sys.argv[2])))")
    script = f'mount -t tmpfs -o size=24m q3e-test "$1" && exec "$2" -c "{code}" "$1" "$3"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), sys.executable, str(data)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("mount" in proc.stderr or "unshare" in proc.stderr) and "RESULT" not in proc.stdout:
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_writes_that_do_not_fit_fail_before_writing(shared_data, tmp_path, monkeypatch):
    folder = tmp_path / "small-disk"
    folder.mkdir()
    data = shared_data / "triplets-en" / "snli_dev_triplets.jsonl"
    result = _on_a_24mib_tmpfs(folder, data)
    if result is None:  # no mount namespaces here: the same run, told the disk has 24 MiB free
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr("tasks.diskspace.shutil.disk_usage",
                            lambda p: usage._replace(free=24 * 2**20) if str(p).startswith(str(folder)) else usage)
        result = fill_a_small_disk(str(folder), str(data))
    else:
        assert result["disk_total"] == 24 * 2**20  # it ran on the tmpfs,
        assert not any(folder.iterdir())  # which was private to the child: nothing leaked here

    assert "shard-00000.jsonl: not enough disk space for the file: needs 19." in result["shard_error"]
    assert "24.0 MiB free on the filesystem of" in result["shard_error"]
    assert "not enough disk space for saving the model: needs 12." in result["checkpoint_error"]
    assert result["checkpoints"] == []  # the cut checkpoint is not taken for one
    assert "small.jsonl" in result["files"] and "train/metrics.jsonl" in result["files"]
    assert not [f for f in result["files"] if f.startswith("shard-") or f.endswith((".safetensors", ".tmp"))]
