"""A first stage: each query's top-k documents of a retrieval run, kept so that every reranker reranks
the same candidates (the paper's Table 4 reranks one fixed top-100 for every reranker).

The file (JSON) made by `eval.save_first_stage`, read by `eval.first_stage`:

    {"model": ..., "revision": ..., "dim": null, "top_k": 100,
     "tasks": {task: {qid: {docid: score, ...}, ...}, ...}}

best document first. A task with several subsets or eval splits (multilingual retrieval) keeps
mteb's prediction layout instead, {subset: {split: {qid: {docid: score}}}}. A bare
{task: {qid: {docid: score}}} without the header is read too, so a first stage from another system
(BM25, a TREC run turned into JSON) can be written by hand. Only the scores' order matters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tasks.data import DataError, atomic_write_text
from tasks.data.jsonl import read_json_object

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]          # {qid: {docid: score}}
Cells = dict[str, dict[str, Run]]          # {subset: {split: run}}: mteb's prediction layout


def truncate_run(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Each query's k highest-scored documents, best first. Ties keep the run's order: the same
    selection as mteb's `AbsTaskRetrieval.convert_to_reranking`, so a saved first stage, read
    back, reranks exactly what reranking the run directly does."""
    return {q: {d: float(docs[d]) for d in sorted(docs, key=lambda d: docs[d], reverse=True)[:k]}
            for q, docs in run.items()}


def read_predictions(path: str | Path) -> Cells:
    """mteb's prediction file of a retrieval task (`mteb.evaluate(..., prediction_folder=...)`):
    {subset: {split: run}}, without its model header."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {subset: splits for subset, splits in data.items() if subset != "mteb_model_meta"}


def _file_layout(cells: Cells) -> Run | Cells:
    """The plain {qid: {docid: score}} for a task with one subset `default` and one split."""
    if list(cells) == ["default"] and len(cells["default"]) == 1:
        return next(iter(cells["default"].values()))
    return cells


@dataclass
class FirstStage:
    """A first-stage file: `tasks` holds each task's entry as written (a run, or mteb's cells)."""

    path: Path
    tasks: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "FirstStage":
        path = Path(path)
        data = read_json_object(path, "first-stage file", "{task: {qid: {docid: score}}}")
        if isinstance(data.get("tasks"), dict):
            tasks, meta = data["tasks"], {k: v for k, v in data.items() if k != "tasks"}
        else:
            tasks, meta = data, {}
        for name, entry in tasks.items():
            _check_entry(entry, f"{path}: task {name!r}")
        return cls(path, tasks, meta)

    def cells(self, task) -> Cells:
        """The first stage of an mteb retrieval task, as {subset: {split: run}} over the task's loaded
        data. Refuses a task the file lacks, a layout that does not fit the task, and documents
        that are not in the task's corpus (naming the file, task, query and document)."""
        name = task.metadata.name
        where = f"{self.path}: task {name!r}"
        if name not in self.tasks:
            raise DataError(f"{self.path}: no first stage for task {name!r} (the file has: "
                            f"{', '.join(sorted(self.tasks)) or 'no task'})")
        entry = self.tasks[name]
        wanted = [(subset, split) for subset in task.dataset for split in task.dataset[subset]]
        if _is_run(entry):
            if len(wanted) != 1:
                raise DataError(f"{where}: the task has {len(wanted)} subsets/splits "
                                f"({', '.join(f'{a}/{b}' for a, b in wanted)}); give {{subset: {{split: "
                                f"{{qid: {{docid: score}}}}}}}}")
            subset, split = wanted[0]
            cells = {subset: {split: entry}}
        else:
            cells = entry
        out: Cells = {}
        for subset, split in wanted:
            run = cells.get(subset, {}).get(split)
            if run is None:
                raise DataError(f"{where}: no run for subset {subset!r}, split {split!r}")
            data = task.dataset[subset][split]
            docs, queries = set(data["corpus"]["id"]), set(data["queries"]["id"])
            for qid, ranked in run.items():
                if qid not in queries:
                    raise DataError(f"{where}: query {qid!r} is not a query of the task ({subset}/{split})")
                unknown = next((d for d in ranked if d not in docs), None)
                if unknown is not None:
                    raise DataError(f"{where}: query {qid!r}: document {unknown!r} is not in the task's "
                                    f"corpus ({subset}/{split}; made with other max_corpus/max_queries?)")
            missing = len(queries - set(run))
            if missing:
                log.warning("%s: %d of %d queries have no first-stage documents (%s/%s); they score 0",
                            where, missing, len(queries), subset, split)
            out.setdefault(subset, {})[split] = run
        return out


def _is_run(entry: Mapping) -> bool:
    """{qid: {docid: score}} (True) or {subset: {split: {qid: ...}}} (False): the first leaf decides."""
    for value in entry.values():
        for inner in value.values():
            return not isinstance(inner, dict)
    return True  # no document anywhere: an (empty) run


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not all(isinstance(v, dict) for v in entry.values()):
        raise DataError(f"{where}: expected {{qid: {{docid: score}}}} or {{subset: {{split: {{qid: "
                        f"{{docid: score}}}}}}}}")
    runs = [entry] if _is_run(entry) else [run for splits in entry.values() for run in splits.values()]
    for run in runs:
        if not isinstance(run, dict):
            raise DataError(f"{where}: a split must map qid -> {{docid: score}}")
        for qid, docs in run.items():
            if not isinstance(docs, dict):
                raise DataError(f"{where}: query {qid!r} must map docid -> score")
            bad = next((d for d, s in docs.items()
                        if isinstance(s, bool) or not isinstance(s, (int, float))), None)
            if bad is not None:
                raise DataError(f"{where}: query {qid!r}: the score of {bad!r} must be a number, "
                                f"got {docs[bad]!r}")


def write_first_stage(path: str | Path, runs: Mapping[str, Cells], *, model: str, revision: str,
                      dim: int | None, k: int) -> Path:
    """Write {task: cells} (each query's top k already) as a first-stage file, atomically."""
    record = {"model": model, "revision": revision, "dim": dim, "top_k": k,
              "tasks": {name: _file_layout(cells) for name, cells in runs.items()}}
    return atomic_write_text(Path(path), json.dumps(record, indent=1, ensure_ascii=False))


def first_stage_path(results: str | Path) -> Path:
    """Where `eval.save_first_stage` writes beside a results JSON: `<results stem>.first_stage.json`."""
    results = Path(results)
    return results.with_name(f"{results.stem}.first_stage.json")


def rerank_from(task, cells: Cells, k: int, model_meta: Mapping[str, Any] | None = None) -> None:
    """Turn an mteb retrieval task (data loaded) into the reranking of each query's top k of `cells`:
    what `AbsTaskRetrieval.convert_to_reranking` does from a prediction file, from any first stage."""
    task._top_k = k
    task._previous_results_model_meta = dict(model_meta) if model_meta else None
    for subset, splits in cells.items():
        for split, run in splits.items():
            task.dataset[subset][split]["top_ranked"] = {q: list(docs) for q, docs in truncate_run(run, k).items()}
