"""Training and evaluation data: pairs JSONL (ms-swift, FlagEmbedding, triplets) and BEIR folders.

Every reader checks what it reads where it reads it: an error names the file, the line and the
field. `skip_bad_lines=True` skips (and counts) malformed lines instead of stopping.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tasks.config import DataSource


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` and names the field."""


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


@dataclass
class ReadReport:
    path: str
    lines: int = 0
    records: int = 0
    skipped: list[str] = field(default_factory=list)  # the error message of each skipped line


# ----------------------------------------------------------------------------- JSONL

def iter_jsonl(path: str | Path, *, skip_bad_lines: bool = False,
               report: ReadReport | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; streams, never loads the whole file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    report = report if report is not None else ReadReport(str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            report.lines = lineno
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = f"{path}:{lineno}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
                if skip_bad_lines:
                    report.skipped.append(err)
                    continue
                raise DataError(err) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                err = f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                if skip_bad_lines:
                    report.skipped.append(err)
                    continue
                raise DataError(err) from None
            if not isinstance(obj, dict):
                err = f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                if skip_bad_lines:
                    report.skipped.append(err)
                    continue
                raise DataError(err)
            report.records += 1
            yield lineno, obj


def _text(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _texts(obj: dict, key: str, where: str) -> list[str]:
    value = obj.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise DataError(f"{where}: field {key!r}[{i}] must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field {key!r}[{i}] is empty")
    return value


def pairs_from_record(obj: dict[str, Any], where: str, *, instruction: str | None = None,
                      symmetric: bool = False) -> list[Pair]:
    """One JSON record -> Pairs. Formats:
    ms-swift `{"query", "response", "rejected_response": [...]}`;
    FlagEmbedding `{"query", "pos": [...], "neg": [...], "prompt"?}` (one Pair per positive);
    triplets `{"anchor", "positive", "negative"?}`.
    A record's own `instruction`/`prompt` overrides the source's."""
    own_instruction = obj.get("instruction") or obj.get("prompt")
    if own_instruction is not None and not isinstance(own_instruction, str):
        raise DataError(f"{where}: field 'instruction' must be a string")
    instr = own_instruction or instruction
    sym = bool(obj.get("symmetric", symmetric))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if "response" in obj:
        query = _text(obj, "query", where)
        positive = _text(obj, "response", where)
        negatives = _texts(obj, "rejected_response", where)
        return [Pair(query, positive, tuple(n for n in negatives if n != positive), instr, sym, meta)]
    if "pos" in obj:
        query = _text(obj, "query", where)
        positives = _texts(obj, "pos", where)
        if not positives:
            raise DataError(f"{where}: field 'pos' is empty")
        negatives = _texts(obj, "neg", where)
        return [Pair(query, p, tuple(n for n in negatives if n != p), instr, sym, meta) for p in positives]
    if "anchor" in obj:
        query = _text(obj, "anchor", where)
        positive = _text(obj, "positive", where)
        negative = _text(obj, "negative", where, required=False)
        return [Pair(query, positive, (negative,) if negative and negative != positive else (), instr, sym, meta)]
    raise DataError(f"{where}: unknown record format: expected fields query+response (ms-swift), "
                    f"query+pos (FlagEmbedding) or anchor+positive (triplets); got {sorted(obj)[:8]}")


def read_pairs(path: str | Path, *, instruction: str | None = None, symmetric: bool = False,
               limit: int | None = None, skip_bad_lines: bool = False) -> tuple[list[Pair], ReadReport]:
    report = ReadReport(str(path))
    pairs: list[Pair] = []
    for lineno, obj in iter_jsonl(path, skip_bad_lines=skip_bad_lines, report=report):
        where = f"{path}:{lineno}"
        try:
            pairs.extend(pairs_from_record(obj, where, instruction=instruction, symmetric=symmetric))
        except DataError as e:
            if not skip_bad_lines:
                raise
            report.skipped.append(str(e))
        if limit and len(pairs) >= limit:
            pairs = pairs[:limit]
            break
    return pairs, report


# ----------------------------------------------------------------------------- BEIR

@dataclass
class Beir:
    """A BEIR folder (SPEC 6): corpus {id: (title, text)}, queries {id: text}, qrels {qid: {cid: score}}."""

    path: str
    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def is_beir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "corpus.jsonl").is_file()


def _read_beir_jsonl(path: Path, kind: str, skip_bad_lines: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lineno, obj in iter_jsonl(path, skip_bad_lines=skip_bad_lines):
        where = f"{path}:{lineno}"
        if "_id" not in obj:
            raise DataError(f"{where}: missing field '_id'")
        _id = str(obj["_id"])
        if _id in out:
            raise DataError(f"{where}: duplicate _id {_id!r}")
        text = _text(obj, "text", where)
        if kind == "corpus":
            title = obj.get("title") or ""
            if not isinstance(title, str):
                raise DataError(f"{where}: field 'title' must be a string")
            out[_id] = (title, text)
        else:
            out[_id] = text
    return out


def load_beir(folder: str | Path, split: str = "test", *, skip_bad_lines: bool = False) -> Beir:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found")
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).is_file():
            raise DataError(f"{folder}: BEIR folder is missing {name}")
    corpus = _read_beir_jsonl(folder / "corpus.jsonl", "corpus", skip_bad_lines)
    queries = _read_beir_jsonl(folder / "queries.jsonl", "queries", skip_bad_lines)
    qrels: dict[str, dict[str, int]] = {}
    qpath = folder / "qrels" / f"{split}.tsv"
    with open(qpath, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (lineno == 1 and row[0] in ("query-id", "query_id", "qid")):
                continue
            where = f"{qpath}:{lineno}"
            if len(row) < 3:
                raise DataError(f"{where}: expected 3 columns query-id, corpus-id, score; got {len(row)}")
            qid, cid, score = row[0], row[1], row[2]
            try:
                value = int(float(score))
            except ValueError:
                raise DataError(f"{where}: field 'score' must be a number, got {score!r}") from None
            if qid not in queries:
                raise DataError(f"{where}: field 'query-id' {qid!r} is not in queries.jsonl")
            if cid not in corpus:
                raise DataError(f"{where}: field 'corpus-id' {cid!r} is not in corpus.jsonl")
            qrels.setdefault(qid, {})[cid] = value
    if not qrels:
        raise DataError(f"{qpath}: no judgements")
    return Beir(str(folder), corpus, queries, qrels)


def doc_text(title: str, text: str) -> str:
    return f"{title} {text}".strip() if title else text


def pairs_from_beir(beir: Beir, *, instruction: str | None = None, symmetric: bool = False) -> list[Pair]:
    """One Pair per relevant (score > 0) judgement; judged non-relevant documents are its hard negatives."""
    pairs = []
    for qid, judged in beir.qrels.items():
        negatives = tuple(doc_text(*beir.corpus[c]) for c, s in judged.items() if s <= 0)
        for cid, score in judged.items():
            if score > 0:
                pairs.append(Pair(beir.queries[qid], doc_text(*beir.corpus[cid]), negatives, instruction, symmetric,
                                  {"qid": qid, "cid": cid}))
    return pairs


# ----------------------------------------------------------------------------- sources

def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p


def load_source(src: DataSource, root: str | Path | None = None, *, skip_bad_lines: bool = False) -> list[Pair]:
    path = resolve_path(src.path, root)
    fmt = src.format
    if fmt == "auto":
        fmt = "beir" if is_beir(path) else "pairs"
    if fmt == "beir":
        pairs = pairs_from_beir(load_beir(path, src.split, skip_bad_lines=skip_bad_lines),
                                instruction=src.instruction, symmetric=src.symmetric)
        return pairs[: src.limit] if src.limit else pairs
    if path.is_dir():  # a folder of JSONL shards (synthesis / filtering output)
        files = sorted(path.glob("shard-*.jsonl")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: folder has no *.jsonl files")
    else:
        files = [path]
    pairs: list[Pair] = []
    for f in files:
        got, _ = read_pairs(f, instruction=src.instruction, symmetric=src.symmetric, skip_bad_lines=skip_bad_lines)
        pairs.extend(got)
        if src.limit and len(pairs) >= src.limit:
            return pairs[: src.limit]
    return pairs


def load_sources(sources: Iterable[DataSource], root: str | Path | None = None, *,
                 skip_bad_lines: bool = False) -> list[Pair]:
    pairs: list[Pair] = []
    for src in sources:
        pairs.extend(load_source(src, root, skip_bad_lines=skip_bad_lines))
    return pairs


# ----------------------------------------------------------------------------- writing

def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temporary file in the same folder + rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> Path:
    return write_jsonl(path, (p.to_record() for p in pairs))


def pair_from_dict(d: dict[str, Any]) -> Pair:
    return Pair(d["query"], d["positive"], tuple(d.get("negatives", ())), d.get("instruction"),
                d.get("symmetric", False), d.get("meta", {}))


def pair_to_dict(p: Pair) -> dict[str, Any]:
    return asdict(p)
