"""Training and evaluation data: pairs JSONL (ms-swift, FlagEmbedding, triplets) and BEIR folders.

Every reader checks what it reads where it reads it: an error names the file, the line and the
field. `skip_bad_lines=True` (or `skip_bad_lines: true` on a data source) skips malformed lines
instead, and says how many it skipped.

Training pairs stream from disk: `load_source` indexes a JSONL file once (validating every line)
and keeps only the byte offset of each pair's line, so a training set larger than memory is read
line by line in whatever order the trainer asks for.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tasks.config import DataSource
from tasks.diskspace import ensure_free_space

log = logging.getLogger(__name__)


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
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the error messages of the first skipped lines

    MAX_MESSAGES = 100  # a huge, dirty file must not fill memory with messages


def _skip_or_raise(error: str, skip_bad_lines: bool, report: ReadReport) -> None:
    if not skip_bad_lines:
        raise DataError(error)
    report.n_skipped += 1
    if len(report.skipped) < report.MAX_MESSAGES:
        report.skipped.append(error)


def _log_skipped(report: ReadReport) -> None:
    if report.n_skipped:
        log.warning("%s: skipped %d bad line(s) of %d (skip_bad_lines); first: %s", report.path,
                    report.n_skipped, report.lines, report.skipped[0])


# ----------------------------------------------------------------------------- JSONL

def _parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """The JSON object on one line of a JSONL file; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    text = text.lstrip("\ufeff")  # a byte-order mark left by some editors
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting too deep
        raise DataError(f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _jsonl_records(path: Path, skip_bad_lines: bool, report: ReadReport) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset of the line, object) for each non-blank line, streamed."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            report.lines = lineno
            try:
                obj = _parse_line(raw, f"{path}:{lineno}")
            except DataError as e:
                _skip_or_raise(str(e), skip_bad_lines, report)
                continue
            if obj is not None:
                report.records += 1
                yield lineno, start, obj


