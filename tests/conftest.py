"""Shared fixtures. Tests use real data from ../shared/data and tiny real models (the `micro`
preset: a randomly initialised 2-layer Qwen3), never a hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("Q3E_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data folder not found: {SHARED_DATA} (set Q3E_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def micro_cfg():
    from tasks.config import load_config

    return load_config("micro")


@pytest.fixture(scope="session")
def micro_embedder(micro_cfg):
    from tasks.models import Embedder

    return Embedder.load(micro_cfg.model, device="cpu")


@pytest.fixture(scope="session")
def micro_reranker(micro_cfg):
    from tasks.models import Reranker

    return Reranker.load(micro_cfg.model, device="cpu")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (ray.init takes seconds; shut down at the end)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
                 runtime_env={"env_vars": {k: os.environ[k] for k in ("Q3E_CACHE_DIR", "HF_HUB_OFFLINE")
                                           if k in os.environ}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect API server for every flow of the session (instead of one temporary server per flow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
