"""The default run's data and model settings: derived data sets built inside data/, the backbone
cut to its first N layers, and instructions on both sides of symmetric pairs."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.config import DerivedSet
from tasks.data import DataError, Pair, load_beir, read_pairs, sts_to_beir, sts_to_pairs
from tasks.models import Embedder, ModelLoadError, format_query


def test_stsb_dev_as_retrieval_is_the_dev_split_scored_4_or_more(shared_data, tmp_path):
    out = sts_to_beir(shared_data / "sts-en" / "stsbenchmark-train-dev.tsv", tmp_path / "stsb-dev")
    beir = load_beir(out)
    rows = [r.split("\t") for r in (shared_data / "sts-en" / "stsbenchmark-train-dev.tsv").read_text().splitlines()[1:]]
    dev = [r for r in rows if r[0] == "dev"]
    assert len(beir.queries) == sum(float(r[5]) >= 4.0 for r in dev) == 264
    assert len(beir.corpus) == len({r[7] for r in dev}) == 1467
    # every query's one relevant document is its own sentence2
    first = next(r for r in dev if float(r[5]) >= 4.0)
    qid = next(q for q, t in beir.queries.items() if t == first[6])
    (cid,) = beir.qrels[qid]
    assert beir.corpus[cid][1] == first[7]


def test_sick_pairs_keep_related_pairs_and_low_scored_negatives(shared_data, tmp_path):
    out = sts_to_pairs(shared_data / "sts-en" / "SICK_train.txt", tmp_path / "sick.jsonl", query_field="sentence_A",
                       positive_field="sentence_B", score_field="relatedness_score", split=None)
    pairs, _ = read_pairs(out)
    rows = [r.split("\t") for r in (shared_data / "sts-en" / "SICK_train.txt").read_text().splitlines()[1:]]
    assert len(pairs) == sum(float(r[3]) >= 4.0 for r in rows)
    low = {(r[1], r[2]) for r in rows if float(r[3]) <= 2.0}
    with_negs = [p for p in pairs if p.negatives]
    assert with_negs and all((p.query, n) in low for p in with_negs for n in p.negatives)


def test_bad_sts_rows_name_file_line_and_field(tmp_path):
    bad = tmp_path / "sts.tsv"
    bad.write_text("split\tscore\tsentence1\tsentence2\ndev\t4.5\ta\tb\ndev\tfive\tc\td\n")
    with pytest.raises(DataError, match=r"sts\.tsv:3: field 'score'"):
        sts_to_beir(bad, tmp_path / "out")
    with pytest.raises(DataError, match=r"h\.tsv:1: header lacks field\(s\) \['sentence2'\]"):
        (tmp_path / "h.tsv").write_text("split\tscore\tsentence1\n")
        sts_to_pairs(tmp_path / "h.tsv", tmp_path / "o.jsonl")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ensure_data_adds_new_includes_and_builds_derived_sets(shared_data, tmp_path):
    from dvc.repo import Repo

    from tasks.lineage import ensure_data, is_clean, read_dvc_file

    Repo.init(str(tmp_path), no_scm=True)
    derived = [DerivedSet(source="sts-en/stsbenchmark-train-dev.tsv", out="beir/stsb-en-dev")]
    v1 = ensure_data(tmp_path, source=shared_data, include=["personas/personahub-5k.txt"])
    v2 = ensure_data(tmp_path, source=shared_data, include=["personas/personahub-5k.txt",
                                                            "sts-en/stsbenchmark-train-dev.tsv"], derived=derived)
    assert v1 != v2 == read_dvc_file(tmp_path / "data.dvc")["md5"]
    assert (tmp_path / "data" / "beir" / "stsb-en-dev" / "qrels" / "test.tsv").is_file()
    assert is_clean(tmp_path, "data")


def test_num_layers_keeps_the_first_layers_and_saves_the_smaller_model(micro_cfg, tmp_path):
    full = Embedder.load(micro_cfg.model, device="cpu")
    cut = Embedder.load(micro_cfg.model.model_copy(update={"num_layers": 1}), device="cpu")
    assert len(cut.backbone.layers) == 1 and cut.backbone.config.num_hidden_layers == 1
    assert torch.equal(cut.backbone.layers[0].mlp.up_proj.weight, full.backbone.layers[0].mlp.up_proj.weight)
    texts = ["what is the capital of france", "Paris is the capital of France."]
    # the cut model is the full model's first layer followed by its final norm
    ids = cut.tokenize(texts, 32)
    hs = full.backbone(**ids, output_hidden_states=True).hidden_states[1]
    expected = torch.nn.functional.normalize(full.backbone.norm(hs)[:, -1].float(), dim=-1)
    assert torch.allclose(cut.embed(texts, 32), expected, atol=1e-5)
    saved = cut.save(tmp_path / "cut")
    assert json.loads((saved / "config.json").read_text())["num_hidden_layers"] == 1
    again = Embedder.load(str(saved), device="cpu")
    assert torch.allclose(again.embed(texts, 32), cut.embed(texts, 32), atol=1e-6)
    with pytest.raises(ModelLoadError, match="num_layers 5 is more than the model's 2 layers"):
        Embedder.load(micro_cfg.model.model_copy(update={"num_layers": 5}), device="cpu")


def test_symmetric_pairs_put_the_instruction_on_every_document():
    from tasks.training import embedding_batch

    inst = "Retrieve semantically similar text."
    pairs = [Pair("a cat sits", "a cat is sitting", ("a dog runs",), inst, True),
             Pair("where is paris", "Paris is in France.", ("Rome is in Italy.",), inst, False)]
    b = embedding_batch(pairs, 1, seed=0, batch=0)
    assert b.positives == [format_query("a cat is sitting", inst), "Paris is in France."]
    assert b.negatives == [[format_query("a dog runs", inst)], ["Rome is in Italy."]]


def test_a_derived_set_whose_source_is_not_in_data_is_a_clear_error(tmp_path):
    from tasks.lineage import LineageError, build_derived

    (tmp_path / "data").mkdir()
    with pytest.raises(LineageError, match=r"stsbenchmark-train-dev\.tsv: data\.derived builds beir/stsb-en-dev"):
        build_derived(tmp_path / "data", [DerivedSet(source="sts-en/stsbenchmark-train-dev.tsv", out="beir/stsb-en-dev")])


def test_the_committed_presynthesised_set_is_what_the_smol_preset_would_generate(shared_data, tmp_path):
    """The default run reuses presynthesised/smol only if its manifest equals the one the smol
    preset's synthesis would write: a change to the preset's synth settings without `q3e synth
    --preset smol --out presynthesised/smol` would make every default run generate for half an
    hour, so it fails here first."""
    from pathlib import Path

    from tasks.config import load_config
    from tasks.data import iter_jsonl
    from tasks.synthesis.run import shard_name, synth_manifest

    root = Path(__file__).resolve().parents[1]
    cfg = load_config("smol").synth
    (tmp_path / "data").symlink_to(shared_data)  # data/ as the pipeline copies it from ../shared/data
    passages, manifest = synth_manifest(cfg, tmp_path)
    folder = root / cfg.reuse
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    records = [r for i in range(manifest["num_shards"]) for _, r in iter_jsonl(folder / shard_name(i))]
    stats = json.loads((folder / "stats.json").read_text())
    assert len(records) == stats["accepted"] >= 0.9 * len(passages)
    assert {r["meta"]["task"] for r in records} == {"retrieval", "bitext", "sts", "classification"}
    assert {r["meta"]["language"] for r in records} >= {"English", "Chinese"}
