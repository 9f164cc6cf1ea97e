"""`q3e report`: Markdown from a run's summary.json (tasks/report.py). Pure functions over a summary
dict shaped like flows/pipeline.py `_summarise` writes it; one test goes through the pipeline's own
`_summarise` / `_log_final` into a real MLflow SQLite store and back out through the CLI."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
from typer.testing import CliRunner

from tasks import report

from tests.summaries import COMMIT, NQ, STS, make_summary, table_rows


def test_results_table_has_the_models_in_order_and_the_scores():
    md = report.run_report(make_summary())
    rows = table_rows(md, "| model |")
    assert rows[0] == ["model", NQ, STS, "mean"]
    assert [r[0] for r in rows[1:]] == ["backbone", "stage1", "stage2", "merged (final)",
                                        "reranker (top-k of merged)"]
    assert rows[1] == ["backbone", "0.025", "0.083", "0.054"]
    assert rows[4] == ["merged (final)", "0.171", "0.264", "0.218"]
    assert rows[5] == ["reranker (top-k of merged)", "0.301", "–", "–"]  # only what it reranked


def test_header_names_commit_config_and_the_command():
    md = report.run_report(make_summary())
    assert "`a1b2c3d4e5f60718293a4b5c6d7e8f90`" in md and "ablation `full`" in md
    assert f"commit `{COMMIT[:12]}`" in md and "config `cfg0000000000000`" in md and "2026-11-26 14:03 UTC" in md
    assert f"`git checkout {COMMIT} && q3e run --preset smol stage2.seed=0 reranker.enabled=true`" in md
    assert "Warning" not in md
    assert "uncommitted changes" in report.run_report(make_summary(commit=COMMIT + "-dirty"))


def test_checks_fail_a_stage_below_its_input_and_pass_otherwise():
    summary = make_summary()
    checks = {c["name"]: c for c in report.stage_checks(summary["scores"], "merged")}
    assert not checks[f"stage1_vs_backbone/{STS}"]["passed"]          # 0.078 < 0.083
    assert checks[f"stage1_vs_backbone/{NQ}"]["passed"]
    assert checks["stage1_vs_backbone/mean"]["passed"]                # 0.0815 >= 0.054
    assert checks["stage2_vs_stage1/mean"]["passed"]
    assert not checks["merged_vs_stage2/mean"]["passed"]              # 0.2175 < 0.238
    assert checks[f"reranker_vs_merged/{NQ}"]["passed"] and checks["reranker_vs_merged/mean"]["passed"]
    assert f"reranker_vs_merged/{STS}" not in checks                   # STS is not reranked
    assert summary["checks"] == list(checks.values())

    md = report.run_report(summary)
    assert f"- **FAIL**: stage1 ≥ backbone on {STS}: 0.078 vs 0.083" in md
    assert f"- pass: stage2 ≥ stage1 on {NQ}: 0.192 vs 0.085" in md
    assert "- **FAIL**: merged ≥ stage2 on mean: 0.218 vs 0.238" in md


def test_checks_skip_a_missing_stage_and_need_the_reranker_strictly_better():
    scores = {"backbone": {NQ: 0.1}, "stage2": {NQ: 0.1}, "reranker": {NQ: 0.1, f"{NQ}/rerank": 0.1}}
    checks = {c["name"]: c["passed"] for c in report.stage_checks(scores, "stage2")}
    assert checks == {f"stage2_vs_backbone/{NQ}": True, "stage2_vs_backbone/mean": True,
                      f"reranker_vs_stage2/{NQ}": False, "reranker_vs_stage2/mean": False}
    close = report.stage_checks({"backbone": {NQ: 0.1004}, "stage1": {NQ: 0.1001}}, "stage1")
    assert f"- **FAIL**: stage1 ≥ backbone on {NQ}: 0.1001 vs 0.1004" in report.checks_markdown(close)


def test_a_merge_below_stage2_is_explained_by_how_close_its_checkpoints_are():
    s = make_summary()  # merged is 0.021 / 0.020 below stage 2: both checks fail
    assert report.merge_note(s, report.stage_checks(s["scores"], "merged")) is None  # no merge record: silent
    s["merge"] = {"checkpoints": ["step-000130", "step-000140", "step-000150"], "relative_spread": 0.0042}
    md = report.run_report(s)
    assert ("Why merged < stage2 on nq-msmarco-hardneg, stsb-en-traindev (by at most 0.0210): it slerps "
            "step-000130, step-000140, step-000150, which are 0.42 % apart") in md
    s["scores"]["merged"] = dict(s["scores"]["stage2"])  # no failing merge check: no note
    assert "Why merged" not in report.run_report(s)


def test_synthesis_and_wall_time_sections():
    md = report.run_report(make_summary())
    assert "Accepted 4 of 16 synthetic pairs (25.0%)" in md and "Stage 1 trained on 4 pairs." in md
    assert table_rows(md, "| kind |")[1:] == [["bitext", "1", "4", "25.0%"], ["retrieval", "3", "12", "25.0%"]]
    assert table_rows(md, "| language |")[1:] == [["English", "3", "75.0%"], ["Chinese", "1", "25.0%"]]
    stages = table_rows(md, "| stage |")
    assert stages[1] == ["synthesis", "yes", "10.0", "0.0"] and stages[3] == ["filter", "", "30.0", "27.0"]
    assert stages[-1] == ["**total**", "", "300.0", "162.0"]

    no_synth = make_summary()
    no_synth["synthesis"] = None
    assert "### Synthesis" not in report.run_report(no_synth)


def test_the_synthesis_section_says_what_the_filter_kept_and_whether_its_scorer_separates_pairs():
    s = make_summary()
    assert "Filter:" not in report.run_report(s)  # no filter in the run
    s["filter"] = {"embedder": "runs/stage1/final", "threshold": 0.7, "total": 305, "kept": 304,
                   "kept_fraction": 0.9967, "mismatched": {"total": 305, "kept_fraction": 0.9836},
                   "warning": "the scorer runs/stage1/final passes 98 % of mismatched pairs"}
    md = report.run_report(s)
    assert ("Filter: cos > 0.7 scored by `runs/stage1/final` kept 304 of 305 pairs (99.7%); of mismatched "
            "pairs (a query with another pair's document) 98.4% would pass.") in md
    assert "**Warning**: the scorer runs/stage1/final passes 98 % of mismatched pairs" in md
    del s["filter"]["warning"], s["filter"]["mismatched"]  # an older report: no mismatched pairs
    assert "kept 304 of 305 pairs (99.7%).\n" in report.run_report(s)


def test_seeds_table_gives_mean_and_std_over_runs():
    runs = [make_summary(f"run{i}", seed=i, shift=d) for i, d in enumerate([0.0, 0.01, 0.05])]
    stats = report.seed_statistics(runs)
    merged_nq = [0.171, 0.181, 0.221]
    assert stats["merged"][NQ] == pytest.approx((statistics.fmean(merged_nq), statistics.stdev(merged_nq), 3))
    assert stats["backbone"][STS] == pytest.approx((0.083, 0.0, 3))
    assert stats["reranker"][NQ][0] == pytest.approx(0.301 + 0.02)

    md = report.report_seeds(runs)
    rows = {r[0]: r[1:] for r in table_rows(md, "| model |")}
    assert rows["merged (final)"][0] == f"{statistics.fmean(merged_nq):.3f} ± {statistics.stdev(merged_nq):.3f}"
    assert rows["merged (final)"][0] == "0.191 ± 0.026"
    runs_table = table_rows(md, "| run |")
    assert [r[0] for r in runs_table[1:]] == ["`run0`", "`run1`", "`run2`"]
    assert [r[2] for r in runs_table[1:]] == ["stage2.seed=0", "stage2.seed=1", "stage2.seed=2"]
    assert all(r[1] == f"`{COMMIT[:12]}`" for r in runs_table[1:])
    assert "q3e run --preset smol stage2.seed=2" in md
    assert f"- pass: reranker > merged on {NQ}: 0.321 vs 0.191" in md           # checks on the means
    assert f"- pass: merged ≥ stage2 on {STS}: 0.284 vs 0.284" in md             # equal up to float noise


def test_seeds_refuse_mixed_commits_configs_and_duplicates():
    a, b = make_summary("run0"), make_summary("run1", seed=1, commit="f" * 40)
    with pytest.raises(report.ReportError, match="different commits.*run0.*run1"):
        report.report_seeds([a, b])
    c = make_summary("run1", seed=1)
    c["config_hash_without_seeds"] = "ffffffffffffffff"
    with pytest.raises(report.ReportError, match=r"different configurations \(apart from seeds\)"):
        report.report_seeds([a, c])
    with pytest.raises(report.ReportError, match="given twice"):
        report.report_seeds([a, copy.deepcopy(a)])
    old = make_summary("run1", seed=1)
    del old["config_hash_without_seeds"]
    with pytest.raises(report.ReportError, match="run1: summary.json has no 'config_hash_without_seeds'"):
        report.report_seeds([a, old])


def test_config_hash_without_seeds_ignores_only_seeds():
    flat = {"seed": 0, "stage2.seed": 0, "stage2.lr": 1e-4, "synth.seed": 3}
    same = report.config_digest_without_seeds(flat)
    assert report.config_digest_without_seeds({**flat, "stage2.seed": 7, "seed": 1}) == same
    assert report.config_digest_without_seeds({**flat, "stage2.lr": 2e-4}) != same
    assert report.seeds_of(flat) == {"seed": 0, "stage2.seed": 0, "synth.seed": 3}


def test_run_summary_prints_the_checks(capsys):
    from flows.cli import _print_summary

    _print_summary(make_summary())
    out = capsys.readouterr().out
    assert "stage checks" in out and "stage1 ≥ backbone" in out and "FAIL" in out


def _write(run_dir, summary):
    path = run_dir / "runs" / summary["run_id"] / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return path


def test_cli_writes_the_report_and_names_a_missing_run(tmp_path):
    from flows.cli import app

    run_dir = tmp_path / "runs"
    for i in range(2):
        _write(run_dir, make_summary(f"run{i}", seed=i))
    runner = CliRunner()
    out = tmp_path / "docs" / "results.md"
    res = runner.invoke(app, ["report", "run0", "--run-dir", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert COMMIT in out.read_text() and "## Run `run0`" in out.read_text()

    res = runner.invoke(app, ["report", "run0", "run1", "--run-dir", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "mean ± std over 2 runs" in res.output

    res = runner.invoke(app, ["report", "--latest", "--run-dir", str(run_dir)])
    assert res.exit_code == 0 and "## Run `run1`" in res.output

    res = runner.invoke(app, ["report", "run0", "nope", "--run-dir", str(run_dir)])
    assert res.exit_code == 1
    assert f"run nope: no summary at {run_dir / 'runs' / 'nope' / 'summary.json'}" in res.output


def test_pipeline_summary_logs_checks_to_mlflow_and_reports(tmp_path, monkeypatch):
    """`_summarise` + `_log_final` of flows/pipeline.py into a real MLflow SQLite store, then the CLI."""
    import mlflow

    from flows.pipeline import Context, _log_final, _summarise
    from tasks.evaluation.benchmarks import benchmark_summary
    from tasks import tracking
    from flows.cli import app
    from tasks.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs"
    eid = tracking.setup(run_dir, "report-test")
    client = mlflow.MlflowClient()
    tags = {"git_commit": COMMIT, "config_hash": "feedfacefeedface", "dvc_data_md5": "d" * 32 + ".dir"}
    pid = client.create_run(eid, tags=tags).info.run_id
    stats = tmp_path / "synthetic" / "stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps(make_summary()["synthesis"]))
    filter_report = tmp_path / "filtered" / "report.json"
    filter_report.parent.mkdir()
    filter_report.write_text(json.dumps({"embedder": "e", "threshold": 0.7, "total": 4, "kept": 2,
                                         "kept_fraction": 0.5}))
    stage1 = tmp_path / "stage1" / "final"
    stage1.mkdir(parents=True)
    (stage1 / "train_summary.json").write_text(json.dumps({"steps": 16, "pairs": 4}))

    ctx = Context(load_config("micro", ["stage2.seed=3"]), tmp_path, run_dir / "artifacts",
                  tmp_path / "datasets", eid, pid, tags["dvc_data_md5"], timings=make_summary()["stages"])
    scores = make_summary()["scores"]
    results = {m: {t: {"main_score": v} for t, v in s.items()} for m, s in scores.items()}
    models = {"backbone": ("micro", "kb"), "stage1": (str(stage1), "k1"), "stage2": ("s2", "k2"),
              "merged": ("m", "km")}
    # the flow keeps each evaluation's benchmark summaries (tasks/stages.py eval_stage's "benchmarks")
    bench = benchmark_summary(["A", "B"], {"A": 0.25, "B": 0.75}, {"A": "Retrieval", "B": "STS"})
    summary = _summarise(ctx, results, "merged", models, {"final": "rr", "key": "kr"}, 0.0, tags=tags,
                         synth={"stats": str(stats), "n_accepted": 4}, overrides=["stage2.seed=3"],
                         config_files=[], filtered={"report": str(filter_report)},
                         benchmarks={"merged": {"Local(bench, v1)": bench}})
    assert {k: summary[k] for k in tags} == tags
    assert summary["benchmarks"] == {"merged": {"Local(bench, v1)": bench}} and summary["first_stage"] is None
    assert summary["seeds"]["stage2.seed"] == 3 and summary["train_pairs"] == {"stage1": 4}
    assert summary["synthesis"]["by_kind"]["retrieval"] == {"accepted": 3, "rejected": 9}
    assert summary["filter"]["kept"] == 2
    _log_final(ctx, summary, "micro", None)  # the backbone is "final": no model to log

    metrics = client.get_run(pid).data.metrics
    assert metrics[f"check/stage1_vs_backbone/{STS}"] == 0.0 and metrics[f"check/stage2_vs_stage1/{NQ}"] == 1.0
    assert metrics["check/reranker_vs_merged/mean"] == 1.0
    assert COMMIT in (run_dir / "runs" / pid / "report.md").read_text()

    out = tmp_path / "README-results.md"
    res = CliRunner().invoke(app, ["report", pid, "--run-dir", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert f"git checkout {COMMIT} && q3e run --preset micro stage2.seed=3" in text
    assert "**FAIL**: stage1 ≥ backbone" in text and "Stage 1 trained on 4 pairs." in text
    assert "### Benchmarks" in text and "| merged (final) | 0.500 / 0.500 |" in text

