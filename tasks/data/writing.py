"""Writing files so that a crash or a full disk never leaves half a file (`atomic_write_text`),
with the permissions the umask asks for (`file_mode`, `honour_umask`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tasks.diskspace import ensure_free_space


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temporary file in the same folder + rename: readers see the old or the new file.
    The free space is checked first, so a full disk leaves no partial file behind."""
    path = Path(path)
    data = text.encode("utf-8")
    ensure_free_space(path, len(data), "the file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; shared storage and other accounts need the umask's
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the process umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(folder: str | Path) -> None:
    """Give the files under `folder` that a library wrote 0600 (safetensors 0.8 writes through a
    private temporary file) the mode the umask asks for, as every other output of the project has."""
    mode = file_mode()
    if mode == 0o600:
        return
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o777 == 0o600:
            p.chmod(mode)
