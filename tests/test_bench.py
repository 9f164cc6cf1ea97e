"""The benchmark suite (bench/), each benchmark run for real at the smallest sizes its options
allow (the three that start Ray / Prefect are left out: minutes even when tiny). What is checked is
what a reader of docs/benchmarks.md relies on: the JSON record says what ran on which machine,
it holds every figure of the table the run printed, the rows are the sides and sizes asked for,
and every ratio, rate and verdict follows from the figures it reports. The figures themselves
are not judged: a run this small measures nothing."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import statistics

import pytest


# benchmark -> its options, at the smallest sizes (a flag is True)
RUNS = {
    "train": {"models": "micro", "batch": 1, "q-len": 8, "d-len": 8, "chunk": 1, "repeats": 1,
              "no-memory": True},
    "gradcache": {"models": "micro", "batches": "1", "chunk": 1, "q-len": 8, "d-len": 8, "repeats": 1},
    "encode": {"model": "micro", "texts": 1, "max-length": 8, "batch-size": 1, "repeats": 1,
               "variant-texts": 1},
    "scaling": {"batch": 1, "texts": 1, "repeats": 1, "no-memory": True},
    "rerank": {"model": "micro", "num-layers": 0, "pairs": 2, "train-batch": 2, "repeats": 1, "bf16": "yes",
               "preset": "micro", "steps": 2},
}


def close(reported: float, exact: float, decimals: int, rel: float = 0.0) -> bool:
    """`reported` is `exact` rounded to `decimals` places (give or take `rel` of it: the rounding
    of the figures `exact` was recomputed from)."""
    return abs(reported - exact) <= 0.5 * 10 ** -decimals + rel * abs(exact) + 1e-12


@pytest.fixture(scope="module")
def runs(module_tmp) -> dict[str, tuple[dict, str]]:
    """benchmark -> (its JSON record, what it printed), each run as `python -m bench NAME ...` runs
    it (`bench.__main__.main`), in this process: four more interpreters would each import torch
    again. The fresh processes a benchmark starts itself (peak memory) are still fresh processes."""
    from bench.__main__ import main

    out = module_tmp("bench")
    done = {}
    for name, options in RUNS.items():
        args = [a for k, v in options.items() for a in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main([name, "--out", str(out), *args]) == 0
        done[name] = (json.loads((out / f"{name}.json").read_text()), printed.getvalue())
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_the_record_says_what_ran_on_which_machine(runs, name):
    r, _ = runs[name]
    assert r["benchmark"] == name and r["quick"] is False
    asked = {k.replace("-", "_"): v for k, v in RUNS[name].items()}
    assert {k: r["options"][k] for k in asked} == asked
    m = r["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and m["ram_gib"] > 0 and m["torch"] and m["date"]
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    assert r["other_cpu"]["other_cores_busy_max"] >= r["other_cpu"]["other_cores_busy_mean"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_the_printed_tables_are_the_records_figures(runs, name):
    r, printed = runs[name]
    table = importlib.import_module(f"bench.{name}").render(r)
    assert table.count("\n| ") >= 2 and table in printed


@pytest.mark.slow
def test_train_rates_and_ratios_follow_from_the_step_times(runs):
    r, _ = runs["train"]
    m = r["models"]["micro"]
    assert list(m["sides"]) == ["ours", "ours+gc", "st-mnrl", "st-cmnrl", "ours-bf16", "st-mnrl-bf16"]
    a, peak, longest = m["arch"], r["matmul_peak"]["best_gflops"], max(m["q_len"], m["d_len"])
    n = a["params_nonembedding"]
    for real, padded, flops in zip(m["real_tokens_per_step"], m["padded_tokens_per_step"],
                                   m["model_flops_per_step"]):
        assert 0 < real <= padded <= 3 * m["batch"] * longest  # queries, positives, one negative each
        # the formula's bounds: 6N per padded token, plus an attention term at most that of the longest group
        assert 6 * n * padded < flops <= padded * (6 * n + 12 * a["layers"] * a["d_attn"] * longest)
    for side, s in m["sides"].items():
        (t,) = s["step_s"]
        assert s["step_s_median"] == t and len(s["losses"]) == 2, side  # the warm-up step and the measured one
        rel = 1e-4 / t  # the step time is rounded to 0.1 ms
        assert close(s["pairs_per_s"], m["batch"] / t, 3, rel), side
        assert close(s["tokens_per_s"], m["real_tokens_per_step"][0] / t, 1, rel), side
        assert close(s["model_gflops_per_s"], m["model_flops_per_step"][0] / t / 1e9, 2, rel), side
        assert close(s["fraction_of_matmul_peak"], s["model_gflops_per_s"] / peak, 4), side
    pps = {side: s["pairs_per_s"] for side, s in m["sides"].items()}
    assert m["ratios"] == {
        "ours / st-mnrl (throughput)": round(pps["ours"] / pps["st-mnrl"], 3),
        "ours+gc / st-cmnrl (throughput)": round(pps["ours+gc"] / pps["st-cmnrl"], 3),
        "ours+gc / ours (throughput)": round(pps["ours+gc"] / pps["ours"], 3),
        "ours-bf16 / st-mnrl-bf16 (throughput)": round(pps["ours-bf16"] / pps["st-mnrl-bf16"], 3),
        "ours-bf16 / ours (throughput)": round(pps["ours-bf16"] / pps["ours"], 3),
    }


@pytest.mark.slow
def test_gradcache_agrees_with_plain_and_its_ratios_follow_from_its_rows(runs):
    r, _ = runs["gradcache"]
    m = r["models"]["micro"]
    rows = [(x["batch"], x["mode"], x["chunk"]) for x in m["rows"]]
    assert rows == [(1, "plain", None), (1, "gradcache", 1)]
    for row in m["rows"]:
        t = row["step_s_median"]
        assert close(row["pairs_per_s"], row["batch"] / t, 3, rel=1e-4 / t)
        mem = row["memory"]
        # three figures each rounded to 0.1 MB: the difference of two of them is off by up to 0.15
        assert abs(mem["step_delta_mb"] - (mem["step_peak_mb"] - mem["rss_before_mb"])) <= 0.15 + 1e-9
        assert mem["process_peak_mb"] >= mem["step_peak_mb"] > 0
    plain, gc = m["rows"]
    assert m["ratios"] == {
        "batch 1: gradcache / plain throughput": round(gc["pairs_per_s"] / plain["pairs_per_s"], 3),
        "batch 1: gradcache / plain step peak RSS delta":
            round(gc["memory"]["step_delta_mb"] / max(plain["memory"]["step_delta_mb"], 1e-9), 3),
    }
    a = m["agreement"]
    assert a["loss_max_abs_diff"] == abs(a["loss_plain"] - a["loss_cached"]) < 1e-4
    assert a["grad_max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_encode_rates_ratio_and_variants_follow_from_the_times(runs):
    r, _ = runs["encode"]
    assert list(r["sides"]) == ["Embedder.encode", "SentenceTransformer.encode", "int8 (ours)"]
    for name, s in r["sides"].items():
        assert s["texts"] == 1 and s["median_s"] == s["runs_s"][0]
        assert close(s["median_s"], s["texts"] / s["texts_per_s"], 3, rel=1e-3), name
        assert close(s["tokens_per_s"] / s["texts_per_s"], s["tokens"] / s["texts"], 2, rel=1e-3), name
    ours, st = r["sides"]["Embedder.encode"], r["sides"]["SentenceTransformer.encode"]
    assert r["ratio_ours_over_st"] == round(ours["texts_per_s"] / st["texts_per_s"], 3)
    assert r["cosine_ours_vs_st"]["min"] > 0.999  # same weights, same tokens, same pooling
    assert set(r["variants"]) == {"int8", "bf16"}
    for name, v in r["variants"].items():
        assert close(v["speedup_vs_fp32"], v["texts_per_s"] / v["fp32_texts_per_s"], 3, rel=1e-3), name
        assert v["helpful"] == (v["speedup_vs_fp32"] > 1.2 and v["cosine_vs_fp32"]["min"] > 0.99), name
        assert 0.9 < v["cosine_vs_fp32"]["min"] <= v["cosine_vs_fp32"]["mean"] <= 1.0 + 1e-6, name


@pytest.mark.slow
def test_scaling_rows_are_1x_2x_4x_and_the_verdict_follows_from_them(runs):
    r, _ = runs["scaling"]
    assert list(r["kinds"]) == ["train", "encode", "filter"]
    for kind, k in r["kinds"].items():
        sizes = [x["size"] for x in k["rows"]]
        assert sizes == [1, 2, 4], kind  # --batch 1 / --texts 1
        for x in k["rows"]:
            assert x["median_s"] == x["runs_s"][0]
            assert close(x["per_item_ms"], 1000 * x["median_s"] / x["size"], 3)
        t1, t2, t4 = [x["median_s"] for x in k["rows"]]
        g = k["growth"]
        assert (g["t2x_over_t1x"], g["t4x_over_t1x"]) == (round(t2 / t1, 3), round(t4 / t1, 3)), kind
        assert g["exponent"] == round(math.log2(t4 / t1) / 2, 3), kind
        linear = abs(t2 / t1 / 2 - 1) <= 0.15 and abs(t4 / t1 / 4 - 1) <= 0.15
        verdict = "linear" if linear else "sub-linear" if math.log2(t4 / t1) < 2 else "super-linear"
        assert g["verdict"] == verdict, kind
        # the least-squares line through the three points
        mx, my = sum(sizes) / 3, (t1 + t2 + t4) / 3
        slope = sum((s - mx) * (t - my) for s, t in zip(sizes, (t1, t2, t4)))
        slope /= sum((s - mx) ** 2 for s in sizes)
        assert close(g["fit_per_item_ms"], 1000 * slope, 4), kind
        assert close(g["fit_fixed_s"], my - slope * mx, 4), kind


@pytest.mark.slow
def test_rerank_sides_agree_and_the_ratios_follow_from_the_times(runs):
    r, _ = runs["rerank"]
    assert list(r["score"]) == ["shared prefix (ours)", "full pass (ours)", "CrossEncoder.predict"]
    assert list(r["train"]) == ["shared prefix (ours)", "full pass (ours)"]
    for name, s in r["score"].items():
        assert s["pairs"] == 2 and s["median_s"] == s["runs_s"][0]
        assert close(s["pairs_per_s"], 2 / s["median_s"], 2, rel=1e-3 / s["median_s"]), name  # median_s is to 1 ms
    pps = {n: s["pairs_per_s"] for n, s in r["score"].items()}
    train = {n: s["median_s"] for n, s in r["train"].items()}
    assert r["ratios"] == {
        "score: shared / full (throughput)": round(pps["shared prefix (ours)"] / pps["full pass (ours)"], 3),
        "score: shared / CrossEncoder (throughput)": round(pps["shared prefix (ours)"] / pps["CrossEncoder.predict"], 3),
        "train: full / shared (step time)": round(train["full pass (ours)"] / train["shared prefix (ours)"], 3)}
    # the same weights: the shared prefix and the exported cross-encoder score what the full pass does
    assert max(r["agreement"]["score_max_abs_diff_vs_full"].values()) < 1e-5
    assert r["agreement"]["train_grad_rel_diff"] < 1e-5
    steps = r["preset_step"]
    assert steps["preset"] == "micro"
    for stage, sides in (("reranker", ["shared prefix, SDPA", "full pass, SDPA", "shared prefix, eager",
                                       "shared prefix, eager, frozen embeddings"]),
                         ("stage2", ["embeddings trained", "frozen embeddings"])):
        p = steps[stage]
        assert p["stage"] == stage and list(p["step_s"]) == sides and p["reference"] == sides[0], stage
        assert all(len(ts) == 2 for ts in p["step_s"].values())
        # the same weights and the same first batch: the same loss, whatever the attention or freezing
        assert max(p["first_loss_diff"].values()) < 1e-4, stage
        assert p["median_s"] == {n: round(statistics.median(ts[1:]), 3) for n, ts in p["step_s"].items()}
        assert p["speedup"] == {n: round(p["median_s"][sides[0]] / p["median_s"][n], 3) for n in sides[1:]}
        # freezing takes exactly the embedding matrix out of training (tied to the LM head: one tensor)
        for n in sides:
            frozen = p["sides"][n]["freeze_embeddings"]
            assert p["trainable_weights"][n] == p["trainable_weights"][sides[0]] - frozen * p["embedding_weights"], n
        assert p["embedding_weights"] > 0 and any(p["sides"][n]["freeze_embeddings"] for n in sides)
    b = r["bf16"]
    assert b["score_max_abs_diff"] < 2e-2
    assert b["ratios"] == {k: round(b[f"{k}_median_s"]["full pass (ours)"] / b[f"{k}_median_s"]["shared prefix (ours)"], 3)
                           for k in ("score", "train")}


def test_help_lists_every_benchmark_with_what_it_measures(monkeypatch):
    from bench.__main__ import ORDER, SUMMARY, build_parser

    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps at hyphens too
    text = " ".join(build_parser().format_help().split())
    assert set(ORDER) == set(SUMMARY) == {"train", "gradcache", "encode", "synthesis", "orchestration",
                                          "scaling", "ray_train", "rerank"}
    for name in ("all", *ORDER):
        assert f" {name} " in text, name
    for name in ORDER:
        assert " ".join(SUMMARY[name].split()) in text, name
