"""Data versioning with DVC (tasks/lineage.py): what `ensure_data` does on a first run, a fresh clone
and changed data; generated data sets versioned and pushed; the .dvc records they are read from."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.lineage import LineageError, ensure_data, is_clean, read_dvc_file, track_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path):
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    Repo.init(str(root))
    # the embedded default: a local folder as the DVC remote
    (root / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../remote\n")
    source = tmp_path / "source"
    (source / "sts").mkdir(parents=True)
    (source / "sts" / "a.tsv").write_text("x\ty\n")
    (source / "unused.txt").write_text("not included\n")
    return root, source


def test_first_run_fresh_clone_and_changed_data(project, caplog):
    root, source = project
    caplog.set_level(logging.INFO, logger="tasks.lineage")
    v1 = ensure_data(root, source=source, include=["sts"])
    assert (root / "data" / "sts" / "a.tsv").is_file() and not (root / "data" / "unused.txt").exists()
    assert read_dvc_file(root / "data.dvc")["md5"] == v1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # a fresh clone: data.dvc is there, data/, the DVC cache and the (local) remote are not: the
    # bundled source is copied, and it is the version data.dvc names
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(root / "remote")
    caplog.clear()
    assert ensure_data(root, source=source, include=["sts"]) == v1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "tasks.lineage"]
    assert any("added to this machine's DVC cache" in r.getMessage() for r in caplog.records)

    # new data the user put in data/: a new version, and a warning that says so
    (root / "data" / "sts" / "b.tsv").write_text("z\tw\n")
    caplog.clear()
    v2 = ensure_data(root, source=source, include=["sts"])
    assert v2 != v1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "tasks.lineage"]
    assert f"{v1} -> {v2}" in warning and "commit data.dvc" in warning


def test_a_dvc_file_gives_its_output_record_and_a_bad_one_is_named(tmp_path):
    rec = read_dvc_file(ROOT / "data.dvc")  # the committed pointer to data/
    assert rec["path"] == "data" and rec["md5"].endswith(".dir") and rec["nfiles"] > 0
    with pytest.raises(LineageError, match=re.escape(f"{tmp_path / 'missing.dvc'}: .dvc file not found")):
        read_dvc_file(tmp_path / "missing.dvc")
    for text in ("", "outs: []\n", "outs:\n- path: data\n"):
        (tmp_path / "bad.dvc").write_text(text)
        with pytest.raises(LineageError, match=re.escape(f"{tmp_path / 'bad.dvc'}: no 'outs[0].md5' field")):
            read_dvc_file(tmp_path / "bad.dvc")


def test_a_generated_data_set_is_versioned_pushed_and_versioned_again_when_it_changes(project, shared_data):
    root, _ = project
    folder = root / "datasets" / "synthetic" / "k1"
    folder.mkdir(parents=True)
    triplets = (shared_data / "triplets-en" / "snli_dev_triplets.jsonl").read_text().splitlines()
    (folder / "shard-00000.jsonl").write_text("\n".join(triplets[:3]) + "\n")

    md5 = track_dataset(root, folder)
    assert read_dvc_file(root / "datasets" / "synthetic" / "k1.dvc")["md5"] == md5
    assert is_clean(root, "datasets/synthetic/k1")
    assert (root / "remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()  # pushed to the remote
    assert track_dataset(root, folder) == md5  # unchanged: the same version

    (folder / "shard-00000.jsonl").write_text("\n".join(triplets[3:5]) + "\n")
    assert not is_clean(root, "datasets/synthetic/k1")
    changed = track_dataset(root, folder)
    assert changed != md5 and read_dvc_file(root / "datasets" / "synthetic" / "k1.dvc")["md5"] == changed
    assert is_clean(root, "datasets/synthetic/k1")
