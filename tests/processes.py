"""The process table, read from /proc: which processes a session (a driver started with
`start_new_session=True`) still has, for the tests that SIGKILL a driver and check what it left.
Prefect's temporary server runs in a session of its own (flows/pipeline.py: out of reach of a
terminal's Ctrl-C), so a run's processes are its session's and their descendants (`process_tree`).
Ray's actors are processes too: `wait_for_free_cpus` tells whether a stage left one holding CPUs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc")


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process of session `sid` (the driver started its own)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
            if int(raw[raw.rindex(")") + 2:].split()[3]) == sid:
                if (cmd := _cmdline(int(name))) is not None:  # whole: paths vary
                    out[int(name)] = cmd
        except (OSError, ValueError):
            continue
    return out


def wait_session_empty(sid: int, timeout: float = 30.0) -> dict[int, str]:
    """What is left of session `sid` once it is empty or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def process_tree(sid: int) -> dict[int, str]:
    """pid -> command line of every process of session `sid` and of their descendants in other
    sessions (the watchdog's own walk of the process table, tasks/reaper.py)."""
    from tasks import reaper

    out = session_processes(sid)
    for pid in reaper.descendants(set(out)):
        if pid not in out and (cmd := _cmdline(pid)) is not None:
            out[pid] = cmd
    return out


def wait_gone(processes: dict[int, str], timeout: float = 30.0) -> dict[int, str]:
    """Those of `processes` (pid -> command line, as `process_tree` gives them) still running once
    none is or `timeout` seconds have passed; a pid now running another command counts as gone."""
    deadline = time.monotonic() + timeout
    while (left := {p: c for p, c in processes.items() if _cmdline(p) == c}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def wait_for_free_cpus(timeout: float = 20.0) -> float:
    """The CPUs of this process's Ray that are free once all are, or once `timeout` seconds have
    passed (killing an actor is asynchronous: its CPUs come back within about a second)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + timeout
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    return free