def iter_jsonl(path: str | Path, *, skip_bad_lines: bool = False,
               report: ReadReport | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; streams, never loads the whole file."""
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    for lineno, _, obj in _jsonl_records(path, skip_bad_lines, report):
        yield lineno, obj


def _check_str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can escape a lone surrogate (\\ud800), which is no text
        raise DataError(f"{where}: field {name} is not valid Unicode (lone surrogate)") from None
    return value


def _text(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    return _check_str(obj[key], repr(key), where)


def _texts(obj: dict, key: str, where: str) -> list[str]:
    value = obj.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    return [_check_str(v, f"{key!r}[{i}]", where) for i, v in enumerate(value)]


def pairs_from_record(obj: dict[str, Any], where: str, *, instruction: str | None = None,
                      symmetric: bool = False) -> list[Pair]:
    """One JSON record -> Pairs. Formats:
    ms-swift `{"query", "response", "rejected_response": [...]}`;
    FlagEmbedding `{"query", "pos": [...], "neg": [...], "prompt"?}` (one Pair per positive);
    triplets `{"anchor", "positive", "negative"?}`.
    A record's own `instruction`/`prompt` overrides the source's."""
    own_instruction = obj.get("instruction") or obj.get("prompt")
    if own_instruction is not None:
        _check_str(own_instruction, "'instruction'", where)
    instr = own_instruction or instruction
    sym = obj.get("symmetric", symmetric)
    if not isinstance(sym, bool):
        raise DataError(f"{where}: field 'symmetric' must be true or false, got {type(sym).__name__}")
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
        for lineno, offset, obj in _jsonl_records(self.path, skip_bad_lines, self.report):
            try:
                n = len(pairs_from_record(obj, f"{self.path}:{lineno}", instruction=instruction,
                                          symmetric=symmetric))
            except DataError as e:
                _skip_or_raise(str(e), skip_bad_lines, self.report)
                continue
            if limit:
                n = min(n, limit - len(self._offsets))
            self._offsets.extend([offset] * n)
            self._slots.extend(range(n))
            if limit and len(self._offsets) >= limit:
                break
        _log_skipped(self.report)
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
        obj = _parse_line(f.readline(), where)
        return pairs_from_record(obj, where, instruction=self.instruction, symmetric=self.symmetric)[self._slots[i]]


class PairChain(Sequence[Pair]):
    """Several pair sequences read as one, in order (the data sources of a training stage)."""

    def __init__(self, parts: Iterable[Sequence[Pair]]):
        self.parts = [p for p in parts if len(p)]
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


# ----------------------------------------------------------------------------- BEIR

@dataclass
class Beir:
    """A BEIR folder (SPEC 6): corpus {id: (title, text)}, queries {id: text}, qrels {qid: {cid: score}}."""

    path: str
    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def is_beir(path: str | Path) -> bool:
    """A folder with a corpus or a qrels folder (so a BEIR folder missing a file says so)."""
    p = Path(path)
    return p.is_dir() and ((p / "corpus.jsonl").is_file() or (p / "qrels").is_dir())


def _read_beir_jsonl(path: Path, kind: str, skip_bad_lines: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    report = ReadReport(str(path))
    for lineno, _, obj in _jsonl_records(path, skip_bad_lines, report):
        where = f"{path}:{lineno}"
        try:
            if obj.get("_id") is None:
                raise DataError(f"{where}: missing field '_id'")
            if not isinstance(obj["_id"], (str, int)) or isinstance(obj["_id"], bool):
                raise DataError(f"{where}: field '_id' must be a string, got {type(obj['_id']).__name__}")
            _id = str(obj["_id"])
            if _id in out:
                raise DataError(f"{where}: duplicate _id {_id!r}")
            text = _text(obj, "text", where)
            if kind == "corpus":
                title = obj.get("title") or ""
                if title:
                    _check_str(title, "'title'", where)
                out[_id] = (title, text)
            else:
                out[_id] = text
        except DataError as e:
            _skip_or_raise(str(e), skip_bad_lines, report)
    _log_skipped(report)
    return out


def _read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, Any],
                skip_bad_lines: bool) -> dict[str, dict[str, int]]:
    """`query-id <TAB> corpus-id <TAB> score` lines (an optional header first); every id must be known."""
    qrels: dict[str, dict[str, int]] = {}
    report = ReadReport(str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            report.lines = lineno
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
                row = line.split("\t")
                if not line.strip() or (lineno == 1 and row[0] in ("query-id", "query_id", "qid")):
                    continue
                if len(row) < 3:
                    raise DataError(f"{where}: expected 3 columns query-id, corpus-id, score; got {len(row)}")
                qid, cid, score = row[0], row[1], row[2]
                try:
                    value = int(float(score))
                except (ValueError, OverflowError):  # OverflowError: "inf"
                    raise DataError(f"{where}: field 'score' must be a number, got {score[:40]!r}") from None
                if qid not in queries:
                    raise DataError(f"{where}: field 'query-id' {qid[:80]!r} is not in queries.jsonl")
                if cid not in corpus:
                    raise DataError(f"{where}: field 'corpus-id' {cid[:80]!r} is not in corpus.jsonl")
            except DataError as e:
                _skip_or_raise(str(e), skip_bad_lines, report)
                continue
            qrels.setdefault(qid, {})[cid] = value
    _log_skipped(report)
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def load_beir(folder: str | Path, split: str = "test", *, skip_bad_lines: bool = False) -> Beir:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: BEIR folder not found")
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).is_file():
            raise DataError(f"{folder}: BEIR folder is missing {name}")
    corpus = _read_beir_jsonl(folder / "corpus.jsonl", "corpus", skip_bad_lines)
    queries = _read_beir_jsonl(folder / "queries.jsonl", "queries", skip_bad_lines)
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv", queries, corpus, skip_bad_lines)
    return Beir(str(folder), corpus, queries, qrels)


def sts_to_beir(tsv: str | Path, out: str | Path, *, split: str = "dev", min_score: float = 4.0) -> Path:
    """An STS TSV (header with `split`, `score`, `sentence1`, `sentence2`) as a BEIR folder: the
    sentence1 of each pair of `split` scored >= `min_score` is a query whose one relevant document
    is its sentence2; the corpus is every distinct sentence2 of the split. Written atomically."""
    import csv
    import shutil

    tsv, out = Path(tsv), Path(out)
    if not tsv.is_file():
        raise DataError(f"{tsv}: STS file not found")
    queries, corpus, qrels = [], {}, []
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"split", "score", "sentence1", "sentence2"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{tsv}:1: header lacks field(s) {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            if row["split"] != split:
                continue
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                raise DataError(f"{tsv}:{lineno}: field 'score' is not a number: {row['score']!r}") from None
            if not row["sentence1"] or not row["sentence2"]:
                raise DataError(f"{tsv}:{lineno}: field 'sentence1' or 'sentence2' is empty")
            cid = corpus.setdefault(row["sentence2"], f"d{len(corpus)}")
            if score >= min_score:
                qid = f"q{len(queries)}"
                queries.append({"_id": qid, "text": row["sentence1"]})
                qrels.append(f"{qid}\t{cid}\t1")
    if not queries:
        raise DataError(f"{tsv}: no pairs of split {split!r} scored >= {min_score}")
    tmp = out.with_name(out.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}, ensure_ascii=False) + "\n"
                                              for t, i in corpus.items()), encoding="utf-8")
    (tmp / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries),
                                       encoding="utf-8")
    (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    (tmp / "SOURCE.txt").write_text(f"{tsv.name}, split {split}, as retrieval: query = sentence1 of pairs scored "
                                    f">= {min_score}, corpus = all sentence2 of the split (tasks.data.sts_to_beir).\n"
                                    f"{len(queries)} queries, {len(corpus)} documents\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def sts_to_pairs(tsv: str | Path, out: str | Path, *, query_field: str = "sentence1",
                 positive_field: str = "sentence2", score_field: str = "score", split: str | None = None,
                 min_score: float = 4.0, max_negative_score: float = 2.0) -> Path:
    """Training pairs (ms-swift JSONL) from an STS TSV with a header: each pair scored >= `min_score`
    is (query, positive); the documents paired with the same query at <= `max_negative_score` are
    its hard negatives. `split` keeps only rows whose `split` column equals it. Written atomically."""
    import csv

    tsv = Path(tsv)
    if not tsv.is_file():
        raise DataError(f"{tsv}: STS file not found")
    positives, negatives = [], {}
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = {query_field, positive_field, score_field} | ({"split"} if split else set())
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{tsv}:1: header lacks field(s) {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            if split and row["split"] != split:
                continue
            try:
                score = float(row[score_field])
            except (TypeError, ValueError):
                raise DataError(f"{tsv}:{lineno}: field {score_field!r} is not a number: {row[score_field]!r}") from None
            q, d = row[query_field], row[positive_field]
            if not q or not d:
                raise DataError(f"{tsv}:{lineno}: field {query_field!r} or {positive_field!r} is empty")
            if score >= min_score:
                positives.append((q, d))
            elif score <= max_negative_score:
                negatives.setdefault(q, []).append(d)
    if not positives:
        raise DataError(f"{tsv}: no pairs scored >= {min_score}")
    lines = [json.dumps(Pair(q, d, tuple(negatives.get(q, ()))).to_record(), ensure_ascii=False) for q, d in positives]
    return atomic_write_text(out, "\n".join(lines) + "\n")


def doc_text(title: str, text: str) -> str:
    return f"{title} {text}".strip() if title else text


def pairs_from_beir(beir: Beir, *, instruction: str | None = None, symmetric: bool = False,
                    mine_negatives: int = 0) -> list[Pair]:
    """One Pair per relevant (score > 0) judgement; judged non-relevant documents are its hard
    negatives, topped up to `mine_negatives` with the corpus documents BM25 ranks highest for the
    query among those not judged relevant to it (tasks/mining.py)."""
    mined: dict[str, list[str]] = {}
    if mine_negatives > 0:
        from tasks.mining import mine

        ids = list(beir.corpus)
        position = {c: i for i, c in enumerate(ids)}
        qids = list(beir.qrels)
        relevant = [{position[c] for c, s in beir.qrels[q].items() if s > 0} for q in qids]
        found = mine([beir.queries[q] for q in qids], [doc_text(*beir.corpus[c]) for c in ids], relevant,
                     mine_negatives)
        mined = {q: [ids[j] for j in js] for q, js in zip(qids, found)}
    pairs = []
    for qid, judged in beir.qrels.items():
        judged_neg = [c for c, s in judged.items() if s <= 0]
        extra = [c for c in mined.get(qid, []) if c not in judged][: max(0, mine_negatives - len(judged_neg))]
        negatives = tuple(doc_text(*beir.corpus[c]) for c in judged_neg + extra)
        for cid, score in judged.items():
            if score > 0:
                pairs.append(Pair(beir.queries[qid], doc_text(*beir.corpus[cid]), negatives, instruction, symmetric,
                                  {"qid": qid, "cid": cid}))
    return pairs


# ----------------------------------------------------------------------------- sources

def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
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


# ----------------------------------------------------------------------------- writing

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


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
