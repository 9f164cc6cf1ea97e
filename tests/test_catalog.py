"""The data catalog (conf/catalog.yaml, tasks/data/catalog.py): each entry's field mapping on its local
stand-in in the hub data set's real layout, errors that name file, entry and field, the streaming path
(datasets' streaming loader, the hub's arguments), the JSONL cache the trainer reads, the presets that
name the entries, and `q3e data check`. Nothing here reaches a hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from flows.cli import main
from tasks.config import ConfigError, DataSource, load_config
from tasks.data import load_source
from tasks.data.catalog import (CATALOG_FILE, REPO_ROOT, CatalogError, MapStats, cache_path, iter_pairs,
                                load_arguments, load_catalog)

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = json.loads((ROOT / "conf" / "task_prompts.json").read_text())
TABLE6 = {"msmarco", "nq", "hotpotqa", "nli", "dureader", "t2ranking", "simclue", "miracl", "mldr", "mrtydi",
          "multi_cpr", "codesearchnet"}


def rows(name: str) -> list[dict]:
    """The stand-in's rows as its file holds them (the hub's layout)."""
    return [json.loads(line) for line in open(REPO_ROOT / load_catalog().entries[name].local, encoding="utf-8")]


def pairs(name: str, stats: MapStats | None = None, **source):
    return list(iter_pairs(DataSource(catalog=name, offline=True, **source), stats=stats))


# ----------------------------------------------------------------------------- the mapping of each entry

def _first(row: dict, name: str) -> tuple[str, str, list[str]]:
    """The first pair of a stand-in's first row, read off the row by hand: (query, positive, negatives)."""
    if name == "msmarco":
        p = row["passages"]
        texts = p["passage_text"]
        return row["query"], texts[p["is_selected"].index(1)], [t for t, s in zip(texts, p["is_selected"]) if s == 0]
    if name == "nq":
        return row["query"], row["answer"], []
    if name == "hotpotqa":
        c, gold = row["context"], set(row["supporting_facts"]["title"])
        paras = [f"{t} {''.join(s)}" for t, s in zip(c["title"], c["sentences"])]
        return (row["question"], next(p for t, p in zip(c["title"], paras) if t in gold),
                [p for t, p in zip(c["title"], paras) if t not in gold])
    if name == "nli":
        return row["anchor"], row["positive"], [row["negative"]]
    if name == "codesearchnet":
        return row["func_documentation_string"], " ".join(row["func_code_tokens"]), []
    if name in ("dureader", "t2ranking", "miracl"):
        return row["query"], row["pos"][0], row["neg"]
    if name == "simclue":
        row = next(r for r in rows(name) if r["label"] == 1)
        return row["text1"], row["text2"], []
    if name.startswith("multi_cpr"):
        return row["query"], row["positive"][0], row["negative"]
    if name == "mldr":
        return row["query"], row["positive_passages"][0]["text"], [p["text"] for p in row["negative_passages"]]
    if name == "mrtydi":
        doc = lambda p: f"{p['title']} {p['text']}"  # noqa: E731
        return row["query"], doc(row["positive_passages"][0]), [doc(p) for p in row["negative_passages"]]
    if name == "synthetic_smol":
        return row["query"], row["response"], row["rejected_response"]
    raise AssertionError(f"no expectation for {name}")


@pytest.mark.parametrize("name", sorted(load_catalog().entries))
def test_each_entry_maps_its_stand_in_as_read_off_the_row(name):
    entry = load_catalog().entries[name]
    if entry.hub is None:  # a folder of the project's own shards
        first_file = sorted((REPO_ROOT / entry.local).glob("shard-*.jsonl"))[0]
        row = json.loads(first_file.open(encoding="utf-8").readline())
    else:
        row = rows(name)[0]
        assert (REPO_ROOT / entry.local).stat().st_size < 20_000
    got = pairs(name)
    query, positive, negatives = _first(row, name)
    assert (got[0].query, got[0].positive, list(got[0].negatives)) == (query, positive, negatives)
    assert got[0].meta["catalog"] == name
    assert all(p.instruction for p in got)
    if entry.prompt and entry.fields.instruction is None:
        assert got[0].instruction == PROMPTS[entry.prompt]


