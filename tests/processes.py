"""The process table, read from /proc: which processes a session (a driver started with
`start_new_session=True`) still has, for the tests that SIGKILL a driver and check what it left."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc")


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process of session `sid` (the driver started its own)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
            if int(raw[raw.rindex(")") + 2:].split()[3]) == sid:
                out[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()  # whole: paths vary
        except (OSError, ValueError):
            continue
    return out


def wait_session_empty(sid: int, timeout: float = 30.0) -> dict[int, str]:
    """What is left of session `sid` once it is empty or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
