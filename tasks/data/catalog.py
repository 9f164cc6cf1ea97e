"""The data catalog (conf/catalog.yaml): the paper's stage-2 data sets (Table 6) by name, each a hub
data set with the map from its real columns to a pair, and a local stand-in in its real layout.

A training source names an entry (`DataSource(catalog="msmarco", limit=N)`). Its rows are streamed
(`datasets.load_dataset(..., streaming=True)`: never all in memory), mapped to `Pair`s, and written
once to a JSONL cache under the project's `datasets/catalog/` that the trainer reads like any pairs
file: it samples batches by index (`PairFile`), which a stream cannot give. With a `limit` the rows
pass a seeded shuffle buffer first. `DataSource.offline` (set for every catalog source by
`data.catalog_offline`) reads the entry's stand-in instead, through the same code (datasets' json
builder, streaming).

Errors name the catalog file, the entry and the field (`CatalogError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import quote

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.config import CONF_DIR, DataSource
from tasks.data.beir import doc_text
from tasks.data.jsonl import DataError, iter_jsonl
from tasks.data.pairs import Pair, PairFile
from tasks.data.writing import file_mode

CATALOG_FILE = CONF_DIR / "catalog.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]   # `local` stand-ins are files of this repository
PROMPTS_FILE = CONF_DIR / "task_prompts.json"
CACHE_VERSION = 1                           # bump when the cached records change for the same inputs

TaskType = Literal["retrieval", "sts", "classification", "clustering", "bitext", "pair_classification"]
TASK_TYPES: tuple[str, ...] = TaskType.__args__
# the instruction goes on both sides of these (SPEC 1); synthesis marks sts and bitext the same way
SYMMETRIC_TASKS = {"sts", "bitext", "pair_classification"}


class CatalogError(DataError):
    """A catalog entry is invalid or does not fit its data; the message names file, entry and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Column(_Strict):
    """Where some texts are in a row (see conf/catalog.yaml): a column path, optionally titles put
    before them, sentence lists joined, and items kept by a parallel list's value."""

    column: str
    titles: str | None = None
    join: str | None = None
    where: str | None = None
    equals: Any = None
    in_: str | None = Field(None, alias="in")
    not_in: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, v: Any) -> Any:
        return {"column": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _where_needs_one_test(self) -> "Column":
        tests = sum(x is not None for x in (self.equals, self.in_, self.not_in))
        if self.where is None and tests:
            raise ValueError("equals / in / not_in need `where` (the path of the list they test)")
        if self.where is not None and tests != 1:
            raise ValueError("`where` needs exactly one of equals, in, not_in")
        return self


class Fields(_Strict):
    query: Column
    positive: Column
    negatives: Column | None = None
    instruction: Column | None = None    # a row's own instruction (wins over the entry's)
    task: Column | None = None           # a row's own task type


class Entry(_Strict):
    source: str
    hub: str | None
    config: str | list[str] | None = None
    split: str | list[str] = "train"
    files: str | list[str] | None = None
    format: Literal["json", "parquet", "csv"] = "json"
    revision: str = "main"
    license: str
    task: TaskType
    symmetric: bool | None = None
    prompt: str | None = None
    instruction: str | None = None
    fields: Fields
    rows_where: dict[str, Any] = {}
    max_negatives: int | None = Field(None, ge=0)
    local: str

    @field_validator("revision")
    @classmethod
    def _a_revision(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty revision: a commit sha, or main")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Entry":
        lists = [k for k in ("config", "split", "files") if isinstance(getattr(self, k), list)]
        if len(lists) > 1:
            raise ValueError(f"only one of config, split, files may be a list (here: {', '.join(lists)})")
        if self.files is not None and self.config is not None:
            raise ValueError("`files` are read by the `format` builder: give files or config, not both")
        if (self.prompt is None) == (self.instruction is None) and self.fields.instruction is None:
            raise ValueError("give `prompt` (a conf/task_prompts.json key) or `instruction`, one of them")
        return self

    @property
    def parts(self) -> int:
        return max(len(v) if isinstance(v, list) else 1 for v in (self.config, self.split, self.files))


class StreamSettings(_Strict):
    shuffle_buffer: int = Field(gt=0)
    seed: int
    max_negatives: int = Field(ge=0)
    cache_dir: str


class Catalog(_Strict):
    path: str
    stream: StreamSettings
    entries: dict[str, Entry]

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise CatalogError(f"{self.path}: no entry {name!r}; entries: {', '.join(self.entries)}")
        return self.entries[name]

    def instruction(self, name: str) -> str | None:
        """The entry's instruction: its own, or the conf/task_prompts.json one its `prompt` names."""
        e = self.entry(name)
        if e.instruction is not None or e.prompt is None:
            return e.instruction
        return _prompts()[e.prompt]


# ----------------------------------------------------------------------------- loading the catalog

_CACHE: dict[tuple[str, int], Catalog] = {}


def load_catalog(path: str | Path | None = None) -> Catalog:
    """conf/catalog.yaml (or `path`) validated; any error names the file, the entry and the field."""
    path = Path(path) if path is not None else CATALOG_FILE
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = _validate(path)
    return _CACHE[key]


def _validate(path: Path) -> Catalog:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CatalogError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise CatalogError(f"{path}: expected a mapping with `stream` and `entries`")
    try:
        stream = StreamSettings.model_validate(data.get("stream"))
    except ValidationError as e:
        raise CatalogError(_message(path, None, e, "stream")) from None
    entries = {}
    for name, body in data["entries"].items():
        try:
            entries[name] = Entry.model_validate(body)
        except ValidationError as e:
            raise CatalogError(_message(path, name, e)) from None
        if entries[name].prompt is not None and entries[name].prompt not in _prompts():
            raise CatalogError(f"{path}: entry {name!r}, field 'prompt': {entries[name].prompt!r} is no key "
                               f"of {PROMPTS_FILE.name}")
        if not (REPO_ROOT / entries[name].local).exists():
            raise CatalogError(f"{path}: entry {name!r}, field 'local': {REPO_ROOT / entries[name].local} "
                               f"not found")
    extra = sorted(set(data) - {"stream", "entries"})
    if extra:
        raise CatalogError(f"{path}: unknown top-level key(s) {', '.join(extra)} (expected stream, entries)")
    return Catalog(path=str(path), stream=stream, entries=entries)


def _message(path: Path, name: str | None, e: ValidationError, section: str = "") -> str:
    err = e.errors()[0]  # one line: the first problem
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    loc = ".".join(p for p in (section, loc) if p)
    what = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    got = f" (got {err['input']!r})" if loc and err["type"] not in ("extra_forbidden", "missing") else ""
    named = ", ".join(([f"entry {name!r}"] if name else []) + ([f"field {loc!r}"] if loc else []))
    return f"{path}: {named}: {what}{got}" if named else f"{path}: {what}{got}"


def _prompts() -> dict[str, str]:
    return {k: v for k, v in json.loads(PROMPTS_FILE.read_text(encoding="utf-8")).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- rows -> pairs

class _RowError(Exception):
    """A row does not fit a field; `field` names it (the message adds file and entry)."""

    def __init__(self, field_name: str, text: str):
        super().__init__(text)
        self.field = field_name


def _get(row: Any, path: str, field_name: str) -> Any:
    """The value at `a.b.c`: into records (dicts); over a list of records, the list of their values."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise _RowError(field_name, f"column {path!r} not in the row (columns here: "
                                            f"{', '.join(sorted(value)[:12])})")
            value = value[part]
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            if any(part not in v for v in value):
                raise _RowError(field_name, f"column {path!r}: a record has no {part!r}")
            value = [v[part] for v in value]
        else:
            raise _RowError(field_name, f"column {path!r}: {part!r} is inside a {type(value).__name__}, "
                                        f"not a record")
    return value


def _texts(row: dict, spec: Column, field_name: str) -> list[str]:
    """The non-empty texts `spec` points at in `row`, in order."""
    value = _get(row, spec.column, field_name)
    if spec.join is not None and isinstance(value, list) and value and all(isinstance(s, str) for s in value):
        value = [value]  # one sentence (or token) list: one text
    items = value if isinstance(value, list) else [value]
    titles = _get(row, spec.titles, field_name) if spec.titles else None
    if titles is not None and (not isinstance(titles, list) or len(titles) != len(items)):
        raise _RowError(field_name, f"titles {spec.titles!r} are not a list parallel to {spec.column!r}")
    keep = [True] * len(items)
    if spec.where is not None:
        keys = _get(row, spec.where, field_name)
        if not isinstance(keys, list) or len(keys) != len(items):
            raise _RowError(field_name, f"where {spec.where!r} is not a list parallel to {spec.column!r}")
        if spec.equals is not None:
            keep = [k == spec.equals for k in keys]
        else:
            ref = _get(row, spec.in_ or spec.not_in, field_name)
            ref = set(ref if isinstance(ref, list) else [ref])
            keep = [(k in ref) == (spec.in_ is not None) for k in keys]
    out = []
    for i, (item, kept) in enumerate(zip(items, keep)):
        if not kept or item is None:
            continue
        if isinstance(item, list) and spec.join is not None and all(isinstance(s, str) for s in item):
            item = spec.join.join(item)
        if not isinstance(item, str):
            raise _RowError(field_name, f"column {spec.column!r} holds a {type(item).__name__}, not text"
                                        + ("" if spec.join is not None else " (a list of sentences needs `join`)"))
        if not item.strip():
            continue
        title = titles[i] if titles is not None else None
        out.append(doc_text(title, item) if isinstance(title, str) and title.strip() else item)
    return out


def _one(row: dict, spec: Column | None, field_name: str) -> str | None:
    """The first text of an optional per-row field (instruction, task); None when not mapped or empty."""
    if spec is None:
        return None
    texts = _texts(row, spec, field_name)
    return texts[0] if texts else None


@dataclass
class MapStats:
    """What mapping the rows of one entry did: rows read, pairs made, rows skipped and why."""

    rows: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def pairs_from_row(row: dict, name: str, entry: Entry, *, instruction: str | None, symmetric: bool | None,
                   max_negatives: int, stats: MapStats | None = None, where: str = "") -> list[Pair]:
    """The pairs of one row (one per positive; [] for a row without a usable query or positive).
    `instruction`: the source's (a row's own mapped instruction wins); `symmetric`: the source's
    explicit choice, else the entry's, else its task type's."""
    stats = stats if stats is not None else MapStats()
    stats.rows += 1
    f = entry.fields
    for column, value in entry.rows_where.items():
        if _get(row, column, "rows_where") != value:
            stats.skip(f"rows_where {column} != {value!r}")
            return []
    queries = _texts(row, f.query, "query")
    if not queries:
        stats.skip("empty query")
        return []
    positives = _texts(row, f.positive, "positive")
    if not positives:
        stats.skip("no positive")
        return []
    negatives = _texts(row, f.negatives, "negatives") if f.negatives else []
    task = _one(row, f.task, "task") or entry.task
    if task not in TASK_TYPES:
        raise _RowError("task", f"task type {task!r} is none of {', '.join(TASK_TYPES)}")
    instr = _one(row, f.instruction, "instruction") or instruction
    sym = symmetric if symmetric is not None else (
        entry.symmetric if entry.symmetric is not None else task in SYMMETRIC_TASKS)
    meta = {"catalog": name, "task": task}
    out = []
    for p in positives:
        negs = tuple(n for n in negatives if n != p)[:max_negatives]
        out.append(Pair(queries[0], p, negs, instr, sym, meta))
    stats.pairs += len(out)
    return out


# ----------------------------------------------------------------------------- streaming

def load_arguments(name: str, entry: Entry, *, offline: bool) -> list[dict[str, Any]]:
    """The `datasets.load_dataset` keyword arguments of each stream of an entry (its parts, read in
    turn row by row): the hub data set, its files through the `format` builder, or the stand-in."""
    if offline or entry.hub is None:
        return [{"path": "json", "data_files": {"train": [str(f) for f in local_files(name, entry)]},
                 "split": "train"}]
    if entry.files is not None:
        files = entry.files if isinstance(entry.files, list) else [entry.files]
        base = f"hf://datasets/{entry.hub}@{quote(entry.revision, safe='')}"
        split = entry.split if isinstance(entry.split, str) else entry.split[0]
        return [{"path": entry.format, "data_files": {split: [f"{base}/{f}"]}, "split": split} for f in files]
    configs = entry.config if isinstance(entry.config, list) else [entry.config]
    splits = entry.split if isinstance(entry.split, list) else [entry.split]
    return [{"path": entry.hub, "name": c, "split": s, "revision": entry.revision} for c in configs for s in splits]


def local_files(name: str, entry: Entry) -> list[Path]:
    path = REPO_ROOT / entry.local
    files = (sorted(path.glob("shard-*.jsonl")) or sorted(path.glob("*.jsonl"))) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CatalogError(f"{CATALOG_FILE}: entry {name!r}, field 'local': {path} not found (or no *.jsonl)")
    return files


def stream_rows(name: str, entry: Entry, *, offline: bool, shuffle: tuple[int, int] | None = None
                ) -> Iterator[dict]:
    """The rows of an entry, streamed: its parts in turn row by row (so a bounded read sees every
    part), each through a shuffle buffer when `shuffle` = (seed, buffer size). An entry without a
    hub is the project's own JSONL (its rows need not share one schema): read line by line."""
    if entry.hub is None:  # the project's own JSONL (synthesis output): no hub layout to stand in for
        rows = (obj for f in local_files(name, entry) for _, obj in iter_jsonl(f))
        yield from (_shuffled(rows, *shuffle) if shuffle else rows)
        return
    import datasets

    streams = []
    for kwargs in load_arguments(name, entry, offline=offline):
        try:
            ds = datasets.load_dataset(**kwargs, streaming=True)
        except Exception as e:  # noqa: BLE001 - the hub's errors are many; each becomes one line
            raise _unreadable(name, entry, kwargs, e) from None
        if shuffle is not None:
            ds = ds.shuffle(seed=shuffle[0], buffer_size=shuffle[1])
        streams.append((iter(ds), kwargs))
    while streams:
        for it, kwargs in list(streams):
            try:
                yield next(it)
            except StopIteration:
                streams.remove((it, kwargs))
            except Exception as e:  # noqa: BLE001 - a stream can fail mid-way (network, a bad file)
                raise _unreadable(name, entry, kwargs, e) from None


def _shuffled(rows: Iterator[dict], seed: int, size: int) -> Iterator[dict]:
    """`rows` through a shuffle buffer of `size` (as datasets' IterableDataset.shuffle does)."""
    rng, buffer = random.Random(seed), []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _unreadable(name: str, entry: Entry, kwargs: dict, e: Exception) -> CatalogError:
    files = [f for fs in (kwargs.get("data_files") or {}).values() for f in fs]
    what = (files[0] + (f" (and {len(files) - 1} more)" if len(files) > 1 else "") if files else
            f"{kwargs['path']} {kwargs.get('name') or ''} [{kwargs['split']}]".replace("  ", " "))
    return CatalogError(f"{CATALOG_FILE}: entry {name!r}: cannot stream {what} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); without a hub, data.catalog_offline=true reads "
                        f"its stand-in {entry.local}")


def iter_pairs(src: DataSource, *, catalog: Catalog | None = None, stats: MapStats | None = None,
               shuffle: bool = False, skip_bad_rows: bool = False) -> Iterator[Pair]:
    """The pairs of a catalog source, streamed (no limit applied: the caller stops). A row that does
    not fit its entry's fields raises a CatalogError naming file, entry and field, or with
    `skip_bad_rows` is counted in `stats` and skipped."""
    catalog = catalog or load_catalog()
    name = src.catalog
    entry = catalog.entry(name)
    stats = stats if stats is not None else MapStats()
    instruction = src.instruction or catalog.instruction(name)
    symmetric = src.symmetric if "symmetric" in src.model_fields_set else None
    max_neg = entry.max_negatives if entry.max_negatives is not None else catalog.stream.max_negatives
    order = (catalog.stream.seed, catalog.stream.shuffle_buffer) if shuffle else None
    for row in stream_rows(name, entry, offline=src.offline, shuffle=order):
        try:
            yield from pairs_from_row(row, name, entry, instruction=instruction, symmetric=symmetric,
                                      max_negatives=max_neg, stats=stats)
        except _RowError as e:
            message = (f"{catalog.path}: entry {name!r}, field {e.field!r}: {e} (row {stats.rows} of "
                       f"{'the stand-in ' + entry.local if src.offline or entry.hub is None else entry.hub})")
            if not skip_bad_rows:
                raise CatalogError(message) from None
            stats.skip(f"bad row ({e.field})")


# ----------------------------------------------------------------------------- the JSONL cache

def cache_path(src: DataSource, root: str | Path | None = None, catalog: Catalog | None = None) -> Path:
    """Where the pairs of a catalog source are cached: `<root>/<stream.cache_dir>/<entry>/<key>.jsonl`,
    the key a hash of everything that decides them (the entry, the source's options, the stream)."""
    catalog = catalog or load_catalog()
    entry = catalog.entry(src.catalog)
    inputs = {"version": CACHE_VERSION, "entry": entry.model_dump(mode="json", by_alias=True),
              "instruction": catalog.instruction(src.catalog), "stream": catalog.stream.model_dump(),
              "source": src.model_dump(mode="json", include={"catalog", "offline", "limit", "instruction"}),
              "symmetric": src.symmetric if "symmetric" in src.model_fields_set else None}
    if src.offline or entry.hub is None:  # the stand-in's content decides the pairs too
        inputs["local"] = [hashlib.sha256(f.read_bytes()).hexdigest() for f in local_files(src.catalog, entry)]
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    base = Path(catalog.stream.cache_dir).expanduser()
    if not base.is_absolute() and root is not None:
        base = Path(root) / base
    return base / src.catalog / f"{key}.jsonl"


def content_keys(sources: list[DataSource], root: str | Path | None = None) -> dict[str, str]:
    """{entry: cache key} of the catalog sources among `sources`: what decides their pairs (the entry
    in conf/catalog.yaml, the source's options, the stand-in's bytes when offline). A training stage's
    key includes it, so editing an entry retrains the stages that read it; empty without catalog sources."""
    catalog = None
    keys = {}
    for src in sources:
        if src.catalog is not None:
            catalog = catalog or load_catalog()
            keys[src.catalog] = cache_path(src, root, catalog).stem
    return keys


def materialise(src: DataSource, root: str | Path | None = None, *, skip_bad_rows: bool = False) -> Path:
    """The cached JSONL of a catalog source, written on first use (streamed to disk, then renamed, so
    a crash leaves no partial cache), with `<key>.json` beside it: what was read and skipped."""
    catalog = load_catalog()
    out = cache_path(src, root, catalog)
    if out.is_file():
        return out
    entry = catalog.entry(src.catalog)
    stats = MapStats()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = 0
            for pair in iter_pairs(src, catalog=catalog, stats=stats, shuffle=src.limit is not None,
                                   skip_bad_rows=skip_bad_rows):
                f.write(json.dumps(pair.to_record(), ensure_ascii=False) + "\n")
                n += 1
                if src.limit is not None and n >= src.limit:
                    break
            f.flush()
            os.fsync(f.fileno())
        if n == 0:
            raise CatalogError(f"{catalog.path}: entry {src.catalog!r} gave no pairs from {stats.rows} rows "
                               f"(skipped: {stats.skipped or 'none'})")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {"entry": src.catalog, "hub": entry.hub, "revision": entry.revision, "offline": src.offline,
              "stand_in": entry.local if src.offline or entry.hub is None else None, "limit": src.limit,
              "rows_read": stats.rows, "pairs": n, "skipped": stats.skipped}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def load_catalog_source(src: DataSource, root: str | Path | None = None, *,
                        skip_bad_lines: bool = False) -> PairFile:
    """The pairs of a catalog source as a `PairFile` over its cache (made on first use)."""
    return PairFile(materialise(src, root, skip_bad_rows=skip_bad_lines))


# ----------------------------------------------------------------------------- a bounded look

@dataclass
class Scan:
    """What the first rows of a catalog source give: `pairs` counted up to a bound, whether the
    source ended within it (`complete`: then `pairs` is its size), the task types seen, the first pair."""

    pairs: int
    rows: int
    complete: bool
    tasks: list[str]
    first: Pair | None
    skipped: dict[str, int]


def scan(src: DataSource, max_pairs: int) -> Scan:
    """Stream a catalog source until `max_pairs` pairs (or its `limit`, or its end): `q3e data check`."""
    stats = MapStats()
    bound = min(max_pairs, src.limit) if src.limit else max_pairs
    first, n, complete, tasks = None, 0, True, set()
    for pair in iter_pairs(src, stats=stats):
        first = first or pair
        tasks.add(pair.meta["task"])
        n += 1
        if n >= bound:
            complete = False
            break
    return Scan(n, stats.rows, complete, sorted(tasks), first, stats.skipped)


def check_entries(names: list[str]) -> None:
    """Every name is an entry of a valid catalog (else a CatalogError): before a run starts."""
    if names:
        catalog = load_catalog()
        for name in names:
            catalog.entry(name)
