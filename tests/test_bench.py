"""Smoke test of the benchmark suite: `python -m bench all --quick` (without the two benchmarks that
start Ray / Prefect and take minutes even when tiny) into a temporary folder; every result file
has the machine description, the load and positive figures. Numbers are not checked: a quick
run measures nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST = ("train", "gradcache", "encode", "scaling")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # One torch thread: on a shared 2-core machine a second OpenMP thread that loses its core makes
    # tiny ops ~50x slower (it is a smoke run; real runs keep torch's default).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--skip", "synthesis,orchestration",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return out


def load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"{name}.json not written"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", FAST)
def test_every_result_describes_the_machine_and_the_load(results, name):
    r = load(results, name)
    assert r["benchmark"] == name and r["quick"] is True
    m = r["machine"]
    assert m["cpu_model"] and positive(m["cores"]) and positive(m["ram_gib"]) and m["torch"] and m["date"]
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    assert "other_cores_busy_mean" in r["other_cpu"]


def test_train_compares_ours_with_sentence_transformers(results):
    r = load(results, "train")
    assert positive(r["matmul_peak"]["best_gflops"])
    m = r["models"]["micro"]
    assert set(m["sides"]) == {"ours", "ours+gc", "st-mnrl", "st-cmnrl"}
    for side in m["sides"].values():
        for key in ("step_s_median", "pairs_per_s", "tokens_per_s", "model_gflops_per_s", "fraction_of_matmul_peak"):
            assert positive(side[key]), key
    assert all(positive(v) for v in m["ratios"].values())
    assert positive(m["arch"]["params_nonembedding"])


def test_gradcache_reports_memory_and_agreement(results):
    m = load(results, "gradcache")["models"]["micro"]
    assert {r["mode"] for r in m["rows"]} == {"plain", "gradcache"}
    for row in m["rows"]:
        assert positive(row["pairs_per_s"]) and positive(row["tokens_per_s"])
        mem = row["memory"]
        assert positive(mem["process_peak_mb"]) and positive(mem["step_peak_mb"]) and positive(mem["rss_before_mb"])
    a = m["agreement"]
    assert a["loss_max_abs_diff"] < 1e-4 and a["grad_max_abs_diff"] < 1e-3


def test_encode_compares_ours_with_sentence_transformers(results):
    r = load(results, "encode")
    assert {"Embedder.encode", "SentenceTransformer.encode"} <= set(r["sides"])
    assert all(positive(s["texts_per_s"]) and positive(s["tokens_per_s"]) for s in r["sides"].values())
    assert positive(r["ratio_ours_over_st"])
    assert r["cosine_ours_vs_st"]["min"] > 0.999  # same weights, same tokens, same pooling
    for v in r["variants"].values():
        assert positive(v["texts_per_s"]) and positive(v["speedup_vs_fp32"]) and isinstance(v["helpful"], bool)


def test_scaling_has_three_sizes_and_a_verdict(results):
    r = load(results, "scaling")
    for kind in ("train", "encode", "filter"):
        k = r["kinds"][kind]
        assert [x["size"] for x in k["rows"]][1:] == [2 * k["rows"][0]["size"], 4 * k["rows"][0]["size"]]
        assert all(positive(x["median_s"]) for x in k["rows"])
        assert k["growth"]["verdict"] in ("linear", "sub-linear", "super-linear")


def test_help_lists_every_benchmark():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0
    for name in ("all", "train", "gradcache", "encode", "synthesis", "orchestration", "scaling"):
        assert name in proc.stdout
