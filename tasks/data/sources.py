"""The data sources of a training stage (`data:` entries in the config) read as one sequence of
pairs: BEIR folders, pairs JSONL files, or folders of JSONL shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tasks.config import DataSource
from tasks.data.beir import is_beir, load_beir, pairs_from_beir
from tasks.data.jsonl import DataError
from tasks.data.pairs import Pair, PairChain, PairFile


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` with `~` expanded; a relative one is taken under `root` (when given)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p


def load_source(src: DataSource, root: str | Path | None = None, *, skip_bad_lines: bool = False) -> Sequence[Pair]:
    """The pairs of one data source: a BEIR folder (held in memory: evaluation-sized), or a pairs
    JSONL file or folder of JSONL shards (streamed from disk, see PairFile). Bad lines are skipped
    when `skip_bad_lines` or the source's own `skip_bad_lines` is set."""
    skip = skip_bad_lines or src.skip_bad_lines
    path = resolve_path(src.path, root)
    fmt = src.format
    if fmt == "auto":
        fmt = "beir" if is_beir(path) else "pairs"
    if fmt == "beir":
        pairs = pairs_from_beir(load_beir(path, src.split, skip_bad_lines=skip), instruction=src.instruction,
                                symmetric=src.symmetric, mine_negatives=src.mine_negatives)
        return pairs[: src.limit] if src.limit else pairs
    if src.mine_negatives:
        raise DataError(f"{path}: mine_negatives needs a BEIR folder (a corpus to mine from); this is a pairs file")
    if path.is_dir():  # a folder of JSONL shards (synthesis / filtering output)
        files = sorted(path.glob("shard-*.jsonl")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: folder has no *.jsonl files")
    else:
        files = [path]
    parts: list[PairFile] = []
    for f in files:
        remaining = src.limit - sum(map(len, parts)) if src.limit else None
        parts.append(PairFile(f, instruction=src.instruction, symmetric=src.symmetric, limit=remaining,
                              skip_bad_lines=skip))
        if src.limit and sum(map(len, parts)) >= src.limit:
            break
    return parts[0] if len(parts) == 1 else PairChain(parts)


def load_sources(sources: Iterable[DataSource], root: str | Path | None = None, *,
                 skip_bad_lines: bool = False) -> Sequence[Pair]:
    """The pairs of all sources, in order, as one sequence (streamed where the sources are JSONL)."""
    return PairChain(load_source(src, root, skip_bad_lines=skip_bad_lines) for src in sources)
