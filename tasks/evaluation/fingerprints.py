"""What identifies a model, a data file or a list of texts: file-name-safe slugs and content
fingerprints (the mteb revision of a model or local task, the embedding cache's namespace and keys)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

_MODEL_FILE = re.compile(r".*\.(json|safetensors|bin|pt|model|txt|gguf)$")


def slug(text: str) -> str:
    """`text` as a short file-name-safe name (model names, task names from file names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[-80:] or "model"


def folder_fingerprint(path: str | Path, extra: str = "") -> str:
    """Hash of a model folder's file names, sizes and mtimes (config, weights, tokenizer, ST modules):
    a retrained or re-merged checkpoint in the same folder gets a new fingerprint, without reading weights."""
    path = Path(path).resolve()
    if path.is_file():
        files = [path]
    else:
        files = [p for p in path.iterdir() if p.is_file() and _MODEL_FILE.match(p.name)]
        files += [p for d in path.iterdir() if d.is_dir() and re.match(r"\d+_", d.name)
                  for p in d.rglob("*") if p.is_file()]
    h = hashlib.sha256(f"{path}|{extra}".encode())
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.relative_to(path.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def parameters_fingerprint(module, extra: str = "") -> str:
    """Hash of a live model's parameter bytes (for an in-memory model that has no folder of its own)."""
    h = hashlib.blake2b(extra.encode(), digest_size=8)
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(b)
    return h.hexdigest()


def files_revision(paths: Iterable[Path], extra: str) -> str:
    """The mteb revision of a local task: its files' paths, sizes and mtimes plus its sampling settings."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]