def test_table6_is_in_the_catalog_with_a_hub_name_split_revision_licence_and_task():
    cat = load_catalog()
    names = {n.rsplit("_", 1)[0] if n.startswith("multi_cpr") else n for n in cat.entries}
    assert TABLE6 <= names
    for name, e in cat.entries.items():
        if e.hub is not None:
            assert e.split and e.revision and e.license and e.task, name
            assert (REPO_ROOT / e.local).is_file(), name


def test_rows_without_a_positive_or_outside_rows_where_are_skipped_and_counted():
    stats = MapStats()
    got = pairs("msmarco", stats)
    assert stats.rows == 4 and len(got) == 3 and stats.skipped == {"no positive": 1}
    assert rows("msmarco")[2]["answers"] == ["No Answer Present."]  # no passage selected: no pair
    stats = MapStats()
    got = pairs("simclue", stats)
    assert len(got) == sum(r["label"] == 1 for r in rows("simclue")) == 2
    assert stats.skipped == {"rows_where label != 1": 4}


def test_hotpotqa_gives_a_pair_per_supporting_paragraph_with_the_distractors_as_negatives():
    got = pairs("hotpotqa")
    first = [p for p in got if p.query.startswith("Which magazine")]
    assert [p.positive[:40] for p in first] == ["Arthur's Magazine Arthur's Magazine (184",
                                                "First for Women First for Women is a wom"]
    assert first[1].positive.endswith("USA. The magazine was started in 1989.")  # sentences joined
    assert all(len(p.negatives) == 3 and not any("Arthur's" in n for n in p.negatives) for p in first)
    oberoi = [p for p in got if "Oberoi" in p.query]
    assert len(oberoi) == 2  # "Oberoi family" is named twice in supporting_facts: one positive


def test_code_positives_leave_out_the_docstring_that_is_the_query():
    for row, p in zip(rows("codesearchnet"), pairs("codesearchnet")):
        first_line = p.query.splitlines()[0]
        assert first_line in row["func_code_string"]  # the layout's code string holds the docstring
        assert first_line not in p.positive and '"""' not in p.positive and p.positive.startswith("def ")


def test_symmetric_follows_the_task_type_unless_the_entry_or_the_source_says():
    assert all(p.symmetric for p in pairs("simclue"))           # pair_classification: both sides
    assert not any(p.symmetric for p in pairs("nli"))           # pair_classification, symmetric: false
    assert not any(p.symmetric for p in pairs("msmarco"))
    assert all(p.symmetric for p in pairs("msmarco", symmetric=True))
    syn = pairs("synthetic_smol")
    assert {p.meta["task"] for p in syn} == {"retrieval", "sts", "bitext", "classification"}
    assert all(p.symmetric == (p.meta["task"] in ("sts", "bitext")) for p in syn)   # synthesis's own rule


def test_a_rows_own_instruction_wins_then_the_sources_then_the_entrys():
    assert pairs("msmarco", instruction="Find it")[0].instruction == "Find it"
    syn = pairs("synthetic_smol", instruction="ignored: rows carry their own")
    assert {p.instruction for p in syn} >= {"Classify the topic of the given text"}
    assert "ignored: rows carry their own" not in {p.instruction for p in syn}


# ----------------------------------------------------------------------------- errors name file, entry, field

def _catalog(tmp_path: Path, entry: dict, name: str = "bad") -> Path:
    text = {"stream": {"shuffle_buffer": 10, "seed": 0, "max_negatives": 5, "cache_dir": "datasets/catalog"},
            "entries": {name: entry}}
    path = tmp_path / "catalog.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


GOOD = {"source": "x", "hub": "org/set", "split": "train", "license": "MIT", "task": "retrieval", "prompt": "NQ",
        "fields": {"query": "query", "positive": "answer"}, "local": "tests/data/catalog/nq.jsonl"}


