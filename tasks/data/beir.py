"""BEIR folders (SPEC 6): `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`, read and checked
(every judged id must be known), and turned into training pairs with their judged and mined negatives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.jsonl import (DataError, ReadReport, check_str, jsonl_records, log_skipped, skip_or_raise,
                              str_field)
from tasks.data.pairs import Pair


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
    for lineno, _, obj in jsonl_records(path, skip_bad_lines, report):
        where = f"{path}:{lineno}"
        try:
            if obj.get("_id") is None:
                raise DataError(f"{where}: missing field '_id'")
            if not isinstance(obj["_id"], (str, int)) or isinstance(obj["_id"], bool):
                raise DataError(f"{where}: field '_id' must be a string, got {type(obj['_id']).__name__}")
            _id = str(obj["_id"])
            if _id in out:
                raise DataError(f"{where}: duplicate _id {_id!r}")
            text = str_field(obj, "text", where)
            if kind == "corpus":
                title = obj.get("title") or ""
                if title:
                    check_str(title, "'title'", where)
                out[_id] = (title, text)
            else:
                out[_id] = text
        except DataError as e:
            skip_or_raise(str(e), skip_bad_lines, report)
    log_skipped(report)
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
                skip_or_raise(str(e), skip_bad_lines, report)
                continue
            qrels.setdefault(qid, {})[cid] = value
    log_skipped(report)
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


def doc_text(title: str, text: str) -> str:
    """A corpus document as one text: its title (when it has one), a space, its text."""
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
