"""Shared fixtures, and the order tests run in. Tests use real data from ../shared/data and tiny
real models (the `micro` preset: a randomly initialised 2-layer Qwen3), never a hub.

Tiers: tests marked `slow` (the end-to-end flows, the benchmark smoke run, tests that start
interpreters or whole services) run after the modules of fast tests only, so a broken unit shows in
the first minutes, and the costliest of their modules first, so two test processes finish together
(`pytest_collection_modifyitems`); `-m "not slow"` leaves them out. Helpers that are not fixtures live in modules named for
what they hold: fakes.py (scripted LLMs), configs.py (the micro configurations).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Test processes side by side (pytest-xdist) share the cores: each gets its share of torch threads,
# not one per core. On 2 cores two processes of two OpenMP threads each wait on each other's
# threads (test_train.py: 67 s against 49 s with one thread while the other core is busy). Set
# before torch is imported; subprocesses and the Ray workers a test starts inherit it.
if "OMP_NUM_THREADS" not in os.environ and (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

import dvc  # noqa: E402,F401  DVC binds its console log handlers to sys.stdout on import: before a capsys swaps it

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("Q3E_SHARED_DATA", ROOT.parent / "shared" / "data"))

_MLFLOW_URI_MODULE = "mlflow.tracking._tracking_service.utils"


# Seconds each of the costliest modules takes in `make test` on the 2-core machine (the sums of
# pytest's --durations=0 at e3ce8b0, 2026-12-01). They only order the modules that hold slow tests:
# the costliest goes first, so the last ones to run are short and both test processes finish at
# about the same time (with `--dist loadfile` a module runs whole in one process, and the Makefile
# keeps this order: --no-loadscope-reorder). A stale figure costs a little balance, never a result.
MODULE_SECONDS = {
    "test_pipeline.py": 161, "test_kill_and_resume.py": 125, "test_synthesize.py": 83, "test_ray_train.py": 80,
    "test_synth_ray_data.py": 78, "test_filter.py": 62, "test_process_hygiene.py": 58, "test_train.py": 47,
    "test_ray_worker_faults.py": 46, "test_endpoints_down.py": 36, "test_retrain.py": 28, "test_structured.py": 23,
    "test_bench.py": 20, "test_security.py": 17, "test_resource_limits.py": 17,
}


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (it groups items by fixture scope)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules of fast tests only first; then the modules that hold `slow` tests, the costliest first
    (MODULE_SECONDS), each with its fast tests before its slow ones; otherwise the collection order
    (a stable sort)."""
    slow = {item: item.get_closest_marker("slow") is not None for item in items}
    slow_modules = {item.path for item in items if slow[item]}

    def key(item: pytest.Item) -> tuple[bool, int, bool]:
        in_slow_module = item.path in slow_modules
        return in_slow_module, -MODULE_SECONDS.get(item.path.name, 0) if in_slow_module else 0, slow[item]

    items.sort(key=key)


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
def module_tmp(tmp_path_factory, request):
    """`module_tmp(name)` makes a folder for a module's shared fixtures; it is removed when the module's
    tests are done, unless one of them failed. (A per-test `tmp_path` goes when its test passes:
    `tmp_path_retention_policy` in pyproject.toml. Kept to the end, the suite's checkpoints filled
    6 GB of /tmp and a small CI disk with them.)"""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


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
        # no runtime_env: the workers inherit this process's environment (init_ray says why)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _ray_cpus_come_back():
    """A module's stages must leave the session's Ray as they found it: an actor left alive holds its
    CPUs, and the next stage that asks for every CPU (training takes them all) waits for ever."""
    yield
    if (ray := sys.modules.get("ray")) is None or not ray.is_initialized():
        return
    from tests.processes import wait_for_free_cpus

    total = ray.cluster_resources().get("CPU", 0.0)
    # (Ray's state API would name the actor, but it needs the dashboard, which the tests' Ray leaves out)
    if (free := wait_for_free_cpus()) < total:
        pytest.fail(f"{total - free:g} of the session Ray's {total:g} CPUs are still held after the module's "
                    f"tests: an actor or task it started outlived it")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect API server for every flow of the session (instead of one temporary server per flow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def personas_file(shared_data, tmp_path_factory) -> Path:
    """The first 400 real PersonaHub personas (the full 5k file costs ~30 s of MiniLM once)."""
    lines = (shared_data / "personas" / "personahub-5k.txt").read_text(encoding="utf-8").splitlines()[:400]
    path = tmp_path_factory.mktemp("personas") / "personas-400.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llm_url():
    """An OpenAI-compatible endpoint on loopback that answers every synthesis request validly."""
    from tests.fakes import ScriptedLLM

    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
