"""Safe loading and secrets. Hostile inputs are real: a model folder whose code, and pickles whose
`__reduce__`, would create a marker file if they ever ran (each payload is first shown to work, so
a missing marker means it was not run). The API key of a real synthesis stage run, logged to a real
MLflow store, is searched for in every file, log line and output.

The compose stack's ports (127.0.0.1) and passwords (none in clear) are checked in tests/test_infra.py."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
# DVC and Prefect (flows.pipeline) bind log handlers to the sys.stdout/sys.stderr of their first
# import: imported here, not inside the test that captures its output (whose streams close after it).
from dvc.repo import Repo

from flows.pipeline import Context, _section, run_stage
from tasks.config import ModelConfig, available, load_config
from tasks.models import Embedder, ModelLoadError, resolve_backbone

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-q3e-reliability-5d2e8a71c0"


class Payload:
    """Unpickling this object creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _live(payload_bytes: bytes, marker: Path) -> None:
    """The payload does run when unpickled: a test that finds no marker is not fooled by a dud."""
    pickle.loads(payload_bytes)
    assert marker.exists()
    marker.unlink()


# ----------------------------------------------------------------------------- remote code

def _model_with_code(micro_cfg, folder: Path, marker: Path) -> Path:
    shutil.copytree(resolve_backbone(micro_cfg.model), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="q3e-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                     "AutoModel": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()  # what a malicious model's code could do on import\n"
        "from transformers import Qwen3Config, Qwen3Model\n\n\n"
        "class CustomConfig(Qwen3Config):\n    model_type = 'q3e-custom'\n\n\n"
        "class CustomModel(Qwen3Model):\n    config_class = CustomConfig\n")
    return folder


@pytest.mark.slow
def test_code_shipped_with_a_model_runs_only_with_trust_remote_code(micro_cfg, tmp_path):
    assert not any(load_config(p).model.trust_remote_code for p in available("presets"))
    marker = tmp_path / "remote-code-ran"
    folder = _model_with_code(micro_cfg, tmp_path / "custom-model", marker)
    with pytest.raises(ModelLoadError, match="needs code shipped with it to load; running that code is off unless "
                                             "you set model.trust_remote_code=true"):
        Embedder.load(ModelConfig(backbone=str(folder)), device="cpu")
    assert not marker.exists()

    # set, the same folder loads and its code runs (in a child process: its module cache is a temp folder)
    code = ("import sys; from tasks.config import ModelConfig; from tasks.models import Embedder; "
            "Embedder.load(ModelConfig(backbone=sys.argv[1], trust_remote_code=True), device='cpu')")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()


# ----------------------------------------------------------------------------- pickles

def test_a_model_with_only_pickle_weights_is_refused_unread(micro_cfg, tmp_path):
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps({"model.embed_tokens.weight": Payload(marker)})
    _live(payload, marker)
    folder = tmp_path / "pickled-model"
    shutil.copytree(resolve_backbone(micro_cfg.model), folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelLoadError, match=r"has only pickle weights \(pytorch_model.bin\); loading a pickle "
                                             r"can run code, so weights are read from safetensors only"):
        Embedder.load(str(folder), device="cpu")
    assert not marker.exists()


def test_a_tampered_trainer_state_is_refused_when_resuming(micro_cfg, shared_data, tmp_path, caplog):
    """A pickle payload in trainer_state.pt is never run: the checkpoint is refused (named, with
    torch's reason) and, with no other checkpoint to fall back to, training starts over."""
    import logging

    from tasks.config import DataSource
    from tasks.training import TrainingInterrupted, list_checkpoints, train

    data = DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=16)
    cfg = micro_cfg.stage2.model_copy(update={"data": [data], "steps": 4, "batch_size": 4, "checkpoint_every": 2,
                                              "hard_negatives": 1})
    with pytest.raises(TrainingInterrupted):
        train(cfg, micro_cfg.model, tmp_path / "run", progress=False, stop_after=2)
    (ckpt,) = list_checkpoints(tmp_path / "run")
    marker = tmp_path / "pickle-ran"
    torch.save({"optimizer": Payload(marker)}, ckpt / "trainer_state.pt")  # the format the trainer writes
    torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"].close()  # the payload is live...
    assert marker.exists()
    marker.unlink()
    caplog.set_level(logging.WARNING, logger="tasks.training.checkpoint")
    res = train(cfg, micro_cfg.model, tmp_path / "run", progress=False)  # ...and resuming does not run it
    assert not marker.exists()
    assert res.resumed_from == 0 and (tmp_path / "run" / "final").is_dir()
    assert any(str(ckpt / "trainer_state.pt") in r.getMessage() and "UnpicklingError" in r.getMessage()
               for r in caplog.records)


