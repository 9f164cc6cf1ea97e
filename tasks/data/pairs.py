"""Training pairs from JSONL: the record formats (ms-swift, FlagEmbedding, triplets) read into
`Pair`s, and `PairFile`, which streams the pairs of a file larger than memory from disk."""

from __future__ import annotations

import bisect
import itertools
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tasks.data.jsonl import (DataError, ReadReport, check_str, jsonl_records, log_skipped, parse_line,
                              skip_or_raise, str_field, str_list_field)


@dataclass(frozen=True)
class Pair:
    """One training example: a query, its positive document and optional hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str | None = None
    symmetric: bool = False  # STS-like: the instruction goes on both sides (SPEC 1)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_record(self) -> dict[str, Any]:
        """ms-swift format (`query`, `response`, `rejected_response`) plus our fields."""
        rec: dict[str, Any] = {"query": self.query, "response": self.positive,
                               "rejected_response": list(self.negatives)}
        if self.instruction:
            rec["instruction"] = self.instruction
        if self.symmetric:
            rec["symmetric"] = True
        if self.meta:
            rec["meta"] = self.meta
        return rec


def pairs_from_record(obj: dict[str, Any], where: str, *, instruction: str | None = None,
                      symmetric: bool = False) -> list[Pair]:
    """One JSON record -> Pairs. Formats:
    ms-swift `{"query", "response", "rejected_response": [...]}`;
    FlagEmbedding `{"query", "pos": [...], "neg": [...], "prompt"?}` (one Pair per positive);
    triplets `{"anchor", "positive", "negative"?}`.
    A record's own `instruction`/`prompt` overrides the source's."""
    own_instruction = obj.get("instruction") or obj.get("prompt")
    if own_instruction is not None:
        check_str(own_instruction, "'instruction'", where)
    instr = own_instruction or instruction
    sym = obj.get("symmetric", symmetric)
    if not isinstance(sym, bool):
        raise DataError(f"{where}: field 'symmetric' must be true or false, got {type(sym).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if "response" in obj:
        query = str_field(obj, "query", where)
        positive = str_field(obj, "response", where)
        negatives = str_list_field(obj, "rejected_response", where)
        return [Pair(query, positive, tuple(n for n in negatives if n != positive), instr, sym, meta)]
    if "pos" in obj:
        query = str_field(obj, "query", where)
        positives = str_list_field(obj, "pos", where)
        if not positives:
            raise DataError(f"{where}: field 'pos' is empty")
        negatives = str_list_field(obj, "neg", where)
        return [Pair(query, p, tuple(n for n in negatives if n != p), instr, sym, meta) for p in positives]
    if "anchor" in obj:
        query = str_field(obj, "anchor", where)
        positive = str_field(obj, "positive", where)
        negative = str_field(obj, "negative", where, required=False)
        return [Pair(query, positive, (negative,) if negative and negative != positive else (), instr, sym, meta)]
    raise DataError(f"{where}: unknown record format: expected fields query+response (ms-swift), "
                    f"query+pos (FlagEmbedding) or anchor+positive (triplets); got {sorted(obj)[:8]}")


class PairFile(Sequence[Pair]):
    """The pairs of one JSONL file, parsed from disk when asked for.

    Building it reads the file once and validates every line (errors name file, line and field),
    keeping two numbers per pair: the byte offset of its line and its place among that line's
    pairs (a FlagEmbedding record with several positives gives several). So memory is ~12 bytes
    a pair whatever the texts, a training set larger than memory streams from disk in the
    trainer's seeded order, and a Ray task is sent the index, not the data."""

    def __init__(self, path: str | Path, *, instruction: str | None = None, symmetric: bool = False,
                 limit: int | None = None, skip_bad_lines: bool = False):
        self.path = Path(path)
        self.instruction = instruction
        self.symmetric = symmetric
        self.report = ReadReport(str(self.path))
        self._offsets = array("q")
        self._slots = array("i")
        for lineno, offset, obj in jsonl_records(self.path, skip_bad_lines, self.report):
            try:
                n = len(pairs_from_record(obj, f"{self.path}:{lineno}", instruction=instruction,
                                          symmetric=symmetric))
            except DataError as e:
                skip_or_raise(str(e), skip_bad_lines, self.report)
                continue
            if limit:
                n = min(n, limit - len(self._offsets))
            self._offsets.extend([offset] * n)
            self._slots.extend(range(n))
            if limit and len(self._offsets) >= limit:
                break
        log_skipped(self.report)
        st = self.path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range: {self.path} has {n} pairs")
        with self._open() as f:
            return self._read(f, i % n)

    def __iter__(self) -> Iterator[Pair]:
        with self._open() as f:
            for i in range(len(self)):
                yield self._read(f, i)

    def _open(self):
        f = open(self.path, "rb")
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            f.close()
            raise DataError(f"{self.path}: file changed since it was indexed; load the data again")
        return f

    def _read(self, f, i: int) -> Pair:
        f.seek(self._offsets[i])
        where = f"{self.path} (byte {self._offsets[i]})"
        obj = parse_line(f.readline(), where)
        return pairs_from_record(obj, where, instruction=self.instruction, symmetric=self.symmetric)[self._slots[i]]


class PairChain(Sequence[Pair]):
    """Several pair sequences read as one, in order (the data sources of a training stage).
    `sources`, one per part, says where each part came from (`load_sources`: its DataSource);
    empty parts are dropped with theirs."""

    def __init__(self, parts: Iterable[Sequence[Pair]], sources: Iterable[Any] | None = None):
        parts = list(parts)
        sources = [None] * len(parts) if sources is None else list(sources)
        if len(sources) != len(parts):
            raise ValueError(f"PairChain: {len(sources)} sources for {len(parts)} parts")
        kept = [(p, s) for p, s in zip(parts, sources) if len(p)]
        self.parts = [p for p, _ in kept]
        self.sources = [s for _, s in kept]
        self._ends = list(itertools.accumulate(len(p) for p in self.parts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range: {n} pairs")
        i %= n
        k = bisect.bisect_right(self._ends, i)
        return self.parts[k][i - (self._ends[k - 1] if k else 0)]

    def __iter__(self) -> Iterator[Pair]:
        for part in self.parts:
            yield from part


def read_pairs(path: str | Path, *, instruction: str | None = None, symmetric: bool = False,
               limit: int | None = None, skip_bad_lines: bool = False) -> tuple[list[Pair], ReadReport]:
    """All pairs of a JSONL file in memory (see PairFile for the streamed form)."""
    pairs = PairFile(path, instruction=instruction, symmetric=symmetric, limit=limit, skip_bad_lines=skip_bad_lines)
    return list(pairs), pairs.report


def pair_task(pair: Pair) -> str:
    """A pair's task type when its source names none: a synthetic pair's `meta.task` (retrieval,
    bitext, sts, classification), else sts for a symmetric pair, else retrieval."""
    task = pair.meta.get("task") if pair.meta else None
    if isinstance(task, str) and task:
        return task
    return "sts" if pair.symmetric else "retrieval"
