"""The driver's helpers die with it: a watchdog that stops what a `q3e` process started once that
process is gone, however it ended (normal exit, exception, Ctrl-C, SIGKILL, out-of-memory kill).

The embedded services are child processes of the driver: Prefect's temporary API server (uvicorn),
the local Ray instance (gcs_server, raylet, its dashboard and runtime-env agents, workers). Ray
ties its core processes to the driver, but not its agents, and Prefect ties nothing: after a
SIGKILL of the driver they used to run on (about 400 MB, ports open) until the machine restarted.

`start()` launches this file as a separate process (its own session, so Ctrl-C in the terminal
does not reach it, standard library only) that holds the read end of a pipe whose write end only
the driver holds. The kernel closes that end when the driver dies, in every way it can die, so the
watchdog sees end-of-file. Meanwhile it records the driver's descendants (pid and start time,
twice a second); at end-of-file it sends SIGTERM to those still alive (same start time: a reused
pid is never hit) and to their own descendants, then SIGKILL to what is left after a grace period.

Linux only (it reads /proc); elsewhere, or with Q3E_NO_REAPER=1, `start()` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 5.0
_write_end: int | None = None


def start() -> bool:
    """Watch this process; its descendants are stopped when it ends. Idempotent; True if watching."""
    global _write_end
    if _write_end is not None:
        return True
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc") or os.environ.get("Q3E_NO_REAPER"):
        return False
    read_end, write_end = os.pipe()  # not inheritable: no other child holds the write end open
    try:
        # stdout/stderr not inherited (unless debugging): a caller reading this command's output to
        # its end is not kept waiting on the watchdog
        quiet = not os.environ.get("Q3E_DEBUG")
        subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())], stdin=read_end,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else None,
                         start_new_session=True, close_fds=True)
    except OSError:
        os.close(write_end)
        return False
    finally:
        os.close(read_end)
    _write_end = write_end
    return True


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[19]


def _processes() -> dict[int, tuple[int, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """{pid: start time} of every descendant of `roots` (not the roots)."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out and child not in roots:
                out[child] = table[child][1]
                todo.append(child)
    return out


def _alive(known: dict[int, str]) -> dict[int, str]:
    return {pid: st for pid, st in known.items() if (now := _stat(pid)) is not None and now[1] == st}


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def stop(known: dict[int, str], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the processes of `known` still alive and their descendants, SIGKILL what is left
    after `grace_s`; returns the pids signalled."""
    targets = _alive(known)
    targets.update(descendants(set(targets)))
    targets.pop(os.getpid(), None)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := _alive(targets)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(left, signal.SIGKILL)
    return sorted(targets)


def watch(driver: int, fd: int = 0, poll_s: float = POLL_S) -> list[int]:
    """Record `driver`'s descendants until `fd` reads end-of-file, then stop them."""
    me = os.getpid()
    known: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready and not os.read(fd, 4096):
            break
        known = _alive(known)  # forget the ones that ended (a long `q3e schedule` starts many)
        known.update(descendants({driver}))
        known.pop(me, None)
    return stop(known)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopped = watch(int(sys.argv[1]))
    if stopped and os.environ.get("Q3E_DEBUG"):
        print(f"q3e reaper: stopped {len(stopped)} processes left by {sys.argv[1]}: {stopped}", file=sys.stderr)
