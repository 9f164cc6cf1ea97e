"""STS sets (a TSV of scored sentence pairs) converted to what the pipeline reads: a BEIR folder for
retrieval evaluation, or training pairs with hard negatives. `data.derived` builds these inside
data/ (tasks/lineage.py), so their bytes are part of the data version: change the output only on
purpose."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from tasks.data.jsonl import DataError
from tasks.data.pairs import Pair
from tasks.data.writing import atomic_write_text


def sts_to_beir(tsv: str | Path, out: str | Path, *, split: str = "dev", min_score: float = 4.0) -> Path:
    """An STS TSV (header with `split`, `score`, `sentence1`, `sentence2`) as a BEIR folder: the
    sentence1 of each pair of `split` scored >= `min_score` is a query whose one relevant document
    is its sentence2; the corpus is every distinct sentence2 of the split. Written atomically."""
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
    # names the public import path (re-exported by tasks.data); these bytes are in data.dvc's hash
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
