"""What a run leaves on the machine, checked on the process table and the socket table: a
SIGKILLed driver takes its children with it (tasks/reaper.py; a whole `q3e run` killed in stage 2,
its Prefect server and Ray included: tests/reliability/test_kill_and_resume.py), the
embedded Ray listens on the loopback address only, and every failure a user meets on the command
line is one `error:` line (the traceback only with --debug / Q3E_DEBUG=1)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks import reaper
from tests.processes import LINUX, session_processes, wait_session_empty

ROOT = Path(__file__).resolve().parents[2]
Q3E = [sys.executable, "-m", "flows.cli"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "Q3E_DEBUG", "Q3E_NO_REAPER"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # ::ffff:127.0.0.1 is loopback too


def _error_lines(stderr: str) -> list[str]:
    """Lines that start with `error:` (a progress bar's carriage returns split lines too)."""
    parts = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [p for p in parts if p.startswith("error: ")]


# ----------------------------------------------------------------------------- the reaper itself

def _watchdog_of(driver: int, timeout: float) -> int | None:
    """The pid of the reaper watching `driver` (its own session, so not in the driver's), once its
    interpreter runs reaper.py."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[-3].endswith(b"reaper.py") and argv[-2] == str(driver).encode():
                return int(name)
        time.sleep(0.1)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="the reaper reads /proc")
def test_the_children_of_a_sigkilled_process_are_stopped(tmp_path):
    """A driver starts a child that starts a grandchild (the shape of Ray's raylet and its agents,
    which outlive a SIGKILLed driver), then is SIGKILLed: both are gone within seconds."""
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tasks import reaper
        watching = reaper.start()
        subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300; wait"])
        print("ready" if watching else "unwatched", flush=True)
        time.sleep(300)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=_env(), start_new_session=True)
    assert driver.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while len(session_processes(driver.pid)) < 4 and time.monotonic() < deadline:  # python, sh, sleep, sleep
        time.sleep(0.1)
    before = session_processes(driver.pid)
    assert sum("sleep 300" in c for c in before.values()) >= 2, before
    # the watchdog has started and seen them: on a busy machine (the suite runs two tests at a time)
    # its interpreter can take longer to start than a fixed pause after `ready` allowed
    assert _watchdog_of(driver.pid, timeout=10), "no watchdog process for the driver"
    time.sleep(4 * reaper.POLL_S)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert wait_session_empty(driver.pid, timeout=15) == {}

    # the same without the watchdog: the orphans stay (the check can fail)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=_env(Q3E_NO_REAPER="1"), start_new_session=True)
    assert driver.stdout.readline().strip() == "unwatched"
    time.sleep(1.0)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    left = session_processes(driver.pid)
    try:
        assert sum("sleep 300" in c for c in left.values()) >= 2, left
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def test_a_reused_pid_is_never_signalled():
    """The watchdog matches pid and start time: a process it did not record is left alone."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        stopped = reaper.stop({other.pid: "0"}, grace_s=0.5)  # same pid, another start time
        assert stopped == [] and other.poll() is None
    finally:
        other.kill()
        other.wait()


# ----------------------------------------------------------------------------- the whole stack

@pytest.mark.slow
def test_the_temporary_prefect_server_is_out_of_reach_of_a_terminals_ctrl_c(monkeypatch):
    """Ctrl-C signals the terminal's whole process group: Prefect's temporary server runs in a
    session of its own, so it is still up when the interrupted flow reports its crash to it (it
    used to die first, and `q3e run` then retried a closed port for a minute), and it is still a
    child of the driver, which the watchdog follows."""
    import socket

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.server.api.server import SubprocessASGIServer

    from flows.pipeline import keep_the_temporary_prefect_server_through_ctrl_c

    keep_the_temporary_prefect_server_through_ctrl_c()  # at import too, unless a server was configured then

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = SubprocessASGIServer(port=port)
    server.start()
    try:
        pid = server.server_process.pid
        assert os.getsid(pid) == pid != os.getsid(0)  # a session (and process group) of its own
        assert pid in reaper.descendants({os.getpid()})
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc/net")
def test_the_embedded_ray_listens_on_the_loopback_address_only(tmp_path):
    """The socket table of a local Ray instance started the way the pipeline starts it, with a
    worker up; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (a user's choice) opens it, as the check shows.
    The worker sees the variables the driver set before the start (without a runtime_env, which
    would start each worker through one more interpreter)."""
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import psutil, ray  # Ray imported first, as other modules may do
        from tasks.distributed import init_ray
        os.environ["HF_HOME"] = "/set/by/the/driver"
        init_ray(num_cpus=1)
        seen = ray.get(ray.remote(lambda: os.environ.get("HF_HOME")).remote())
        me = psutil.Process()
        pids = {{me.pid, *(p.pid for p in me.children(recursive=True))}}
        socks = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
        print("RESULT " + json.dumps({{"gcs": ray.get_runtime_context().gcs_address, "listen": socks,
                                      "worker_hf_home": seen}}))
        ray.shutdown()
    """)

    def listening(**env):
        res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(**env), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.split("RESULT ", 1)[1])

    # both instances at once: most of a Ray start is waiting for its processes to come up
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        local, opened = pool.map(lambda env: listening(**env), ({}, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}))
    assert len(local["listen"]) >= 4, local  # gcs_server, raylet, agents, the worker
    assert all(_loopback(ip) for ip, _, _ in local["listen"]), local["listen"]
    assert local["gcs"].startswith("127.0.0.1:")
    assert local["worker_hf_home"] == opened["worker_hf_home"] == "/set/by/the/driver"

    assert not all(_loopback(ip) for ip, _, _ in opened["listen"]), opened["listen"]


# ----------------------------------------------------------------------------- one error line

def _q3e(*args, cwd=ROOT, preexec_fn=None, **env):
    return subprocess.run([*Q3E, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec_fn)


def _one_line(res, *needles: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    if "(traceback: " in lines[0]:  # an error no command expected: its traceback is kept in a file
        tb = Path(lines[0].split("(traceback: ")[1].split(";")[0])
        assert "Traceback" in tb.read_text()
        tb.unlink()
    return lines[0]


@pytest.fixture(scope="module")
def micro_model(module_tmp):
    from tasks.models import Embedder

    path = module_tmp("models") / "good"
    Embedder.load("micro", device="cpu").save(path)
    return path


@pytest.mark.slow
def test_damaged_and_pickle_only_model_folders_are_one_line(micro_model, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    cut = tmp_path / "cut"
    shutil.copytree(micro_model, cut)
    os.truncate(cut / "model.safetensors", 1000)
    _one_line(_q3e("encode", str(cut), "a text"), f"{cut / 'model.safetensors'}: damaged weights file")
    _one_line(_q3e("merge", str(micro_model), str(cut), "--out", str(tmp_path / "merged")),
              f"{cut / 'model.safetensors'}: damaged weights file")
    assert not (tmp_path / "merged").exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(micro_model, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    _one_line(_q3e("encode", str(pickled), "a text"), f"{pickled}: has only pickle weights (pytorch_model.bin)")

    # --debug (anywhere on the line) and Q3E_DEBUG=1 print the traceback instead
    for res in (_q3e("encode", str(cut), "a text", "--debug"), _q3e("encode", str(cut), "a text", Q3E_DEBUG="1")):
        assert res.returncode == 1 and "Traceback" in res.stderr and "damaged weights file" in res.stderr


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line_and_leaves_no_tmp(shared_data, tmp_path):
    """The free-space check passes, then the write itself fails (the file size limit stands in for
    a disk another process filled meanwhile): one line naming the checkpoint, no partial folder."""
    out = tmp_path / "train"
    res = _q3e("train", "--preset", "micro", "--out", str(out), "--data",
               str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), "stage2.steps=4",
               "stage2.checkpoint_every=2", "stage2.batch_size=4", preexec_fn=_file_size_limit(2 * 2**20))
    _one_line(res, f"{out / 'checkpoints' / 'step-000002'}: no space left while writing the checkpoint",
              "the partial checkpoint was removed")
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.safetensors"))
    assert (out / "metrics.jsonl").is_file()  # what was written before stays


@pytest.mark.slow
def test_an_unreachable_mlflow_server_is_one_line(shared_data, tmp_path):
    from dvc.repo import Repo

    project = tmp_path / "project"
    project.mkdir()
    Repo.init(str(project), no_scm=True)
    res = _q3e("run", "--preset", "micro", "--project", str(project), f"data.source={shared_data}",
               "infra.mlflow_tracking_uri=http://127.0.0.1:9")
    _one_line(res, "error: MLflow tracking store http://127.0.0.1:9 is not usable",
              "point infra.mlflow_tracking_uri / MLFLOW_TRACKING_URI elsewhere")
    assert "Encountered exception" not in res.stderr  # Prefect's own report of the failure is not echoed
