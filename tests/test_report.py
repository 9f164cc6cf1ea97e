"""`q3e report`: Markdown from a run's summary.json (tasks/report.py). Pure functions over a summary
dict shaped like flows/pipeline.py `_summarise` writes it; one test goes through the pipeline's own
`_summarise` / `_log_final` into a real MLflow SQLite store and back out through the CLI."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
from typer.testing import CliRunner

from tasks import ablation, report

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


MACHINE = {"cpu": "Intel(R) Xeon(R) Processor", "cpus": "2", "cpu_bf16": "AMX", "gpu": "none", "torch": "2.13.0+cpu"}


def test_header_names_the_machine_when_the_run_recorded_it():
    md = report.run_report({**make_summary(), "machine": MACHINE})
    assert ("Machine: Intel(R) Xeon(R) Processor, 2 CPUs, bf16 matrix instructions: AMX, no GPU, "
            "torch 2.13.0+cpu.") in md
    assert "round differently" in md
    assert "Machine:" not in report.run_report(make_summary())  # a summary from before runs recorded it


def test_seeds_name_one_machine_or_each_runs_where_they_differ():
    runs = [{**make_summary(f"run{i}", seed=i), "machine": MACHINE} for i in range(3)]
    md = report.report_seeds(runs)
    assert md.count("Machine: Intel(R) Xeon(R) Processor, 2 CPUs") == 1 and "differ" not in md
    runs[2]["machine"] = {**MACHINE, "cpu": "AMD EPYC", "cpu_bf16": "AVX512-BF16"}
    md = report.report_seeds(runs)
    assert "**Machines differ**" in md
    assert "- `run2`: AMD EPYC, 2 CPUs, bf16 matrix instructions: AVX512-BF16" in md
    assert "- `run0`: Intel(R) Xeon(R) Processor" in md
    assert "Machine" not in report.report_seeds([make_summary(f"run{i}", seed=i) for i in range(3)])


def test_ablation_seeds_name_the_machine_of_their_runs():
    sweeps = [make_sweep(i) for i in range(2)]
    for sweep in sweeps:
        for s in sweep.values():
            s["machine"] = MACHINE
    md = ablation.report_ablation_seeds(sweeps, ["sweep0", "sweep1"])
    assert md.count("Machine: Intel(R) Xeon(R) Processor, 2 CPUs, bf16 matrix instructions: AMX") == 1


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
    assert ("Filter: cos > 0.7, scored by `runs/stage1/final`, kept 304 of 305 pairs (99.7%); of mismatched "
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
    tags = {"git_commit": COMMIT, "config_hash": "feedfacefeedface", "dvc_data_md5": "d" * 32 + ".dir",
            **{f"machine.{k}": v for k, v in tracking.machine().items()}}
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
    assert {k: summary[k] for k in tags if not k.startswith("machine.")} == {
        k: v for k, v in tags.items() if not k.startswith("machine.")}
    assert summary["machine"] == tracking.machine()
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
    assert f"Machine: {report.machine_text(summary)}." in text



# ----------------------------------------------------------------------------- ablation sweeps over seeds

FINAL = {"full": "merged", "no-merge": "stage2", "no-synthetic": "stage2", "only-synthetic": "stage1"}
# (NQ, STS) of each setting's final model in sweeps 0, 1, 2 (one per seed), chosen so that
# only-synthetic < no-synthetic holds beyond noise (paired differences +0.10, +0.12, +0.11),
# no-synthetic < no-merge is within noise (+0.02, -0.01, +0.005) and no-merge < full is reversed
# beyond noise (-0.03, -0.03, -0.0325), while each setting's own spread over seeds is ~0.015.
ABLATION_SCORES = {
    "full": [(0.30, 0.50), (0.32, 0.52), (0.31, 0.47)],
    "no-merge": [(0.33, 0.53), (0.35, 0.55), (0.345, 0.50)],
    "no-synthetic": [(0.31, 0.51), (0.36, 0.56), (0.335, 0.50)],
    "only-synthetic": [(0.21, 0.41), (0.24, 0.44), (0.235, 0.38)],
}


def make_sweep(seed: int, commit: str = COMMIT) -> dict[str, dict]:
    """{setting: summary} as flows/ablate.py writes it for a sweep run with stage1/stage2/reranker.seed=seed."""
    sweep = {}
    for setting, per_seed in ABLATION_SCORES.items():
        s = make_summary(f"s{seed}-{setting}", seed=seed, commit=commit)
        final = FINAL[setting]
        chain = [m for m in report.CHAIN if not (setting == "no-synthetic" and m == "stage1")]
        keep = chain[:chain.index(final) + 1] + (["reranker"] if setting == "full" else [])
        s["scores"] = {m: v for m, v in s["scores"].items() if m in keep}
        s["scores"][final] = dict(zip([NQ, STS], per_seed[seed]))
        s.update(ablation=setting, final_model=final, config_hash_without_seeds=f"cfg-{setting}",
                 seeds={"seed": 0, "reranker.seed": seed, "stage1.seed": seed, "stage2.seed": seed},
                 overrides=[f"{k}.seed={seed}" for k in ("stage1", "stage2", "reranker")])
        sweep[setting] = s
    return sweep


def _ablation_md(n: int = 3) -> str:
    return ablation.report_ablation_seeds([make_sweep(i) for i in range(n)], [f"sweep{i}" for i in range(n)])


def test_ablation_seeds_table_is_mean_and_std_over_sweeps():
    md = _ablation_md()
    rows = table_rows(md, "| setting |")
    assert rows[0] == ["setting", NQ, STS, "mean", "Δ mean vs full", "seed values"]
    assert [r[0] for r in rows[1:]] == list(ABLATION_SCORES)  # the first sweep's order
    for setting, row in zip(ABLATION_SCORES, rows[1:]):
        nq, sts = zip(*ABLATION_SCORES[setting])
        means = [(a + b) / 2 for a, b in zip(nq, sts)]
        expected = [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" for v in (nq, sts, means)]
        assert row[1:4] == expected, setting
        assert row[5] == " / ".join(f"{m:.3f}" for m in means)
    assert rows[2][1:4] == ["0.342 ± 0.010", "0.527 ± 0.025", "0.434 ± 0.014"]  # no-merge, by hand
    assert rows[2][5] == "0.430 / 0.450 / 0.422"
    assert "## Ablations over 3 sweeps: preset `smol`" in md and f"Commit `{COMMIT[:12]}`" in md
    assert "Regenerate this text: `q3e report --ablations sweep0 sweep1 sweep2`" in md
    assert "full: merged, no-merge: stage2, no-synthetic: stage2, only-synthetic: stage1" in md
    runs = table_rows(md, "| sweep |")
    assert len(runs) == 1 + 3 * 4
    assert runs[1][:3] == ["`sweep0`", "full", "`s0-full`"]
    assert runs[-1][:4] == ["`sweep2`", "only-synthetic", "`s2-only-synthetic`",
                            "reranker.seed=2, stage1.seed=2, stage2.seed=2"]


def test_ablation_delta_to_full_is_paired_by_seed():
    rows = {r[0]: r for r in table_rows(_ablation_md(), "| setting |")[1:]}
    full = [(a + b) / 2 for a, b in ABLATION_SCORES["full"]]
    assert rows["full"][4] == "–"
    for setting in ("no-merge", "no-synthetic", "only-synthetic"):
        mine = [(a + b) / 2 for a, b in ABLATION_SCORES[setting]]
        paired = [m - f for m, f in zip(mine, full)]
        assert rows[setting][4] == f"{statistics.fmean(paired):+.3f} ± {statistics.stdev(paired):.3f}", setting
    # the seeds move full and no-merge together: the paired spread is far below the unpaired one
    assert rows["no-merge"][4] == "+0.031 ± 0.001"
    no_merge = [(a + b) / 2 for a, b in ABLATION_SCORES["no-merge"]]
    unpaired = (statistics.variance(no_merge) + statistics.variance(full)) ** 0.5
    assert f"{unpaired:.3f}" != "0.001"


def test_ablation_ordering_says_holds_within_noise_or_reversed():
    means = {s: [(a + b) / 2 for a, b in v] for s, v in ABLATION_SCORES.items()}
    checks = ablation.ordering_checks(means)
    assert [(c["lower"], c["higher"], c["verdict"]) for c in checks] == [
        ("only-synthetic", "no-synthetic", "holds"), ("no-synthetic", "no-merge", "within noise"),
        ("no-merge", "full", "reversed")]
    d = [f - m for f, m in zip(means["full"], means["no-merge"])]
    assert checks[2]["diff"] == pytest.approx(statistics.fmean(d))
    assert checks[2]["se"] == pytest.approx(statistics.stdev(d) / 3 ** 0.5)

    md = _ablation_md()
    assert "- only-synthetic < no-synthetic: **holds**, beyond noise: Δ = +0.110, 2 × SE = 0.012" in md
    assert "- no-synthetic < no-merge: within noise (the mean difference holds): Δ = +0.005, 2 × SE = 0.017" in md
    assert "- no-merge < full: **reversed**, beyond noise: Δ = -0.031, 2 × SE = 0.002" in md
    # only the pairs present: without no-merge, no-synthetic is compared with full
    partial = ablation.ordering_checks({s: means[s] for s in ("full", "no-synthetic")})
    assert [(c["lower"], c["higher"]) for c in partial] == [("no-synthetic", "full")]
    assert "No two settings" in ablation.ordering_markdown(ablation.ordering_checks({"full": means["full"]}))


def test_ablation_seeds_refuse_different_settings_commits_one_sweep_and_duplicates():
    a, b = make_sweep(0), make_sweep(1)
    del b["no-merge"]
    with pytest.raises(report.ReportError, match=r"same settings: sweep B has no no-merge \(in sweep A\)"):
        ablation.report_ablation_seeds([a, b], ["A", "B"])
    with pytest.raises(report.ReportError, match=r"sweep B has no no-merge \(in sweep A\)"):
        ablation.report_ablation_seeds([b, a], ["B", "A"])
    with pytest.raises(report.ReportError, match="different commits.*s0-full.*s1-full"):
        ablation.report_ablation_seeds([make_sweep(0), make_sweep(1, commit="f" * 40)], ["A", "B"])
    c = make_sweep(1)
    c["only-synthetic"]["config_hash_without_seeds"] = "other"
    with pytest.raises(report.ReportError, match=r"different configurations \(apart from seeds\)"):
        ablation.report_ablation_seeds([make_sweep(0), c], ["A", "B"])
    with pytest.raises(report.ReportError, match="two or more sweeps"):
        ablation.report_ablation_seeds([make_sweep(0)], ["A"])
    with pytest.raises(report.ReportError, match=r"a sweep is given twice: \['A'\]"):
        ablation.report_ablation_seeds([make_sweep(0), make_sweep(0)], ["A", "A"])
    d = make_sweep(1)
    del d["full"]["scores"]["merged"][STS]
    with pytest.raises(report.ReportError, match=f"run s1-full \\(full\\): .* no score on {STS}"):
        ablation.report_ablation_seeds([make_sweep(0), d], ["A", "B"])


def _write_sweep(run_dir, sweep_id, sweep):
    path = run_dir / "ablations" / sweep_id / "summaries.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(sweep))
    return path


def test_load_sweep_names_the_missing_or_bad_file(tmp_path):
    with pytest.raises(report.ReportError, match=f"sweep nope: no summaries at {tmp_path / 'ablations' / 'nope'}"):
        report.load_sweep(tmp_path, "nope")
    path = _write_sweep(tmp_path, "bad", {})
    path.write_text("{not json")
    with pytest.raises(report.ReportError, match=f"{path}: not valid JSON"):
        report.load_sweep(tmp_path, "bad")
    path.write_text(json.dumps({"full": {"run_id": "r", "final_model": "merged"}}))
    with pytest.raises(report.ReportError, match=f"{path}: setting 'full' is not a pipeline run summary "
                                                 f"\\(no field 'scores'\\)"):
        report.load_sweep(tmp_path, "bad")
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(report.ReportError, match="not an ablation sweep's summaries"):
        report.load_sweep(tmp_path, "bad")
    sweep = make_sweep(0)
    del sweep["full"]["date"]
    _write_sweep(tmp_path, "ok", sweep)
    loaded = report.load_sweep(tmp_path, "ok")
    assert list(loaded) == list(ABLATION_SCORES) and loaded["full"]["date"]  # the file's time


def test_cli_reports_ablation_sweeps_with_out_and_plot(tmp_path, capsys):
    from flows.cli import main

    run_dir = tmp_path / "runs"
    for i in range(3):
        _write_sweep(run_dir, f"sweep{i}", make_sweep(i))
    out, png = tmp_path / "docs" / "ablations.md", tmp_path / "docs" / "ablations.png"
    ids = ["sweep0", "sweep1", "sweep2"]
    assert main(["report", "--ablations", *ids, "--run-dir", str(run_dir), "--out", str(out),
                 "--plot", str(png)]) == 0
    assert out.read_text() == _ablation_md()
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {png}" in printed

    assert main(["report", "--ablations", *ids, "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().out == _ablation_md()

    assert main(["report", "--ablations", "--latest", "--run-dir", str(run_dir)]) == 1
    assert "--latest picks one run, not sweeps" in capsys.readouterr().err
    assert main(["report", "sweep0", "--plot", str(png), "--run-dir", str(run_dir)]) == 1
    assert "use it with --ablations" in capsys.readouterr().err
    assert main(["report", "--ablations", "sweep0", "gone", "--run-dir", str(run_dir)]) == 1
    assert f"sweep gone: no summaries at {run_dir / 'ablations' / 'gone' / 'summaries.json'}" in capsys.readouterr().err


def test_the_filter_note_says_what_the_round_trip_dropped_and_warns_only_without_one():
    from tasks.report import filter_note

    rep = {"embedder": "bundled:all-minilm-l6-v2", "threshold": 0.0, "kept": 3, "total": 10, "kept_fraction": 0.3,
           "by_task": {"bitext": {"kept": 0, "total": 4}, "sts": {"kept": 3, "total": 6}},
           "mismatched": {"kept_fraction": 0.65}, "warning": "the scorer passes 65 % of mismatched pairs"}
    plain = filter_note(rep)
    assert plain.startswith("Filter: cos > 0, scored by `bundled:all-minilm-l6-v2`, kept 3 of 10 pairs (30.0%)")
    assert "65.0% would pass" in plain and "**Warning**: the scorer passes" in plain
    rt = filter_note(rep | {"round_trip": {"k": 5, "above_threshold": 9, "dropped_by_rank": 6}})
    assert "top 5 of all synthetic documents (round trip)" in rt and "bitext 0 of 4, sts 3 of 6" in rt
    assert "dropped 6 of the 9 above the threshold" in rt and "Warning" not in rt and "would pass" not in rt
