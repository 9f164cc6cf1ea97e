"""Ray workers SIGKILLed in the middle of their work: synthesis, filtering, evaluation encoding.

The kill is deterministic: the work reaches a kill point inside the Ray worker, which writes that
process's pid and waits; the test SIGKILLs exactly that pid, once. Ray replaces the worker and
runs the task again (the kill point lets the retry through), and the output is complete,
duplicate-free and the same as an uninterrupted run's."""

from __future__ import annotations

import filecmp
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.config import FilterConfig
from tasks.data import write_jsonl
from tasks.models import Embedder

pytestmark = pytest.mark.slow


class KillPoint:
    """Travels (pickled) into a Ray worker. The first `reach()` writes the worker's pid and waits to
    be killed; once the test has marked the kill, `reach()` returns at once. `passing()` only logs
    that the work went by in this process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def passing(self) -> None:
        with open(self.folder / "pids", "a") as f:
            f.write(f"{os.getpid()}\n")

    def reach(self) -> None:
        self.passing()
        if (self.folder / "killed").exists():
            return
        tmp = self.folder / "pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.folder / "pid")
        time.sleep(120)
        raise RuntimeError("kill point reached but nobody killed this worker")

    def pids(self) -> list[int]:
        return [int(x) for x in (self.folder / "pids").read_text().split()]


class Killer(threading.Thread):
    """SIGKILLs the process that reaches `kill`'s kill point, once; `snapshot()` runs just before."""

    def __init__(self, kill: KillPoint, snapshot=lambda: None, timeout: float = 300):
        super().__init__(daemon=True)
        self.kill, self.snapshot, self.timeout = kill, snapshot, timeout
        self.killed_pid: int | None = None
        self.snapshot_value = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        pid_file = self.kill.folder / "pid"
        while not pid_file.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        pid = int(pid_file.read_text())
        self.snapshot_value = self.snapshot()
        (self.kill.folder / "killed").touch()
        os.kill(pid, signal.SIGKILL)
        self.killed_pid = pid

    def __enter__(self) -> "Killer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.join(timeout=5)


def _kill_point(tmp_path: Path) -> KillPoint:
    folder = tmp_path / "kill"
    folder.mkdir()
    return KillPoint(folder)


def _assert_killed_once_and_retried(killer: Killer, kill: KillPoint) -> None:
    assert killer.killed_pid is not None, "the work never reached the kill point"
    pids = kill.pids()
    assert killer.killed_pid in pids and pids[-1] != killer.killed_pid  # a new worker took the work over
    assert killer.killed_pid != os.getpid()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jsonl"))


# ----------------------------------------------------------------------------- synthesis

class KillingGenerator:
    """The scripted LLM of tests/test_synthesize.py, with a kill point at the passage `marker`."""

    name = "scripted"

    def __init__(self, kill: KillPoint, marker: str):
        from tests.fakes import ScriptedGenerator

        self.inner = ScriptedGenerator()
        self.kill = kill
        self.marker = marker

    def generate(self, prompts, **kw):
        if any(self.marker in m["content"] for p in prompts for m in p):
            self.kill.reach()
        return self.inner.generate(prompts, **kw)


def test_synthesis_worker_killed_mid_shard_is_retried(ray_session, shared_data, tmp_path):
    from tests.configs import synth_cfg
    from tests.fakes import ScriptedGenerator
    from tasks.synthesis.plan import load_passages
    from tasks.synthesis.run import synthesize

    cfg = synth_cfg(shared_data, shared_data / "personas" / "personahub-5k.txt", workers=1, shard_size=2,
                    num_passages=8, kinds={"bitext": 1, "sts": 1, "classification": 1})
    passages = load_passages(cfg.passages, limit=8)
    reference = synthesize(cfg, tmp_path / "reference", generator_factory=ScriptedGenerator, progress=False)

    kill = _kill_point(tmp_path)
    factory = functools.partial(KillingGenerator, kill, passages[5].text[:40])  # shard 2 of 4
    with Killer(kill) as killer:
        res = synthesize(cfg, tmp_path / "killed", generator_factory=factory, progress=False)
    _assert_killed_once_and_retried(killer, kill)

    out = tmp_path / "killed"
    assert res.stats["run"]["shards_generated"] == 4 and len(res.shards) == 4
    records = [json.loads(x) for f in sorted(out.rglob("*.jsonl")) for x in f.read_text().splitlines()]
    ids = [r.get("meta", {}).get("passage_id") or r["passage_id"] for r in records]
    assert sorted(ids) == sorted(p.id for p in passages)  # every passage once: accepted or rejected
    names = _files(tmp_path / "reference")
    assert names == _files(out)
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "reference", out, names, shallow=False)
    assert not mismatch and not errors
    assert {k: v for k, v in res.stats.items() if k != "run"} == \
        {k: v for k, v in reference.stats.items() if k != "run"}


# ----------------------------------------------------------------------------- filtering

class KillingEncoder:
    """The filter's scoring model, with a kill point when it sees the text `marker`."""

    def __init__(self, kill: KillPoint, spec, marker: str):
        from tasks.models.specs import load_encoder

        self.inner = load_encoder(spec, device="cpu")
        self.kill = kill
        self.marker = marker

    def encode(self, texts, **kw):
        if self.marker in texts:
            self.kill.reach()
        else:
            self.kill.passing()
        return self.inner.encode(texts, **kw)


