"""Offline mteb tasks from local files: a BEIR folder as a retrieval task, sentence pairs with gold
scores as an STS task, labelled pairs as a pair-classification task (read up front, so bad input
fails here, naming file:line:field)."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from tasks.data import DataError, iter_jsonl, load_beir
from tasks.evaluation.fingerprints import files_revision, slug

log = logging.getLogger(__name__)


def _guess_lang(texts: Iterable[str]) -> str:
    sample = "".join(t for _, t in zip(range(20), texts))
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in sample)
    return "cmn-Hans" if cjk > len(sample) * 0.2 else "eng-Latn"


def _metadata(name: str, type_: str, main_score: str, path: Path, revision: str, lang: str, description: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, description=description, dataset={"path": str(path), "revision": revision},
                        type=type_, category="t2t", modalities=["text"], eval_splits=["test"],
                        eval_langs=[lang], main_score=main_score)


def _local_task(base: type, metadata, data: Any, **attrs):
    """An instance of a one-off subclass of an mteb AbsTask whose metadata is a class attribute (mteb's
    `unload_data` drops instance-level metadata) and whose `load_data` hands over data read up front."""

    def load_data(self, num_proc=None, **kwargs) -> None:
        if not self.data_loaded:
            self.dataset = {"default": {"test": data() if callable(data) else data}}
            self.data_loaded = True

    cls = type(f"Local{base.__name__.removeprefix('AbsTask')}Task", (base,),
               {"metadata": metadata, "load_data": load_data, **attrs})
    return cls()


def _sample(items: Sequence, n: int | None, seed: int) -> list:
    """A deterministic subsample that keeps the original order."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def beir_task(folder: str | Path, name: str | None = None, split: str = "test", *,
              max_queries: int | None = None, max_corpus: int | None = None, seed: int = 0,
              lang: str | None = None):
    """An mteb retrieval task (main score nDCG@10) from a BEIR folder: corpus.jsonl, queries.jsonl,
    qrels/<split>.tsv. Read now (bad input fails here, naming file:line:field).

    max_queries: keep this many judged queries (a fixed random sample);
    max_corpus: keep every document judged for the kept queries, plus a fixed random sample of the
    others up to this many documents in all (judged documents are never dropped).
    The task name defaults to the folder name (`xquad/en` -> `xquad-en`)."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval

    folder = Path(folder)
    beir = load_beir(folder, split)
    qids = _sample(sorted(beir.qrels), max_queries, seed)
    judged = {cid for q in qids for cid in beir.qrels[q]}
    others = [cid for cid in beir.corpus if cid not in judged]
    n_others = max(0, (max_corpus or len(beir.corpus)) - len(judged))
    if max_corpus is not None and len(judged) > max_corpus:
        log.warning("%s: the %d kept queries judge %d documents, more than max_corpus=%d; keeping them all",
                    folder, len(qids), len(judged), max_corpus)
    keep_docs = judged | set(_sample(others, n_others, seed + 1))
    doc_ids = [cid for cid in beir.corpus if cid in keep_docs]
    name = name or (folder.name if len(folder.name) > 3 else f"{folder.parent.name}-{folder.name}")
    corpus = Dataset.from_dict({"id": doc_ids, "title": [beir.corpus[c][0] for c in doc_ids],
                                "text": [beir.corpus[c][1] for c in doc_ids]})
    queries = Dataset.from_dict({"id": qids, "text": [beir.queries[q] for q in qids]})
    relevant = {q: dict(beir.qrels[q]) for q in qids}
    files = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    meta = _metadata(name, "Retrieval", "ndcg_at_10", folder,
                     files_revision(files, f"{split}|{max_queries}|{max_corpus}|{seed}"),
                     lang or _guess_lang(beir.queries.values()),
                     f"Local BEIR folder {folder} ({len(qids)} queries, {len(doc_ids)} documents)")

    def data() -> dict:  # mteb mutates relevant_docs/queries in place: hand out fresh copies
        return {"corpus": corpus, "queries": queries, "top_ranked": None,
                "relevant_docs": {q: dict(d) for q, d in relevant.items()}}

    return _local_task(AbsTaskRetrieval, meta, data)


# Column / field names accepted for each side of a pair and for its gold value (lower-cased).
SENTENCE1_FIELDS = ("sentence1", "sentence_a", "s1", "text1", "text_a", "query")
SENTENCE2_FIELDS = ("sentence2", "sentence_b", "s2", "text2", "text_b", "document")
SCORE_FIELDS = ("score", "relatedness_score", "similarity", "gold", "label")


def read_pairs_file(path: Path, value_fields: Sequence[str],
                    value_name: str) -> list[tuple[str, str, str, str]]:
    """(sentence1, sentence2, raw value, where) from a TSV (header with named columns, or bare
    `s1 TAB s2 TAB value`) or a JSONL of {sentence1, sentence2, <value>}."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[tuple[str, str, str, str]] = []
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            keys = {k.lower(): k for k in obj}
            fields = []
            for names, label in ((SENTENCE1_FIELDS, "sentence1"), (SENTENCE2_FIELDS, "sentence2"),
                                 (value_fields, value_name)):
                key = next((keys[n] for n in names if n in keys), None)
                if key is None or obj[key] is None:
                    raise DataError(f"{where}: missing field {label!r}")
                fields.append(obj[key])
            s1, s2, value = fields
            for label, s in (("sentence1", s1), ("sentence2", s2)):
                if not isinstance(s, str) or not s.strip():
                    raise DataError(f"{where}: field {label!r} must be a non-empty string")
            rows.append((s1, s2, str(value), where))
        return rows
    lines = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):  # "\n" only: the line numbers editors show
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
    cols = None
    first = [c.strip().lower() for c in lines[0].split("\t")] if lines else []
    if any(c in SENTENCE1_FIELDS for c in first) and any(c in SENTENCE2_FIELDS for c in first):
        value_col = next((first.index(v) for v in value_fields if v in first), None)
        if value_col is None:
            raise DataError(f"{path}:1: header has no {value_name} column (one of {', '.join(value_fields)})")
        cols = (next(first.index(c) for c in SENTENCE1_FIELDS if c in first),
                next(first.index(c) for c in SENTENCE2_FIELDS if c in first), value_col)
        lines = lines[1:]
        start = 2
    else:
        start = 1
    for lineno, line in enumerate(lines, start):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{path}:{lineno}"
        if cols is None:
            if len(parts) != 3:
                raise DataError(f"{where}: expected 3 tab-separated columns sentence1, sentence2, "
                                f"{value_name}; got {len(parts)}")
            c1, c2, cv = 0, 1, 2
        else:
            c1, c2, cv = cols
            if len(parts) <= max(cols):
                raise DataError(f"{where}: expected at least {max(cols) + 1} tab-separated columns, "
                                f"got {len(parts)}")
        for label, c in (("sentence1", c1), ("sentence2", c2)):
            if not parts[c].strip():
                raise DataError(f"{where}: field {label!r} is empty")
        rows.append((parts[c1], parts[c2], parts[cv].strip(), where))
    if not rows:
        raise DataError(f"{path}: no pairs")
    return rows


