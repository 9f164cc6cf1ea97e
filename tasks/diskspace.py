"""Free-space checks before large writes (checkpoints, merged models, shards): a full disk is
reported before anything is written, naming what was being written, where, and the sizes,
instead of a half-written file and an `OSError: [Errno 28]` from deep inside a library."""

from __future__ import annotations

import shutil
from pathlib import Path

# Left free after every write: logs, temporary files and the next small write need room too.
RESERVE_BYTES = 16 * 2**20


class DiskSpaceError(OSError):
    """Not enough free space for a write; the message names the path, the need and what is free."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing(path: Path) -> Path:
    """The nearest folder of `path` that exists (the one whose filesystem will hold the write)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_free_space(path: str | Path, needed_bytes: int, what: str) -> None:
    """Raise DiskSpaceError unless the filesystem that will hold `path` has `needed_bytes` free
    plus RESERVE_BYTES."""
    where = _existing(Path(path))
    free = shutil.disk_usage(where).free
    if free < needed_bytes + RESERVE_BYTES:
        raise DiskSpaceError(
            f"{path}: not enough disk space for {what}: needs {human_bytes(needed_bytes)} "
            f"(+ {human_bytes(RESERVE_BYTES)} reserve), {human_bytes(free)} free on the filesystem of {where}")
