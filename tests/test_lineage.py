"""Data versioning with DVC: what `ensure_data` does on a first run, a fresh clone and changed data."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest

from tasks.lineage import ensure_data, read_dvc_file


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
