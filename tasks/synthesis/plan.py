"""What to synthesise from each passage: passages read from files or streamed from hub corpora,
personas, persona retrieval (the top personas of a passage by cosine), the per-passage `Plan`, and
the check of the synth config."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tasks.config import HubPassages, SynthConfig
from tasks.data import DataError, doc_text, iter_jsonl, resolve_path
from tasks.synthesis.prompts import KINDS
from tasks.synthesis.text import LANGUAGE_NAMES, count_words, guess_language, truncate_words

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    language: str
    source: str  # file name


def relevant_texts(folders: Sequence[str | Path], *, root: str | Path | None = None) -> set[str]:
    """The texts (with and without title) of every document judged relevant in these BEIR folders."""
    from tasks.data import load_beir

    out: set[str] = set()
    for folder in folders:
        beir = load_beir(resolve_path(folder, root))
        for judged in beir.qrels.values():
            for cid, score in judged.items():
                if score > 0:
                    title, text = beir.corpus[cid]
                    out |= {text.strip(), doc_text(title, text.strip())}
    return out


def load_passages(paths: Sequence[str | Path | HubPassages], *, root: str | Path | None = None,
                  limit: int | None = None, exclude: set[str] | frozenset[str] = frozenset(),
                  sample_seed: int | None = None) -> list[Passage]:
    """Passages from JSONL files: BEIR corpus (`_id`, `text`, optional `title`) or any records with
    `text`/`passage` (and optional `id`/`_id`, `lang`/`language`), and from hub corpora
    (`HubPassages`, streamed: `read_hub_passages`). Several sources are interleaved (one passage of
    each in turn), so the first `limit` mix them all. Passages whose text is in `exclude` (e.g.
    `relevant_texts` of the dev sets) are skipped.

    With `sample_seed`, each file contributes a uniform random sample of its passages (reservoir
    sampling, at most `limit` held per file), in random order: corpora are often grouped by topic
    (the default English one by the query its passages are negatives of), and their first `limit`
    passages would cover a few topics. A hub corpus is too large to read to its end: its rows pass
    a seeded shuffle buffer instead (datasets' `IterableDataset.shuffle`: shard order shuffled, then
    a buffer of rows), a bounded read that is not a uniform sample. Without a seed, passages come in
    file (or hub) order."""
    if limit is None and any(isinstance(p, HubPassages) for p in paths):
        raise DataError("synth.num_passages is null (every passage) but synth.passages names a hub corpus "
                        "(streamed, too large to read to its end): set synth.num_passages")
    streams = []
    for p in paths:
        if isinstance(p, HubPassages):
            streams.append(read_hub_passages(p, root=root, seed=sample_seed))
            continue
        stream = _read_passages(resolve_path(p, root))
        if sample_seed is not None:
            rng = random.Random(f"{sample_seed}|{resolve_path(p, root).name}")
            stream = iter(_sample(stream, limit, exclude, rng))
        streams.append(stream)
    out: list[Passage] = []
    while streams:
        for stream in list(streams):
            passage = next(stream, None)
            while passage is not None and passage.text in exclude:
                passage = next(stream, None)
            if passage is None:
                streams.remove(stream)
                continue
            out.append(passage)
            if limit and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"no passages in {', '.join(p.name if isinstance(p, HubPassages) else str(p) for p in paths)}")
    return out


def _sample(stream: Iterator[Passage], k: int | None, exclude: set[str] | frozenset[str],
            rng: random.Random) -> list[Passage]:
    """A uniform random sample of k passages of the stream not in `exclude` (all when k is None),
    shuffled (Algorithm R, then a shuffle)."""
    kept: list[Passage] = []
    seen = 0
    for passage in stream:
        if passage.text in exclude:
            continue
        seen += 1
        if k is None or len(kept) < k:
            kept.append(passage)
        elif (j := rng.randrange(seen)) < k:
            kept[j] = passage
    rng.shuffle(kept)
    return kept


def _read_passages(path: Path) -> Iterator[Passage]:
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = obj.get("text") if obj.get("text") is not None else obj.get("passage")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: missing or empty field 'text' (or 'passage')")
        title = obj.get("title") or ""
        text = doc_text(title, text.strip()) if isinstance(title, str) else text.strip()
        pid = obj.get("_id", obj.get("id", f"{path.stem}:{lineno}"))
        lang = obj.get("language") or obj.get("lang")
        lang = LANGUAGE_NAMES.get(str(lang).lower(), str(lang)) if lang else guess_language(text)
        yield Passage(str(pid), text, lang, path.name)


def _row_language(value: Any) -> str | None:
    """A row's lang/language field as a language name (ISO 639-1 codes mapped), or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    return LANGUAGE_NAMES.get(value.strip().lower(), value.strip())