@pytest.mark.parametrize("change, field, words", [
    ({"task": "regression"}, "task", "Input should be 'retrieval'"),
    ({"fields": {"query": "query"}}, "fields.positive", "Field required"),
    ({"fields": {"query": {"colum": "query"}, "positive": "answer"}}, "fields.query", ""),
    ({"fields": {"query": "q", "positive": {"column": "a", "equals": 1}}}, "fields.positive", "need `where`"),
    ({"prompt": "NoSuchTask"}, "prompt", "is no key of task_prompts.json"),
    ({"licence": "MIT"}, "licence", "unknown field"),
    ({"revision": " "}, "revision", "empty revision"),
    ({"local": "tests/data/catalog/nope.jsonl"}, "local", "nope.jsonl not found"),
])
def test_a_bad_entry_is_an_error_naming_the_file_the_entry_and_the_field(tmp_path, change, field, words):
    path = _catalog(tmp_path, GOOD | change)
    with pytest.raises(CatalogError) as e:
        load_catalog(path)
    message = str(e.value)
    assert message.startswith(f"{path}: entry 'bad', field '{field}") and words in message
    assert "\n" not in message


def test_an_entry_that_does_not_fit_its_rows_names_the_field_and_the_column(tmp_path, monkeypatch):
    path = _catalog(tmp_path, GOOD | {"fields": {"query": "query", "positive": "answr"}}, name="nq")
    monkeypatch.setattr("tasks.data.catalog.CATALOG_FILE", path)
    with pytest.raises(CatalogError, match=rf"^{path}: entry 'nq', field 'positive': column 'answr' not in the row "
                                           r"\(columns here: answer, query\) \(row 1 of the stand-in "):
        pairs("nq")
    stats = MapStats()  # skip_bad_lines on the source: counted, skipped
    assert list(iter_pairs(DataSource(catalog="nq", offline=True), stats=stats, skip_bad_rows=True)) == []
    assert stats.skipped == {"bad row (positive)": 5}


def test_an_unknown_entry_names_the_catalog_and_its_entries():
    with pytest.raises(CatalogError, match=r"catalog.yaml: no entry 'msmarc'; entries: msmarco, nq,"):
        pairs("msmarc")


def test_without_a_hub_a_hub_entry_is_one_error_that_points_at_the_stand_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CatalogError, match=r"entry 'nq': cannot stream sentence-transformers/natural-questions "
                                           r"pair \[train\] .*data.catalog_offline=true reads its stand-in "
                                           r"tests/data/catalog/nq.jsonl"):
        list(iter_pairs(DataSource(catalog="nq")))


# ----------------------------------------------------------------------------- streaming

def test_stand_ins_are_streamed_by_datasets_as_the_hub_sets_are(monkeypatch):
    calls, real = [], datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert len(pairs("nq")) == 5
    assert calls == [{"path": "json", "data_files": {"train": [str(REPO_ROOT / "tests/data/catalog/nq.jsonl")]},
                      "split": "train", "streaming": True}]


def test_the_hub_path_streams_each_part_and_reads_them_in_turn(monkeypatch):
    """The hub's arguments (a stand-in answers in its place): configs and splits by name, script-less
    files through hf:// URLs at the revision; several parts are read row by row in turn."""
    calls, real = [], datasets.load_dataset
    offline = [p.query for p in pairs("msmarco")]

    def hub(**kwargs):
        calls.append(kwargs)
        name = "mldr" if kwargs["path"] == "json" else "msmarco"
        return real("json", data_files=str(REPO_ROOT / f"tests/data/catalog/{name}.jsonl"), split="train",
                    streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    got = list(iter_pairs(DataSource(catalog="msmarco")))
    assert calls == [{"path": "microsoft/ms_marco", "name": "v2.1", "split": "train", "revision": "main",
                      "streaming": True}]
    assert [p.query for p in got] == offline

    calls.clear()
    got = list(iter_pairs(DataSource(catalog="mldr")))
    assert len(calls) == 13 and calls[0] == {
        "path": "json", "data_files": {"train": ["hf://datasets/Shitao/MLDR@main/mldr-v1.0-ar/train.jsonl.gz"]},
        "split": "train", "streaming": True}
    first_queries = [r["query"] for r in rows("mldr")]
    assert [p.query for p in got[:13]] == [first_queries[0]] * 13  # every part's first row, then the second rows
    assert len(got) == 13 * 3


def test_list_valued_configs_and_splits_become_one_stream_each():
    cat = load_catalog()
    csn = load_arguments("codesearchnet", cat.entries["codesearchnet"], offline=False)
    assert [a["name"] for a in csn] == ["go", "java", "javascript", "php", "python", "ruby"]
    miracl = load_arguments("miracl", cat.entries["miracl"], offline=False)
    assert {a["path"] for a in miracl} == {"cfli/bge-e5data"} and miracl[0]["split"] == "miracl_ar"


# ----------------------------------------------------------------------------- the cache the trainer reads

def test_a_catalog_source_is_cached_as_jsonl_under_the_project_and_read_like_a_pairs_file(tmp_path):
    src = DataSource(catalog="msmarco", offline=True, limit=2)
    got = load_source(src, tmp_path)
    path = cache_path(src, tmp_path)
    assert len(got) == 2 and path.is_file() and path.parent == tmp_path / "datasets" / "catalog" / "msmarco"
    assert got[0].instruction == PROMPTS["MSMARCO"] and got[1].meta == {"catalog": "msmarco", "task": "retrieval"}
    assert {p.query for p in got} <= {p.query for p in pairs("msmarco")}
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["pairs"] == 2 and record["stand_in"] == "tests/data/catalog/msmarco.jsonl"
    stamp = path.stat().st_mtime_ns
    assert [p.query for p in load_source(src, tmp_path)] == [p.query for p in got]   # reused, not rewritten
    assert path.stat().st_mtime_ns == stamp
    everything = load_source(DataSource(catalog="msmarco", offline=True), tmp_path)
    assert len(everything) == 3 and cache_path(DataSource(catalog="msmarco", offline=True), tmp_path) != path
    assert not list(path.parent.glob(".*.tmp"))


def test_path_sources_are_read_as_before(shared_data):
    src = DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=3)
    assert [p.query for p in load_source(src)] == [r["anchor"] for r in rows("nli")[:3]]


