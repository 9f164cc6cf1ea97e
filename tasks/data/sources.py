"""The data sources of a training stage (`data:` entries in the config) read as one sequence of
pairs: BEIR folders, pairs JSONL files, folders of JSONL shards, or data catalog entries."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tasks.config import DataSource
from tasks.data.beir import is_beir, load_beir, pairs_from_beir
from tasks.data.jsonl import DataError
from tasks.data.pairs import Pair, PairChain, PairFile, pair_task


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """`path` with `~` expanded; a relative one is taken under `root` (when given)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p


def load_source(src: DataSource, root: str | Path | None = None, *, skip_bad_lines: bool = False) -> Sequence[Pair]:
    """The pairs of one data source: a BEIR folder (held in memory: evaluation-sized), a pairs
    JSONL file or folder of JSONL shards (streamed from disk, see PairFile), or a catalog entry
    (streamed from the hub once into a JSONL cache under `root`, then read like a pairs file: see
    tasks/data/catalog.py). Bad lines are skipped when `skip_bad_lines` or the source's own
    `skip_bad_lines` is set."""
    skip = skip_bad_lines or src.skip_bad_lines
    if src.catalog is not None:
        from tasks.data.catalog import load_catalog_source

        return load_catalog_source(src, root, skip_bad_lines=skip)
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
    """The pairs of all sources, in order, as one sequence (streamed where the sources are JSONL);
    its `sources` name each part's DataSource (task_balanced sampling reads their task_type)."""
    sources = list(sources)
    return PairChain((load_source(src, root, skip_bad_lines=skip_bad_lines) for src in sources), sources)


@dataclass
class SourceCheck:
    """A look at one source without training (`q3e data check`): its kind (file, BEIR, catalog), the
    task types of its pairs, how many pairs it gives (`complete`: all of them were counted; else a
    bounded scan of a stream found at least `pairs`, in `rows` rows) and its first pair."""

    kind: str
    tasks: list[str]
    pairs: int
    complete: bool
    first: Pair | None
    rows: int | None = None
    limit: int | None = None


def check_source(src: DataSource, root: str | Path | None = None, *, max_pairs: int = 100) -> SourceCheck:
    """Read a source as training would, but a catalog entry only up to `max_pairs` pairs (streamed,
    not cached). Task types as task-balanced sampling reads them: the source's task_type, else each
    pair's (`pair_task`: its `meta.task`, else sts if symmetric, else retrieval)."""
    if src.catalog is not None:
        from tasks.data.catalog import scan

        s = scan(src, max_pairs)
        return SourceCheck("catalog", s.tasks, s.pairs, s.complete, s.first, s.rows, src.limit)
    pairs = load_source(src, root)
    path = resolve_path(src.path, root)
    kind = "BEIR" if src.format == "beir" or (src.format == "auto" and is_beir(path)) else "file"
    tasks = [src.task_type] if src.task_type else sorted({pair_task(p) for p in itertools.islice(pairs, max_pairs)})
    return SourceCheck(kind, tasks, len(pairs), True, pairs[0] if len(pairs) else None, limit=src.limit)