def read_hub_passages(src: HubPassages, *, root: str | Path | None = None, seed: int | None = None
                      ) -> Iterator[Passage]:
    """The passages of a hub corpus, streamed: `datasets.load_dataset(hub, config, split,
    streaming=True)`, or with `src.offline` its stand-in `src.local` through the same code (datasets'
    json builder), where rows of another language than `src.language` are skipped (one stand-in
    file may hold many languages). With `seed`, rows pass a seeded shuffle buffer of
    `src.shuffle_buffer` rows. Rows shorter than `src.min_words` are skipped; texts are cut to
    `src.max_words`. An error names the entry, and the row and field where a row does not fit."""
    import datasets

    if src.offline:
        if src.local is None:
            log.warning("synth.passages: %s has no local stand-in: no passages from it offline", src.name)
            return
        path = resolve_path(src.local, root)
        if not path.is_file():
            raise DataError(f"{path}: the local stand-in of synth.passages entry {src.name} not found (data.include "
                            f"must list it for the pipeline to copy it into the data folder)")
        kwargs = {"path": "json", "data_files": {"train": [str(path)]}, "split": "train"}
        what = f"its stand-in {path}"
    else:
        kwargs = {"path": src.hub, "name": src.config, "split": src.split, "revision": src.revision}
        what = f"{src.name} [{src.split}]"
    try:
        ds = datasets.load_dataset(**kwargs, streaming=True)
        if seed is not None:
            key = hashlib.sha256(f"{seed}|{src.name}".encode()).digest()[:4]
            ds = ds.shuffle(seed=int.from_bytes(key, "little"), buffer_size=src.shuffle_buffer)
        rows = iter(ds)
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; each becomes one line
        raise _unreadable(src, what, e) from None
    n = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a stream can fail mid-way (network, a bad file)
            raise _unreadable(src, what, e) from None
        n += 1
        text = row.get(src.text_field)
        if not isinstance(text, str):
            raise DataError(f"synth.passages entry {src.name} ({what}), row {n}: field {src.text_field!r} "
                            f"{'missing' if text is None else 'is not text'} (columns: {', '.join(sorted(row))})")
        own = _row_language(row.get("lang") or row.get("language"))
        if src.offline and src.language and own and own.lower() != src.language.lower():
            continue
        text = text.strip()
        if not text or count_words(text) < src.min_words:
            continue
        if src.max_words is not None:
            text = truncate_words(text, src.max_words)
        title = row.get(src.title_field) if src.title_field else None
        if isinstance(title, str) and title.strip():
            text = doc_text(title.strip(), text)
        pid = row.get(src.id_field)
        language = src.language or own or guess_language(text)
        yield Passage(str(pid) if pid is not None else f"{src.name}:{n}", text, language, src.name)


def _unreadable(src: HubPassages, what: str, e: Exception) -> DataError:
    hint = ("" if src.offline else f"; without a hub, data.catalog_offline=true reads its stand-in {src.local}"
            if src.local else "; it has no local stand-in")
    return DataError(f"synth.passages entry {src.name}: cannot stream {what} ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}){hint}")


