"""The `q3e` command line (flows/cli/): how it parses a command line, what each command's --help
says it does, the defaults it takes from conf/base.yaml, and failures as one `error:` line. Run
in-process through `main`, the console entry; commands that start services are left to the
end-to-end tests (tests/test_pipeline.py, tests/reliability/test_process_hygiene.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer.main
import yaml

from flows.cli import app, main, one_line
from tasks.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# every command, and words of its --help that say what it does (in the paper's terms)
HELP = {
    "config": "Print the fully resolved configuration",
    "train": "Train one stage (embedding: improved InfoNCE; reranker: yes/no SFT)",
    "merge": "Slerp-merge checkpoints tensor by tensor",
    "encode": "Embed texts and print the cosine similarity matrix",
    "export": "Re-export a model",
    "eval": "Evaluate an embedding model",
    "synth": "Synthesise training pairs with an LLM",
    "filter": "Filter synthetic pairs",
    "run": "Run the whole pipeline",
    "ablate": "Run the ablation sweep (paper Table 5",
    "rerun": "Reproduce a run from MLflow",
    "retrain": "Retrain on the newest data version",
    "schedule": "Serve the retraining flow as a Prefect deployment on a cron schedule",
    "lineage": "Print where a run's models came from",
    "report": "Print the Markdown report of pipeline runs",
    "runs compare": "Print the comparison table of pipeline runs",
    "data check": "Check a preset's training data without training",
}


# a line that a Ray instance left by an earlier test in this process forwards to stderr from its
# log monitor thread, e.g. "\x1b[33m(raylet)\x1b[0m ... over 95% full": not the command's output
RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|gcs_server|\w*\s*pid=\d+[^)]*)\)")


def q3e(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `q3e ARGS`, without lines forwarded by a Ray instance."""
    code = main(list(args))
    out, err = capsys.readouterr()
    err = "".join(line for line in err.splitlines(keepends=True) if not RAY_FORWARDED.match(line))
    return code, out, err