# ----------------------------------------------------------------------------- configuration and presets

def test_a_source_names_a_path_or_a_catalog_entry():
    with pytest.raises(ValueError, match="names a path or a catalog entry"):
        DataSource()
    with pytest.raises(ValueError, match="names a path or a catalog entry"):
        DataSource(path="a.jsonl", catalog="nq")
    with pytest.raises(ValueError, match="mine_negatives needs a BEIR folder"):
        DataSource(catalog="nq", mine_negatives=3)
    with pytest.raises(ConfigError, match=r"stage2.data.0: Value error, a data source names a path"):
        load_config("micro", ["stage2.data=[{limit: 3}]"])


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-4b", "qwen3-8b"])
def test_the_qwen3_presets_train_on_table6_by_name_and_offline_reads_the_stand_ins(preset):
    cfg = load_config(preset)
    for stage in (cfg.stage2, cfg.reranker):
        named = {s.catalog for s in stage.data}
        assert all(s.catalog and not s.offline for s in stage.data)
        assert len({n.rsplit("_", 1)[0] if n.startswith("multi_cpr") else n for n in named} & TABLE6) >= 10
        assert named <= set(load_catalog().entries)
    offline = load_config(preset, ["data.catalog_offline=true"])
    assert all(s.offline for st in (offline.stage2, offline.reranker) for s in st.data)


@pytest.mark.parametrize("preset", ["smol", "micro"])
def test_smol_and_micro_keep_their_data(preset):
    cfg = load_config(preset)
    assert cfg.data.catalog_offline is False
    for st in (cfg.stage1, cfg.stage2, cfg.reranker):
        assert all(s.path and s.catalog is None and s.offline is False for s in st.data)


# ----------------------------------------------------------------------------- q3e data check

@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("Q3E_NO_REAPER", "1")
    monkeypatch.setenv("Q3E_DEBUG", "")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_data_check_shows_every_source_of_a_qwen3_preset_from_the_stand_ins(cli):
    code, out, err = cli("data", "check", "--preset", "qwen3-0.6b", "--offline")
    assert code == 0, err
    cfg = load_config("qwen3-0.6b")
    # a long name may wrap "(stand-in)" onto the row's next line: each name starts a source cell,
    # and every catalog source of stage 2 and the reranker is marked a stand-in
    for src in cfg.stage2.data:
        assert f"│ {src.catalog} " in out
    assert out.count("(stand-in)") == len(cfg.stage2.data) + len(cfg.reranker.data)
    line = next(line for line in out.splitlines() if "msmarco (stand-in)" in line)
    assert "catalog" in line and "retrieval" in line and "│     3 │" in line and "what color is amber urine ->" in line
    assert "pair_classification" in next(line for line in out.splitlines() if "nli (stand-in)" in line)
    assert "stage1" in out and "reranker" in out