def load_personas(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: persona file not found (one persona per line; the pipeline copies "
                        f"personahub-5k.txt into data/personas/)")
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    if not out:
        raise DataError(f"{path}: no personas")
    return out


def top_k_stable(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values, largest first, ties by the lower index: the
    first k of a stable argsort of -row, in O(columns) per row (argpartition) instead of a sort."""
    k = min(k, sims.shape[1])
    if k == sims.shape[1]:
        return np.argsort(-sims, axis=1, kind="stable")
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1:k]  # each row's k-th largest value
    out = np.empty((sims.shape[0], k), dtype=np.int64)
    for i, row in enumerate(sims):
        cand = np.flatnonzero(row >= kth[i])  # every value tied with the k-th one is a candidate
        out[i] = cand[np.argsort(-row[cand], kind="stable")[:k]]
    return out


def retrieve_personas(texts: Sequence[str], personas: Sequence[str], encoder, *, top_k: int,
                      cache: Path | None = None, chunk: int = 4096) -> list[list[str]]:
    """The top-k personas of each text by cosine (ties: earlier persona first). The persona
    matrix is cached in `cache` (.npy), since it is the same for every run. Texts are encoded and
    scored `chunk` at a time, so memory holds chunk x personas scores, never texts x personas
    (800k retrieval passages against 5k personas would be 16 GB at once)."""
    if cache is not None and cache.is_file():
        pmat = np.load(cache)
    else:
        pmat = encoder.encode(list(personas), batch_size=64)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, pmat)
            os.replace(tmp, cache)
    if pmat.shape[0] != len(personas):
        raise ValueError(f"{cache}: cached persona embeddings do not match the persona file")
    out: list[list[str]] = []
    for start in range(0, len(texts), chunk):
        qmat = encoder.encode(list(texts[start:start + chunk]), batch_size=32)
        out += [[personas[j] for j in row] for row in top_k_stable(qmat @ pmat.T, top_k)]
    return out


@dataclass
class Plan:
    """What to synthesise from one passage: drawn deterministically from (seed, passage)."""

    passage: Passage
    kind: str
    language: str                 # language of the generated text
    length: int                   # query length in words (retrieval)
    target_language: str | None   # bitext
    similarity: float | None      # sts
    personas: list[str] = field(default_factory=list)  # retrieval: candidate characters


def make_plan(passage: Passage, cfg: SynthConfig) -> Plan:
    rng = random.Random(f"{cfg.seed}|{passage.source}|{passage.id}")
    kinds = sorted(k for k, w in cfg.kinds.items() if w > 0)
    kind = rng.choices(kinds, weights=[cfg.kinds[k] for k in kinds])[0]
    language = rng.choice(cfg.languages)
    if language.lower() == "passage":  # the passage's own language: Chinese passages get Chinese queries
        language = passage.language
    length = rng.choice(cfg.query_lengths)
    targets = [lang for lang in cfg.bitext_languages if lang.lower() != passage.language.lower()]
    target = rng.choice(targets) if targets else None
    similarity = rng.choice(cfg.sts_similarity)
    return Plan(passage, kind, language, length, target, similarity)


def check_config(cfg: SynthConfig) -> None:
    unknown = sorted(set(cfg.kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"synth.kinds: unknown task kind(s) {unknown}; known: {list(KINDS)}")
    if not any(w > 0 for w in cfg.kinds.values()) or any(w < 0 for w in cfg.kinds.values()):
        raise ValueError(f"synth.kinds: weights must be >= 0 with at least one > 0, got {cfg.kinds}")
    for name in ("languages", "query_lengths", "sts_similarity"):
        if not getattr(cfg, name):
            raise ValueError(f"synth.{name} is empty")
    if cfg.kinds.get("bitext", 0) > 0 and not cfg.bitext_languages:
        raise ValueError("synth.bitext_languages is empty but synth.kinds asks for bitext pairs")
    if cfg.kinds.get("classification", 0) > 0 and len(cfg.labels) < 2:
        raise ValueError("synth.labels needs at least two labels for classification pairs")
    if cfg.generator.context_guidance != 1 and cfg.generator.backend != "transformers":
        raise ValueError(f"synth.generator.context_guidance={cfg.generator.context_guidance} needs the transformers "
                         f"backend (it runs the model on a second prompt at every step); the "
                         f"{cfg.generator.backend} backend samples plainly: set it to 1")
    if cfg.generator.structured and cfg.generator.json_prefill:
        raise ValueError("synth.generator.json_prefill and synth.generator.structured are both on: "
                         "structured decoding writes the whole answer, so it replaces the prefill; turn one "
                         "of them off")