def flat(text: str) -> str:
    """Help text with the panel borders and line wrapping taken out."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.fixture(autouse=True)
def _commands_leave_the_test_process_as_it_was(monkeypatch):
    monkeypatch.setenv("Q3E_DEBUG", "")  # `--debug` sets it: undone after each test
    monkeypatch.setenv("Q3E_NO_REAPER", "1")  # no watchdog process for the test runner
    prefect_loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    filters = [list(logger.filters) for logger in prefect_loggers]
    yield
    for logger, before in zip(prefect_loggers, filters):  # commands filter Prefect's failure echo
        logger.filters[:] = before


def test_every_command_is_listed_with_what_it_does(capsys):
    group = typer.main.get_command(app)
    names = {f"{n} {sub}" if hasattr(c, "commands") else n
             for n, c in group.commands.items() for sub in getattr(c, "commands", [None])}
    assert names == set(HELP)
    code, out, _ = q3e(capsys, "--help")
    assert code == 0
    for name in HELP:
        assert f"│ {name.split()[0]} " in out, name


@pytest.mark.parametrize("command", sorted(HELP))
def test_each_commands_help_says_what_it_does(capsys, command):
    code, out, err = q3e(capsys, *command.split(), "--help")
    assert code == 0 and not err
    assert HELP[command] in flat(out)
    assert f"Usage: q3e {command}" in out


def test_config_resolves_preset_files_and_overrides_in_that_order(capsys, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("stage2: {steps: 5, lr: 0.004}\n")
    code, out, err = q3e(capsys, "config", "--preset", "micro", "-c", str(overlay), "stage2.steps=7",
                         "stage2.loss.temperature=0.02")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["preset"] == "micro" and cfg["model"]["backbone"] == "micro"
    assert cfg["stage2"]["steps"] == 7 and cfg["stage2"]["lr"] == 0.004  # the override after the file
    assert cfg["stage2"]["loss"]["temperature"] == 0.02
    code, out, _ = q3e(capsys, "config", "-p", "micro", "--ablation", "no-merge")
    assert code == 0 and yaml.safe_load(out)["merge"]["enabled"] is False


@pytest.mark.parametrize("args, named", [
    (["stage2.nosuchkey=1", "stage2.lr=abc"],
     ["override 'stage2.nosuchkey=1'", "stage2.nosuchkey: unknown key",
      "stage2.lr: Input should be a valid number"]),
    (["--preset", "nosuch"], ["unknown preset 'nosuch'; available: micro,"]),
    (["stage2.steps"], ["override 'stage2.steps': expected key.sub=value"]),
])
def test_a_bad_config_is_one_error_line_naming_the_key_and_nothing_runs(capsys, args, named):
    code, out, err = q3e(capsys, "config", *(["--preset", "micro"] if args[0] != "--preset" else []), *args)
    assert code == 2 and out == ""
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[0]]
    assert "Traceback" not in err
    for text in named:
        assert text in err


def test_a_bad_command_line_is_a_usage_error(capsys):
    code, _, err = q3e(capsys, "trian")
    assert code == 2 and "No such command 'trian'" in flat(err)
    code, _, err = q3e(capsys, "train", "--preset", "micro")
    assert code == 2 and "Missing option '--out'" in flat(err)


def test_a_wrong_stage_name_is_refused_before_training(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = q3e(capsys, "train", "--stage", "stage3", "--preset", "micro", "--out", str(out))
    assert code == 1 and "error: --stage must be stage1, stage2 or reranker, got 'stage3'" in err
    assert not out.exists()


def test_an_unexpected_failure_is_one_line_and_its_traceback_goes_to_a_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file where the run folder should be\n")
    code, _, err = q3e(capsys, "runs", "compare", "--run-dir", str(not_a_folder))
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"error: FileExistsError: [Errno 17] File exists: '{not_a_folder}' (traceback: ")
    traceback_file = Path(line.split("(traceback: ")[1].split(";")[0])
    assert traceback_file.parent == tmp_path and "Traceback" in traceback_file.read_text()
    # --debug, anywhere on the line: the exception itself, with its traceback
    with pytest.raises(FileExistsError):
        main(["runs", "compare", "--debug", "--run-dir", str(not_a_folder)])
    assert os.environ["Q3E_DEBUG"] == "1"


def test_ctrl_c_is_exit_130_with_the_resume_hint(capsys, monkeypatch):
    """typer turns a KeyboardInterrupt inside a command into exit 130; `main` says what to do next."""
    import typer

    import flows.cli.common as common

    interrupted = typer.Typer()

    @interrupted.command()
    def run() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "app", interrupted)
    assert main([]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; rerun the same command to resume where it stopped"


def test_one_line_keeps_the_projects_messages_and_names_other_exceptions():
    assert one_line(ConfigError("invalid configuration (from base.yaml):\n  stage2.lr: unknown key")) == \
        "invalid configuration (from base.yaml): stage2.lr: unknown key"
    assert one_line(ValueError("bad\nvalue")) == "ValueError: bad value"
    assert one_line(KeyError()) == "KeyError: KeyError()"


def test_the_defaults_are_read_from_base_yaml(tmp_path):
    """The options' defaults follow conf/base.yaml (here a changed copy, through Q3E_CONF_DIR)."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    base = yaml.safe_load((conf / "base.yaml").read_text())
    base["preset"], base["run_dir"] = "micro", "elsewhere"
    base["eval"] |= {"batch_size": 48, "rerank_top_k": 7}
    base["infra"]["mlflow_experiment"] = "other-experiment"
    (conf / "base.yaml").write_text(yaml.safe_dump(base))
    code = ("import json, typer.main; from flows.cli import app; g = typer.main.get_command(app); "
            "c = dict(g.commands, compare=g.commands['runs'].commands['compare']); "
            "print(json.dumps({n: {p.name: str(p.default) for p in c[n].params} for n in c}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "Q3E_CONF_DIR": str(conf)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    defaults = json.loads(proc.stdout)
    assert {n: d["preset"] for n, d in defaults.items() if "preset" in d} == \
        {n: "micro" for n in ("config", "train", "synth", "filter", "run", "ablate", "retrain", "schedule")} | \
        {"eval": "None"}  # eval: no preset unless given (the flags name the sets)
    assert (defaults["eval"]["batch_size"], defaults["eval"]["rerank_top_k"]) == ("48", "7")
    for name in ("rerun", "lineage", "compare", "report"):
        assert defaults[name]["run_dir"] == "elsewhere", name
    for name in ("rerun", "lineage", "compare"):
        assert defaults[name]["experiment"] == "other-experiment", name


def test_eval_with_a_preset_scores_that_presets_sets_and_symmetric_ones_get_the_instruction(
        capsys, tmp_path, monkeypatch, shared_data):
    """`q3e eval MODEL --preset smol` evaluates what `q3e run --preset smol` evaluates (its two sets,
    STS-B dev symmetric), on a fresh clone too (no data/ yet: it is restored as `q3e run` restores it);
    `--symmetric` gives a set's documents the query's instruction, which changes its score; a name that
    is no task of the evaluation is one error line."""
    clone = tmp_path / "clone"  # a fresh clone: a DVC project with data.dvc and no data/
    clone.mkdir()
    # in a subprocess: in-process, `dvc init` binds DVC's log handler to this test's captured stdout
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=clone, check=True)
    shutil.copy(ROOT / "data.dvc", clone / "data.dvc")
    overlay = tmp_path / "source.yaml"
    overlay.write_text(f"data: {{source: {shared_data}}}\n")
    monkeypatch.chdir(clone)

    small = ["--max-queries", "5", "--max-corpus", "40"]
    code, out, err = q3e(capsys, "eval", "micro", "--preset", "smol", "-c", str(overlay), *small,
                         "-o", str(tmp_path / "p.json"))
    assert code == 0, err
    assert "data: restored data/" in err
    preset_scores = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()}
    assert set(preset_scores) == {"nq-msmarco-hardneg", "stsb-en-dev"}

    stsb = str(clone / "data" / "beir" / "stsb-en-dev")
    runs = {}
    for extra in ([], ["--symmetric", "stsb-en-dev"]):
        code, out, err = q3e(capsys, "eval", "micro", "--task-dir", stsb, *small, *extra,
                             "-o", str(tmp_path / f"s{len(extra)}.json"))
        assert code == 0, err
        runs[bool(extra)] = float(out.split()[-1])
    assert runs[True] != runs[False]
    assert runs[True] == preset_scores["stsb-en-dev"]  # the preset names stsb-en-dev symmetric

    code, out, err = q3e(capsys, "eval", "micro", "--task-dir", stsb, *small, "--symmetric", "nosuch")
    assert code == 1 and out == ""
    assert err.strip() == "error: eval.symmetric names no task of this evaluation: nosuch (tasks: stsb-en-dev)"


