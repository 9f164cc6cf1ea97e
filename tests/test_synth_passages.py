"""Synthesis passages from hub corpora (`synth.passages` entries `{hub: ...}`, tasks/synthesis/plan.py):
streamed by datasets, their offline stand-ins through the same code, errors that name the entry; and
the qwen3 presets' synthesis at the paper's breadth (four kinds, many languages, cross-lingual
queries) and MRL settings, planned on the stand-ins; persona retrieval in bounded chunks, with the
results of one pass. Nothing here reaches a hub or an LLM."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from tasks.config import HubPassages, load_config
from tasks.data import DataError
from tasks.synthesis.plan import load_passages, make_plan, read_hub_passages, retrieve_personas, top_k_stable
from tasks.synthesis.run import synth_manifest

WIKI_ROWS = [  # wikimedia/wikipedia's layout (id, url, title, text); a stand-in may add `lang`
    {"id": "1", "url": "u1", "title": "Berlin", "text": "Berlin ist die Hauptstadt und ein Land der Bundesrepublik "
                                                        "Deutschland und mit rund 3,8 Millionen Einwohnern.",
     "lang": "de"},
    {"id": "2", "url": "u2", "title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine.",
     "lang": "en"},
    {"id": "3", "url": "u3", "title": "Kurz", "text": "Zu kurz.", "lang": "de"},
    {"id": "4", "url": "u4", "title": "Hamburg", "text": "Hamburg ist mit rund 1,9 Millionen Einwohnern die "
                                                         "zweitgrößte Stadt Deutschlands.", "lang": "de"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _entry(local: Path | None, **kw) -> HubPassages:
    return HubPassages(**{"hub": "wikimedia/wikipedia", "config": "20231101.de", "language": "German",
                          "title_field": "title", "min_words": 5, "max_words": 8,
                          "local": str(local) if local else None, **kw})


@pytest.fixture
def spy(monkeypatch):
    """datasets.load_dataset recorded; a hub name is answered by the local JSON rows (`spy.rows`)."""
    calls, real = [], datasets.load_dataset

    def load(**kwargs):
        calls.append(kwargs)
        if kwargs["path"] != "json":
            return real("json", data_files=str(load.rows), split="train", streaming=True)
        return real(**kwargs)

    load.calls = calls
    monkeypatch.setattr(datasets, "load_dataset", load)
    return load


def test_a_hub_corpus_is_streamed_by_datasets(spy, tmp_path):
    spy.rows = _write(tmp_path / "wiki.jsonl", WIKI_ROWS)
    got = list(read_hub_passages(_entry(spy.rows)))
    assert spy.calls == [{"path": "wikimedia/wikipedia", "name": "20231101.de", "split": "train",
                          "revision": "main", "streaming": True}]
    # online every row is the entry's language (one config per language); stubs are skipped; the
    # text is cut to max_words, the title put before it
    assert [p.id for p in got] == ["1", "2", "4"]
    assert got[0].text == "Berlin Berlin ist die Hauptstadt und ein Land der"
    assert {p.language for p in got} == {"German"} and {p.source for p in got} == {"wikimedia/wikipedia:20231101.de"}


def test_the_offline_stand_in_goes_through_the_same_streaming_code(spy, tmp_path):
    local = _write(tmp_path / "standin.jsonl", WIKI_ROWS)
    got = list(read_hub_passages(_entry(local, offline=True)))
    assert spy.calls == [{"path": "json", "data_files": {"train": [str(local)]}, "split": "train",
                          "streaming": True}]
    # a stand-in may hold many languages: its rows of another language are skipped
    assert [p.id for p in got] == ["1", "4"] and {p.language for p in got} == {"German"}
    # without `language`, a row's own lang field names it
    assert [p.language for p in read_hub_passages(_entry(local, offline=True, language=None))] == \
        ["German", "English", "German"]


def test_a_seeded_read_passes_a_shuffle_buffer_and_stops_at_the_limit(tmp_path):
    rows = [{"id": str(i), "text": f"passage number {i} " + "word " * 10} for i in range(300)]
    local = _write(tmp_path / "many.jsonl", rows)
    entry = _entry(local, offline=True, language="English", title_field=None, max_words=None, shuffle_buffer=50)
    order = [p.id for p in load_passages([entry], limit=300)]
    assert order == [str(i) for i in range(300)]
    a = [p.id for p in load_passages([entry], limit=40, sample_seed=0)]
    assert a == [p.id for p in load_passages([entry], limit=40, sample_seed=0)]   # deterministic
    assert a != order[:40] and len(set(a)) == 40
    assert a != [p.id for p in load_passages([entry], limit=40, sample_seed=1)]
    # hub entries interleave with passage files, one passage of each in turn
    other = _write(tmp_path / "other.jsonl", [{"_id": "x0", "text": "a file passage"}, {"_id": "x1", "text": "another"}])
    assert [p.id for p in load_passages([entry, other], limit=4)] == ["0", "x0", "1", "x1"]


def test_hub_entries_need_a_bound_and_errors_name_the_entry(spy, tmp_path, monkeypatch):
    local = _write(tmp_path / "standin.jsonl", WIKI_ROWS)
    with pytest.raises(DataError, match="synth.num_passages is null .* set synth.num_passages"):
        load_passages([_entry(local)], limit=None)
    spy.rows = _write(tmp_path / "bad.jsonl", [{"id": "1", "body": "no text column"}])
    with pytest.raises(DataError, match=r"entry wikimedia/wikipedia:20231101.de .*row 1: field 'text' missing "
                                        r"\(columns: body, id\)"):
        list(read_hub_passages(_entry(local)))
    with pytest.raises(DataError, match=r"nowhere.jsonl: the local stand-in of synth.passages entry "
                                        r"wikimedia/wikipedia:20231101.de not found"):
        list(read_hub_passages(_entry(tmp_path / "nowhere.jsonl", offline=True)))
    assert list(read_hub_passages(_entry(None, offline=True))) == []   # no stand-in: nothing offline

    def down(**kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", down)
    with pytest.raises(DataError, match=r"cannot stream wikimedia/wikipedia:20231101.de \[train\] \(ConnectionError: "
                                        r"no route .*data.catalog_offline=true reads its stand-in"):
        list(read_hub_passages(_entry(local)))


def test_catalog_offline_switches_the_hub_corpora_of_synthesis_to_their_stand_ins():
    online = load_config("qwen3-0.6b").synth.passages
    offline = load_config("qwen3-0.6b", ["data.catalog_offline=true"]).synth.passages
    assert all(isinstance(p, HubPassages) and not p.offline for p in online)
    assert all(p.offline for p in offline)
    # the default presets' passages stay file paths (their synthesis manifests do not change)
    assert all(isinstance(p, str) for preset in ("smol", "micro") for p in load_config(preset).synth.passages)


@pytest.mark.parametrize("preset,hidden", [("qwen3-0.6b", 1024), ("qwen3-4b", 2560), ("qwen3-8b", 4096)])
def test_the_qwen3_presets_are_the_papers_recipe(preset, hidden):
    cfg = load_config(preset)
    assert set(cfg.synth.kinds) == {"retrieval", "bitext", "sts", "classification"}
    assert max(cfg.synth.kinds, key=cfg.synth.kinds.get) == "retrieval"
    assert len({p.language for p in cfg.synth.passages}) >= 15
    assert "passage" in cfg.synth.languages and {"English", "Chinese"} <= set(cfg.synth.languages)
    for stage in (cfg.stage1, cfg.stage2):   # MRL from 32 to the full size, the full size trained too
        assert stage.loss.mrl_dims[0] == 32 and stage.loss.mrl_dims[-1] == hidden
    assert cfg.eval.dims and set(cfg.eval.dims) < set(cfg.stage2.loss.mrl_dims)
    assert cfg.eval.benchmarks == ["MTEB(Multilingual)", "MTEB(eng, v2)", "MTEB(cmn, v1)", "MTEB(Code, v1)"]
    assert cfg.eval.rerank_top_k == 100 and cfg.eval.tasks == ["MultiLongDocRetrieval"]
    # the stand-ins are in data/ when the preset restores it
    assert {p.local.removeprefix("data/") for p in cfg.synth.passages if p.local} <= set(cfg.data.include)


def test_a_qwen3_synthesis_plan_on_the_stand_ins_has_every_kind_and_many_languages(shared_data, tmp_path):
    cfg = load_config("qwen3-0.6b", ["data.catalog_offline=true", "synth.num_passages=280"]).synth
    (tmp_path / "data").symlink_to(shared_data)  # data/ as the pipeline copies it from ../shared/data
    passages, manifest = synth_manifest(cfg, tmp_path)
    plans = [make_plan(p, cfg) for p in passages]
    assert len(plans) == 280 and manifest["num_shards"] == 280 // cfg.shard_size + (280 % cfg.shard_size > 0)
    assert Counter(p.kind for p in plans).keys() == {"retrieval", "bitext", "sts", "classification"}
    assert Counter(p.kind for p in plans).most_common(1)[0][0] == "retrieval"
    languages = Counter(p.passage.language for p in plans)
    assert len(languages) == 12 and languages["English"] == languages["Chinese"] == 2 * languages["Thai"]
    retrieval = [p for p in plans if p.kind == "retrieval"]
    cross = [p for p in retrieval if p.language != p.passage.language]
    assert cross and {p.language for p in cross} == {"English", "Chinese"}
    assert {p.target_language for p in plans if p.kind == "bitext"} - {None} and \
        all(p.target_language != p.passage.language for p in plans if p.kind == "bitext")
    # every passage is its entry's language: XQuAD rows of the others were skipped
    assert {p.passage.source for p in plans} >= {"HuggingFaceFW/fineweb:sample-10BT", "HuggingFaceFW/fineweb-2:cmn_Hani",
                                                 "wikimedia/wikipedia:20231101.th"}
    assert all(p.passage.id.startswith("xquad-th-") for p in plans if p.passage.source.endswith(".th"))
    # the manifest is a function of the settings: the same plan twice
    assert synth_manifest(cfg, tmp_path)[1] == manifest


# ----------------------------------------------------------------------------- persona retrieval at scale

@pytest.mark.parametrize("seed", range(4))
def test_top_k_by_partition_is_the_stable_sorts_top_k_ties_included(seed):
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, 5, size=(50, 40)).astype(np.float32)  # few distinct values: ties everywhere
    for k in (1, 3, 7, 40):
        assert (top_k_stable(sims, k) == np.argsort(-sims, axis=1, kind="stable")[:, :k]).all(), k


class _HashEncoder:
    """A deterministic stand-in for the persona retriever: unit vectors from each text's hash."""

    def encode(self, texts, batch_size=32):
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]
        return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


def test_persona_retrieval_in_chunks_equals_all_at_once(tmp_path):
    personas = [f"persona {i}" for i in range(30)]
    texts = [f"passage {i}" for i in range(23)]
    enc = _HashEncoder()
    whole = retrieve_personas(texts, personas, enc, top_k=5, cache=tmp_path / "p.npy", chunk=len(texts))
    assert retrieve_personas(texts, personas, enc, top_k=5, cache=tmp_path / "p.npy", chunk=4) == whole
    pmat, qmat = enc.encode(personas), enc.encode(texts)
    assert whole == [[personas[j] for j in np.argsort(-row, kind="stable")[:5]] for row in qmat @ pmat.T]