def _synthetic_shards(shared_data: Path, folder: Path) -> list[dict]:
    lines = (shared_data / "triplets-en" / "snli_dev_triplets.jsonl").read_text().splitlines()[:30]
    recs = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        recs.append({"query": row["anchor"], "response": row["positive"] if i % 3 else row["negative"],
                     "rejected_response": [], "instruction": "Retrieve semantically similar text",
                     "meta": {"task": "sts", "language": "English", "passage_id": f"snli:{i}"}})
    for s in range(3):
        write_jsonl(folder / f"shard-{s:05d}.jsonl", recs[10 * s: 10 * (s + 1)])
    return recs


def test_filter_worker_killed_mid_shard_is_retried(ray_session, micro_cfg, micro_embedder, shared_data, tmp_path):
    from tasks.filter import filter_pairs, score_pairs

    recs = _synthetic_shards(shared_data, tmp_path / "pairs")
    expected = score_pairs(micro_embedder, recs, batch_size=4)  # the uninterrupted scores, in this process
    threshold = float(np.median(expected))

    kill = _kill_point(tmp_path)
    factory = functools.partial(KillingEncoder, kill, micro_cfg.model, recs[14]["query"])  # shard 1 of 3
    cfg = FilterConfig(threshold=threshold, workers=1, batch_size=4)
    with Killer(kill) as killer:
        res = filter_pairs(cfg, tmp_path / "pairs", tmp_path / "killed", embedder=micro_cfg.model, progress=False,
                           encoder_factory=factory)
    _assert_killed_once_and_retried(killer, kill)

    out = tmp_path / "killed"
    assert _files(out) == [f"dropped/dropped-{i:05d}.jsonl" for i in range(3)] + \
        [f"shard-{i:05d}.jsonl" for i in range(3)]
    assert res.report["run"]["shards_scored"] == 3 and res.report["total"] == len(recs)
    kept = {json.loads(x)["meta"]["passage_id"]: json.loads(x) for f in out.glob("shard-*.jsonl")
            for x in f.read_text().splitlines()}
    dropped = {json.loads(x)["meta"]["passage_id"]: json.loads(x) for f in out.glob("dropped/*.jsonl")
               for x in f.read_text().splitlines()}
    assert len(kept) + len(dropped) == len(recs) and not kept.keys() & dropped.keys()  # each pair once
    for rec, score in zip(recs, expected):
        got = kept.get(rec["meta"]["passage_id"]) or dropped[rec["meta"]["passage_id"]]
        assert got["meta"]["filter_score"] == pytest.approx(float(score), abs=1e-4)
        assert (rec["meta"]["passage_id"] in kept) == (got["meta"]["filter_score"] > threshold)


# ----------------------------------------------------------------------------- evaluation

class KillingEmbedder(Embedder):
    """An Embedder whose `kill_at`-th encode call (in one process) reaches the kill point."""

    def encode(self, texts, **kw):
        self.encode_count = getattr(self, "encode_count", 0) + 1
        if self.encode_count == self.kill_at:
            self.kill.reach()
        else:
            self.kill.passing()
        return super().encode(texts, **kw)


def test_evaluation_worker_killed_mid_encoding_is_retried(ray_session, micro_cfg, shared_data, tmp_path):
    from tasks.config import EvalConfig
    from tasks.distributed import run_remote
    from tasks.evaluation.run import evaluate_model

    base = Embedder.load(micro_cfg.model, device="cpu")
    cfg = EvalConfig(task_dirs=[str(shared_data / "beir" / "nq-msmarco-hardneg")], max_queries=20,
                     max_corpus=300, batch_size=32)
    reference = evaluate_model(base, cfg, out=tmp_path / "reference.json", embedding_cache=False, show=False)

    kill = _kill_point(tmp_path)
    model = KillingEmbedder(base.backbone, base.tokenizer, cfg=base.cfg, source=base.source)
    model.kill, model.kill_at = kill, 2  # the first batch of texts is embedded and cached, the second is cut
    cache = tmp_path / "embedding-cache"

    def cached_files() -> dict[str, int]:
        return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    with Killer(kill, snapshot=cached_files) as killer:
        results, _ = run_remote(evaluate_model, model, cfg, out=tmp_path / "killed.json",
                                embedding_cache=str(cache), show=False, num_cpus=1)
    _assert_killed_once_and_retried(killer, kill)

    name = next(iter(reference))
    assert results[name]["main_score"] == pytest.approx(reference[name]["main_score"], abs=1e-6)
    record = json.loads((tmp_path / "killed.json").read_text())
    assert set(record["results"]) == set(reference)
    before, after = killer.snapshot_value, cached_files()
    assert len(before) == 1 and len(after) == 2  # queries and corpus, each embedded into the cache once
    assert all(after[f] == t for f, t in before.items())  # the retry reused what the killed worker cached
    assert not [f for f in after if Path(f).name.startswith(".")]  # no half-written cache file
    for f in after:
        assert np.isfinite(np.load(cache / f)).all()