# ----------------------------------------------------------------------------- q3e eval: its eval.* flags

TASK = "nq-msmarco-hardneg"
SMALL = ["--max-queries", "5", "--max-corpus", "40"]


def scores_of(out: str) -> dict[str, float]:
    """{task: main score} of `q3e eval`'s `<task>  main score <x>` lines."""
    return {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if "  main score " in line}


def test_eval_saves_a_first_stage_and_reranks_a_given_one(capsys, tmp_path, shared_data):
    """--save-first-stage writes the embedder's top-k beside the results; --first-stage reranks a
    file's top-k: the saved one as reranking directly does, a hand-edited one differently."""
    task_dir = str(shared_data / "beir" / TASK)
    common = ["eval", "micro", "--task-dir", task_dir, *SMALL, "--reranker", "micro", "--rerank-top-k", "5"]
    code, out, err = q3e(capsys, *common, "--save-first-stage", "-o", str(tmp_path / "direct.json"))
    assert code == 0, err
    saved = tmp_path / "direct.first_stage.json"
    data = json.loads(saved.read_text())
    assert data["top_k"] == 5 and all(len(docs) == 5 for docs in data["tasks"][TASK].values())
    direct = scores_of(out)

    code, out, err = q3e(capsys, *common, "--first-stage", str(saved), "-o", str(tmp_path / "fixed.json"))
    assert code == 0, err
    assert scores_of(out) == direct
    assert json.loads((tmp_path / "fixed.json").read_text())["first_stage"]["file"] == str(saved)

    # each query's judged documents in place of the embedder's top 5
    qrels = [line.split("\t") for line in (Path(task_dir) / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    data["tasks"][TASK] = {q: {d: 1.0 for q2, d, _ in qrels if q2 == q} for q in data["tasks"][TASK]}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    code, out, err = q3e(capsys, *common, "--first-stage", str(edited), "-o", str(tmp_path / "edited-out.json"))
    assert code == 0, err
    assert scores_of(out)[TASK] == direct[TASK]  # the embedder's own scores do not read the file
    assert scores_of(out)[f"{TASK}/rerank"] != direct[f"{TASK}/rerank"]


def test_eval_with_a_preset_scores_every_dim_and_keeps_its_eval_settings_unless_a_flag_is_given(
        capsys, tmp_path, shared_data):
    overlay = tmp_path / "eval.yaml"
    overlay.write_text("eval: {dims: [16, 32], max_query_length: 8, max_doc_length: 24, rerank_types: [Reranking]}\n")
    task_dir = str(shared_data / "beir" / TASK)
    out = tmp_path / "r.json"
    code, text, err = q3e(capsys, "eval", "micro", "--preset", "micro", "-c", str(overlay), "--task-dir", task_dir,
                          *SMALL, "--max-doc-length", "20", "--reranker", "micro", "-o", str(out))
    assert code == 0, err
    # the full dimension, then each of eval.dims as <task>@<dim>, each in its own file (as `q3e run`)
    assert set(scores_of(text)) == {TASK, f"{TASK}@16", f"{TASK}@32"}  # no /rerank: not a Reranking task
    records = {name: json.loads((tmp_path / name).read_text()) for name in ("r.json", "r@16.json", "r@32.json")}
    assert [r["dim"] for r in records.values()] == [None, 16, 32]
    settings = records["r.json"]["model_settings"]
    assert (settings["max_query_length"], settings["max_doc_length"]) == (8, 20)  # the preset's; the flag's

    # --dim: that dimension only; --rerank-type replaces the preset's types
    code, text, err = q3e(capsys, "eval", "micro", "--preset", "micro", "-c", str(overlay), "--task-dir", task_dir,
                          *SMALL, "--dim", "16", "--reranker", "micro", "--rerank-type", "Retrieval",
                          "-o", str(tmp_path / "d.json"))
    assert code == 0, err
    assert set(scores_of(text)) == {TASK, f"{TASK}/rerank"}
    assert json.loads((tmp_path / "d.json").read_text())["dim"] == 16 and not (tmp_path / "d@16.json").exists()


def test_eval_takes_several_benchmarks_and_prints_their_means(capsys, tmp_path, shared_data, monkeypatch):
    import mteb

    from tasks.evaluation.local_tasks import beir_task, sts_task

    benches = {"Local(a, v1)": [beir_task(shared_data / "beir" / TASK, max_queries=5, max_corpus=40)],
               "Local(b, v1)": [sts_task(shared_data / "sts-en" / "SICK_trial.txt", max_pairs=40)]}
    real = mteb.get_benchmark
    monkeypatch.setattr(mteb, "get_benchmark", lambda name: SimpleNamespace(name=name, tasks=benches[name])
                        if name in benches else real(name))
    code, out, err = q3e(capsys, "eval", "micro", "-b", "Local(a, v1)", "-b", "Local(b, v1)",
                         "-o", str(tmp_path / "b.json"))
    assert code == 0, err
    scores = scores_of(out)
    assert set(scores) == {TASK, "SICK_trial"}
    means = [line for line in out.splitlines() if "Mean(Task)" in line]
    assert means == [f"Local(a, v1)  Mean(Task) {scores[TASK]:.4f}  Mean(Type) {scores[TASK]:.4f}",
                     f"Local(b, v1)  Mean(Task) {scores['SICK_trial']:.4f}  Mean(Type) {scores['SICK_trial']:.4f}"]
