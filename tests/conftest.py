"""Shared fixtures. Tests use real data from ../shared/data and tiny real models (the `micro`
preset: a randomly initialised 2-layer Qwen3), never a hub."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("Q3E_SHARED_DATA", ROOT.parent / "shared" / "data"))

_MLFLOW_URI_MODULE = "mlflow.tracking._tracking_service.utils"


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_stays_in_its_test():
    """`mlflow.set_tracking_uri` is process-global and writes MLFLOW_TRACKING_URI: a test that
    points MLflow at a server (or a closed port) must not leave the next test pointing there."""
    uri_before = getattr(sys.modules.get(_MLFLOW_URI_MODULE), "_tracking_uri", None)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    utils = sys.modules.get(_MLFLOW_URI_MODULE)
    if utils is not None and utils._tracking_uri != uri_before:
        utils._tracking_uri = uri_before
    if env_before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_before


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


class ScriptedLLM(BaseHTTPRequestHandler):
    """Answers the configuration and query-generation prompts of the paper's templates."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # the last user turn is the request (an earlier one may be the template's example)
        system = body["messages"][0]["content"]
        user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        if "select the appropriate option" in system:
            first = re.search(r"^\s*1\. (.+)$", user.split("**Character**")[-1], re.M).group(1)
            content = {"Character": first, "Question_Type": "keywords", "Difficulty": "university"}
        elif "generate a query" in system:
            passage = user.split("**Passage**")[1].split("**Requirement**")[0].split()
            content = {"Query": "what do we know about " + " ".join(passage[4:10])}
        else:
            content = {}
        payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": json.dumps(content)}, "finish_reason": "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())


@pytest.fixture(scope="session")
def llm_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