def sts_task(path: str | Path, name: str | None = None, *, max_pairs: int | None = None, seed: int = 0,
             lang: str | None = None):
    """An mteb STS task (main score: Spearman of cosine similarities) from sentence pairs with gold
    scores: STS-Benchmark TSV (header with sentence1/sentence2/score), SICK (sentence_A/sentence_B/
    relatedness_score), bare `s1 TAB s2 TAB score` (Chinese STS-B .data), or JSONL
    {sentence1, sentence2, score}."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskSTS

    path = Path(path)
    rows = _sample(read_pairs_file(path, SCORE_FIELDS, "score"), max_pairs, seed)
    scores = []
    for _, _, raw, where in rows:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: field 'score' must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: field 'score' must be finite, got {raw!r}")
        scores.append(value)
    if len(rows) < 2 or min(scores) == max(scores):
        raise DataError(f"{path}: an STS set needs at least two pairs with different scores")
    ds = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                            "score": scores})
    name = name or slug(path.stem)
    meta = _metadata(name, "STS", "cosine_spearman", path, files_revision([path], f"{max_pairs}|{seed}"),
                     lang or _guess_lang(r[0] for r in rows), f"Local STS pairs {path} ({len(rows)} pairs)")
    # Spearman/Pearson do not depend on the score range; min/max only normalise the gold scores.
    return _local_task(AbsTaskSTS, meta, ds, min_score=min(scores), max_score=max(scores))


def pair_classification_task(path: str | Path, name: str | None = None, *, max_pairs: int | None = None,
                             seed: int = 0, lang: str | None = None):
    """An mteb pair-classification task (main score: max average precision over similarity functions)
    from labelled pairs: `s1 TAB s2 TAB label` (label 0/1) or JSONL {sentence1, sentence2, label}."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskPairClassification

    path = Path(path)
    rows = _sample(read_pairs_file(path, ("label", "labels"), "label"), max_pairs, seed)
    labels = []
    for _, _, raw, where in rows:
        if raw not in ("0", "1", "0.0", "1.0"):
            raise DataError(f"{where}: field 'label' must be 0 or 1, got {raw!r}")
        labels.append(int(float(raw)))
    if len(set(labels)) < 2:
        raise DataError(f"{path}: a pair-classification set needs both labels 0 and 1")
    ds = Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                            "labels": labels})
    name = name or slug(path.stem)
    meta = _metadata(name, "PairClassification", "max_ap", path,
                     files_revision([path], f"{max_pairs}|{seed}"), lang or _guess_lang(r[0] for r in rows),
                     f"Local labelled pairs {path} ({len(rows)} pairs)")
    return _local_task(AbsTaskPairClassification, meta, ds)