def test_data_check_streams_up_to_n_pairs(cli, monkeypatch):
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda **kw: real(
        "json", data_files=str(REPO_ROOT / "tests/data/catalog/nq.jsonl"), split="train", streaming=True))
    code, out, err = cli("data", "check", "--preset", "micro", "stage2.data=[{catalog: nq}]", "reranker.enabled=false",
                         "-n", "2")
    assert code == 0, err
    assert "streaming: >=2 in 2 rows" in next(line for line in out.splitlines() if "│ nq " in line)


def test_data_check_shows_the_smol_files_on_a_fresh_clone(cli, tmp_path, monkeypatch, shared_data):
    clone = tmp_path / "clone"  # a DVC project with data.dvc and no data/: restored as `q3e run` does
    clone.mkdir()
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=clone, check=True)
    shutil.copy(ROOT / "data.dvc", clone / "data.dvc")
    (clone / "presynthesised").symlink_to(ROOT / "presynthesised")
    overlay = tmp_path / "source.yaml"
    overlay.write_text(f"data: {{source: {shared_data}}}\n")
    code, out, err = cli("data", "check", "--preset", "smol", "-c", str(overlay), "--project", str(clone))
    assert code == 0, err
    assert "data: restored data/" in err
    lines = out.splitlines()
    snli = [line for line in lines if "data/triplets-en/snli_dev_triplets.jsonl" in line]
    assert len(snli) == 2 and "file" in snli[0] and "1,000" in snli[0] and "3,000" in snli[1]
    xquad = next(line for line in lines if "data/beir/xquad/en" in line)
    assert "BEIR" in xquad and "1,190" in xquad
    accepted = json.loads((ROOT / "presynthesised/smol/stats.json").read_text())["accepted"]
    assert f" {accepted} " in next(line for line in lines if "presynthesised/smol (synth.reuse)" in line)
    assert "catalog" not in out


def test_a_bad_entry_is_one_error_line_before_anything_runs(cli, tmp_path, monkeypatch):
    path = _catalog(tmp_path, GOOD | {"task": "regression"}, name="nq")
    monkeypatch.setattr("tasks.data.catalog.CATALOG_FILE", path)
    for args in (["data", "check", "--preset", "micro", "stage2.data=[{catalog: nq}]", "--offline"],
                 ["train", "--preset", "micro", "stage2.data=[{catalog: nq}]", "--out", str(tmp_path / "out")]):
        code, out, err = cli(*args)
        assert code == 1 and out == ""
        assert err.startswith(f"error: {path}: entry 'nq', field 'task': Input should be") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr("tasks.data.catalog.CATALOG_FILE", CATALOG_FILE)
    code, _, err = cli("train", "--preset", "micro", "stage2.data=[{catalog: msmarc}]", "--out", str(tmp_path / "o"))
    assert code == 1 and "no entry 'msmarc'; entries: msmarco" in err


def test_a_training_stages_key_follows_what_its_catalog_entry_holds(tmp_path, monkeypatch):
    """The config names an entry; conf/catalog.yaml says what it holds. Editing the entry (its fields, its
    revision) changes the key of the stages that read it, and only of those."""
    from flows.pipeline import catalog_inputs
    from tasks.config import load_config

    class Ctx:
        root = tmp_path

    def use(entry: dict, folder: str) -> None:
        (tmp_path / folder).mkdir()
        monkeypatch.setattr("tasks.data.catalog.CATALOG_FILE", _catalog(tmp_path / folder, entry, name="nq"))

    use(GOOD, "first")
    cfg = load_config("micro", ["stage2.data=[{catalog: nq, limit: 4}]", "data.catalog_offline=true"])
    first = catalog_inputs(cfg.stage2, Ctx)
    assert set(first["catalog"]) == {"nq"}
    assert catalog_inputs(cfg.stage1, Ctx) == {}  # no catalog source: the stage's key is what it was
    assert catalog_inputs(cfg.stage2, Ctx) == first  # the same entry: the same key

    for change in ({"fields": {"query": "answer", "positive": "query"}}, {"revision": "v2"}):
        use(GOOD | change, next(iter(change)))
        assert catalog_inputs(cfg.stage2, Ctx) != first, change