def test_an_embedding_cache_file_holding_a_pickle_is_recomputed_not_run(tmp_path, caplog):
    from tasks.evaluation.cache import EmbeddingCache

    marker = tmp_path / "pickle-ran"
    cache = EmbeddingCache(tmp_path / "cache")
    texts = ["a", "b"]
    path = cache.path("model", dim=None, instruction=None, max_length=None, texts=texts)
    path.parent.mkdir(parents=True)
    np.save(path, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)[0].close()  # the payload is live
    assert marker.exists()
    marker.unlink()
    with caplog.at_level(logging.WARNING, logger="tasks.evaluation.cache"):
        emb = cache.get_or_compute("model", texts, lambda: np.eye(2), dim=None, instruction=None, max_length=None)
    assert np.array_equal(emb, np.eye(2)) and cache.misses == 1 and "unreadable; recomputing" in caplog.text
    assert not marker.exists()
    assert np.load(path).dtype == np.float32  # the cache file now holds plain floats


# ----------------------------------------------------------------------------- the API key

def test_the_api_key_reaches_the_endpoint_and_nothing_else(ray_session, micro_cfg, shared_data, tmp_path,
                                                          monkeypatch, caplog, capfd):
    """A real synthesis stage through the pipeline's stage runner: Ray workers, the OpenAI backend
    against a server that refuses any other key, DVC versioning and MLflow logging."""
    import mlflow
    import ray

    from tasks import tracking
    from tasks.synthesis.generators import GeneratorError
    from tasks.stages import stage_dir, synth_stage
    from tests.fakes import FakeOpenAI

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("Q3E_RELIABILITY_KEY", KEY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Repo.init(str(tmp_path), no_scm=True)
    run_dir = tmp_path / "runs"
    experiment = tracking.setup(run_dir, "qwen3-embedding")
    with FakeOpenAI(key=KEY) as server:
        cfg = load_config("micro", [
            f"synth.passages=[{shared_data / 'passages' / 'en-nq-msmarco.jsonl'}]",
            f"synth.personas={shared_data / 'personas' / 'personahub-5k.txt'}", "synth.num_passages=4",
            "synth.shard_size=2", "synth.kinds={sts: 1, classification: 1}", "synth.generator.backend=openai",
            f"synth.generator.base_url={server.url}", "synth.generator.api_key_env=Q3E_RELIABILITY_KEY",
            "synth.generator.backoff_s=0.01"])
        client = mlflow.MlflowClient()
        parent = client.create_run(experiment, run_name="micro-full").info.run_id
        tracking.log_params(parent, cfg.flat())
        ctx = Context(cfg, tmp_path, run_dir / "artifacts", tmp_path / "datasets", experiment, parent, "md5")
        kwargs = {"data_root": str(tmp_path), "project_root": str(tmp_path), "dvc_remote": None}

        sd = stage_dir(ctx.datasets, "synthesis", "k1", folder="synthetic")
        result = run_stage.fn(ctx, sd, synth_stage, (cfg.synth, str(sd.path)), kwargs, params=_section(cfg, "synth"))
        assert result["n_accepted"] > 0 and len(server.requests) >= 4  # the server took the key

        server.script = [("echo_auth",)]  # a server that puts the credentials it got into its error message
        failing = cfg.synth.model_copy(update={"seed": 1})
        sd2 = stage_dir(ctx.datasets, "synthesis", "k2", folder="synthetic")
        with pytest.raises(GeneratorError, match=r"HTTP 401 \(not retried\): .*Bearer \*\*\*") as e:
            run_stage.fn(ctx, sd2, synth_stage, (failing, str(sd2.path)), kwargs, params=_section(cfg, "synth"))
        assert KEY not in str(e.value)
    client.set_terminated(parent)

    runs = mlflow.search_runs([experiment])
    assert len(runs) == 2 and runs.astype(str).apply(lambda col: col.str.contains(KEY)).sum().sum() == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".dvc" for p in files)
    assert any("mlartifacts" in p.parts for p in files)  # stats.json logged as an artifact
    assert [p for p in files if KEY.encode() in p.read_bytes()] == []
    out, err = capfd.readouterr()
    assert KEY not in caplog.text and KEY not in out and KEY not in err
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # Ray's worker logs of this session
    assert [p for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()] == []
