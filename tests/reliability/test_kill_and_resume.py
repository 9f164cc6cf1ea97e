"""Faults injected for real: the training process and the flow process are SIGKILLed mid-run;
re-running resumes from the last checkpoint / the failed stage and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.processes import LINUX, process_tree, wait_gone

pytestmark = pytest.mark.slow

Q3E = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[2]
SNLI = Path("triplets-en") / "snli_dev_triplets.jsonl"


def _env() -> dict:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "Q3E_NO_REAPER"):  # the embedded default, reaper on
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the kill point")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _train_cmd(out: Path, data: Path) -> list[str]:
    return [*Q3E, "train", "--preset", "micro", "--stage", "stage2", "--out", str(out), "--data", str(data),
            "stage2.steps=12", "stage2.checkpoint_every=2", "stage2.keep_checkpoints=2", "stage2.batch_size=8"]


@pytest.fixture(scope="module")
def reference(shared_data, module_tmp) -> Path:
    """The uninterrupted training run that the killed and the crashed runs must end identical to."""
    out = module_tmp("reference") / "ref"
    ref = subprocess.run(_train_cmd(out, shared_data / SNLI), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return out


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_training_killed_mid_run_resumes_to_bit_identical_weights(shared_data, tmp_path, reference):
    data = shared_data / SNLI
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, data), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(proc, lambda: (out / "checkpoints" / "step-000006" / "state.json").is_file())
    assert not (out / "final").exists()
    resumed = subprocess.run(_train_cmd(out, data), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["resumed_from"] >= 6
    assert _same_weights(reference, out)
    # the loss history of the resumed run is the uninterrupted one, step for step
    hist = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert hist(out) == hist(reference)


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_flow_sigkilled_mid_stage_leaves_nothing_running_and_resumes_at_that_stage(shared_data, tmp_path, llm_url):
    """`q3e run` SIGKILLed in stage 2, the driver only (as `kill -9 <pid>` does), while Prefect's
    temporary server, the local Ray instance and a Ray worker are up: none of its processes is left
    and nothing trains on (tasks/reaper.py); a rerun resumes stage 2 from its checkpoint. The run is
    Table 5's `no-synthetic` (stage 2 straight from the backbone), which reaches stage 2 in half the
    time. Elsewhere: a rerun after a failed stage reuses every stage before it (tests/test_pipeline.py),
    a synthesis killed mid-run resumes (tests/test_synthesize.py, tests/reliability/test_ray_worker_faults.py)."""
    from dvc.repo import Repo

    from tests.configs import pipeline_overrides

    project = tmp_path / "project"
    project.mkdir()
    Repo.init(str(project), no_scm=True)
    cmd = [*Q3E, "run", "--preset", "micro", "--ablation", "no-synthetic", "--project", str(project),
           *pipeline_overrides(shared_data, llm_url, "stage2.steps=16", "stage2.checkpoint_every=4")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = lambda: list(project.glob("runs/artifacts/stage2/*/checkpoints/step-000008/state.json"))
    deadline = time.monotonic() + 600
    while not ckpts():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before stage 2's checkpoint 8"
        assert time.monotonic() < deadline, "stage 2's checkpoint 8 not reached in time"
        time.sleep(0.05)
    running = process_tree(proc.pid)  # the Prefect server is in a session of its own, a child of the driver
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any("uvicorn" in c and "prefect" in c for c in running.values()), running  # the stack was up
    assert any("raylet" in c for c in running.values()) and any("ray::" in c for c in running.values()), running
    assert wait_gone(running, timeout=30) == {}
    stage2_dir = ckpts()[0].parents[2]
    written = sorted(stage2_dir.glob("checkpoints/step-*"))
    time.sleep(2)
    assert sorted(stage2_dir.glob("checkpoints/step-*")) == written  # nothing trains on
    assert not (stage2_dir / "done.json").exists()

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary_file = max(project.glob("runs/runs/*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summary_file.read_text())
    assert summary["stages"][0]["stage"] == "stage2" and not summary["stages"][0]["cached"], summary["stages"]
    trained = json.loads((stage2_dir / "final" / "train_summary.json").read_text())
    assert trained["resumed_from"] >= 8  # stage 2 went on from its checkpoint, not from scratch


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(shared_data, tmp_path, reference):
    """The write of a checkpoint fails for real in the middle: a file-size limit (RLIMIT_FSIZE)
    below the optimizer state's size makes the kernel refuse the write of trainer_state.pt (EFBIG;
    Python ignores SIGXFSZ) after that checkpoint's model weights are on disk. The trainer removes
    the partial checkpoint, stops with one line naming it, and a rerun resumes from the previous one."""
    import resource

    data = shared_data / SNLI
    ckpt = sorted((reference / "checkpoints").glob("step-*"))[-1]
    model_bytes = (ckpt / "model" / "model.safetensors").stat().st_size
    state_bytes = (ckpt / "trainer_state.pt").stat().st_size
    assert state_bytes > 1.5 * model_bytes  # AdamW: two tensors per parameter
    limit = int(1.25 * model_bytes)

    # a run killed after its checkpoint at step 10 (the kill itself: the test above): the reference
    # run's folder as it was then
    out = tmp_path / "crashed"
    shutil.copytree(reference / "checkpoints" / "step-000010", out / "checkpoints" / "step-000010")
    metrics = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(m for m in metrics if json.loads(m)["step"] <= 10))

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    crashed = subprocess.run(_train_cmd(out, data), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             preexec_fn=small_files)
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    errors = [line for line in crashed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in crashed.stderr, crashed.stderr[-2000:]
    failed_at = errors[0].split("/checkpoints/")[1].split(":")[0]  # torch.save's write failed mid-checkpoint
    assert "no space left while writing the checkpoint" in errors[0] and "partial checkpoint was removed" in errors[0]
    assert not list((out / "checkpoints").glob("step-*.tmp"))  # nothing half-written is left
    complete = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    assert complete and complete[-1] < failed_at  # the previous good one survives

    resumed = subprocess.run(_train_cmd(out, data), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["resumed_from"] == int(complete[-1].split("-")[1])
    assert _same_weights(reference, out)
