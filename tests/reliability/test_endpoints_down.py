"""Services that are down: the MLflow tracking server (a real one, MLflow's own server app on
loopback, stopped and started again), the OpenAI-compatible LLM endpoint (a real HTTP server that
crashes, closes its port, answers 503, comes back or not) and the DVC remote. Bounded retries,
then an error that names the service; local results are never lost and a rerun goes on."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dvc.repo import Repo  # at import, not under a test's output capture (DVC binds its log handlers then)

from tasks import tracking

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- MLflow

class TrackingServer:
    """MLflow's tracking server app (what `mlflow server` serves) in a child process on loopback,
    which `kill()` SIGKILLs and `start()` starts again on the same port."""

    CODE = ("import sys; from werkzeug.serving import WSGIRequestHandler, make_server; from mlflow.server import app\n"
            "class OneRequestPerConnection(WSGIRequestHandler): protocol_version = 'HTTP/1.0'\n"
            "srv = make_server('127.0.0.1', int(sys.argv[1]), app, threaded=True, "
            "request_handler=OneRequestPerConnection)\n"
            "print('READY', srv.server_port, flush=True); srv.serve_forever()")

    def __init__(self, root: Path):
        self.env = {**os.environ, "_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{root / 'server.db'}",
                    "_MLFLOW_SERVER_ARTIFACT_ROOT": str(root / "server-artifacts"),
                    "_MLFLOW_SERVER_SERVE_ARTIFACTS": "false"}
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.port)], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), f"tracking server did not start (rc {self.proc.poll()})"
        self.port = int(line.split()[1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_tracking_server_down_at_start_fails_in_seconds_naming_it(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs"
    (run_dir / "artifacts" / "stage2").mkdir(parents=True)
    (run_dir / "artifacts" / "stage2" / "done.json").write_text("{}")  # a finished stage of an earlier run
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri writes it: keep it to this test
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError) as e:
        tracking.setup(run_dir, "qwen3-embedding", uri)
    took = time.monotonic() - t0
    message = str(e.value)
    assert message.startswith(f"MLflow tracking store {uri} is not usable (3 retries): ")
    assert "Connection refused" in message and f"log to {run_dir / 'mlflow.db'}" in message
    assert 2 < took < 30, took  # it did retry (backoff 1 s, 2 s, ...), and gave up
    assert (run_dir / "artifacts" / "stage2" / "done.json").is_file()


def test_the_preflight_fails_at_once_on_no_server_and_passes_any_http_answer(tmp_path, monkeypatch):
    """`q3e run` checks a configured server before Prefect and Ray start: a refused connection is an
    error naming the URI without MLflow's retries; a server that answers, even 401, is reachable."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError) as e:
        tracking.check_reachable(tmp_path / "runs", uri)
    assert time.monotonic() - t0 < 5
    assert str(e.value).startswith(f"MLflow tracking store {uri} is not usable (no answer from {uri}/health: ")
    assert "refused" in str(e.value) and f"log to {tmp_path / 'runs' / 'mlflow.db'}" in str(e.value)

    class Unauthorized(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(tmp_path / "runs", f"http://127.0.0.1:{httpd.server_port}/")
    finally:
        httpd.shutdown()
    tracking.check_reachable(tmp_path / "runs", None)  # the embedded SQLite store: nothing to reach


def test_tracking_server_lost_mid_run_keeps_the_stage_and_a_rerun_logs_it(micro_cfg, tmp_path, monkeypatch, request):
    import mlflow

    from flows.pipeline import Context, run_stage
    from tasks.stages import stage_dir

    server = TrackingServer(tmp_path)
    server.start()
    request.addfinalizer(server.kill)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    run_dir = tmp_path / "runs"
    tracking.check_reachable(run_dir, server.url)  # the preflight of `q3e run` passes a live server
    experiment = tracking.setup(run_dir, "qwen3-embedding", server.url)
    parent = mlflow.MlflowClient().create_run(experiment, run_name="micro-full").info.run_id
    ctx = Context(micro_cfg, tmp_path, run_dir / "artifacts", tmp_path / "datasets", experiment, parent, "md5")
    calls = []

    def stage(out: str) -> dict:
        calls.append(out)
        Path(out, "model.txt").write_text("weights")
        return {"final": out, "metrics": {"loss": 0.5}}

    first = stage_dir(ctx.artifacts, "stage1", "k1")
    run_stage.fn(ctx, first, stage, (str(first.path),))

    server.kill()  # the tracking server dies between two stages
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    second = stage_dir(ctx.artifacts, "stage2", "k2")
    with pytest.raises(Exception, match=f"API request to {server.url}/api/2.0/mlflow/runs/create failed"):
        run_stage.fn(ctx, second, stage, (str(second.path),))
    assert second.result()["final"] == str(second.path)  # the stage's work is recorded as complete
    assert (second.path / "model.txt").read_text() == "weights"

    server.start()  # back, on the same port: the rerun reuses the stage and logs it
    result = run_stage.fn(ctx, second, stage, (str(second.path),))
    assert result["final"] == str(second.path) and calls == [str(first.path), str(second.path)]
    assert ctx.timings[-1] == {**ctx.timings[-1], "stage": "stage2", "cached": True}
    logged = mlflow.search_runs([experiment], filter_string="tags.stage = 'stage2'")
    assert len(logged) == 1 and logged["metrics.loss"].iloc[0] == 0.5


# ----------------------------------------------------------------------------- the OpenAI-compatible endpoint

class LLMEndpoint:
    """An OpenAI-compatible server on loopback answering like tests/test_synthesize.py's scripted
    LLM, with faults served first: `crash` (drop the request, close the port for `down_s`, listen
    again on the same port), `503`, and `down` for good once a prompt mentions `fatal`."""

    def __init__(self, *, down_s: float = 1.0):
        self.port = 0
        self.script: list[str] = []
        self.fatal: str | None = None
        self.down_s = down_s
        self.log: list[str] = []
        self.state: dict = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LLMEndpoint":
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                action = endpoint.action(body)
                if action in ("crash", "down"):
                    self.close_connection = True  # no answer at all: the process died mid-request
                    threading.Thread(target=endpoint._go_down, args=(action == "crash",), daemon=True).start()
                    return
                if action == "503":
                    payload, code = b'{"error": "loading model"}', 503
                else:
                    from tests.fakes import scripted_answer

                    with endpoint.lock:
                        content = scripted_answer(body["messages"], endpoint.state)
                    payload, code = json.dumps({"choices": [{"message": {"content": content}}]}).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def action(self, body: dict) -> str:
        with self.lock:
            text = " ".join(m["content"] for m in body["messages"])
            if self.fatal and self.fatal in text:
                act = "down"
            else:
                act = self.script.pop(0) if self.script else "ok"
            self.log.append(act)
            return act

    def _go_down(self, come_back: bool) -> None:
        self.stop()
        if come_back:
            time.sleep(self.down_s)
            self.start()

    def stop(self) -> None:
        with self.lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _synth_cfg(shared_data: Path, url: str, **generator):
    from tests.configs import synth_cfg

    return synth_cfg(shared_data, shared_data / "personas" / "personahub-5k.txt", workers=1, shard_size=2,
                     num_passages=6, kinds={"bitext": 1, "sts": 1, "classification": 1},
                     generator={"backend": "openai", "model": "served-llm", "base_url": url, "concurrency": 1,
                                "backoff_s": 0.2, "max_backoff_s": 1.0, **generator})


def _passage_ids(folder: Path) -> list[str]:
    rows = [json.loads(x) for f in sorted(folder.rglob("*.jsonl")) for x in f.read_text().splitlines()]
    return sorted(r.get("meta", {}).get("passage_id") or r["passage_id"] for r in rows)


def _pairs(folder: Path) -> list[tuple[str, str, str]]:
    return [(r["query"], r["response"], r["meta"]["passage_id"]) for f in sorted(folder.glob("shard-*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines())]


def test_llm_endpoint_down_for_a_while_then_back_synthesis_completes(ray_session, shared_data, tmp_path):
    from tests.fakes import ScriptedGenerator
    from tasks.synthesis.plan import load_passages
    from tasks.synthesis.run import synthesize

    endpoint = LLMEndpoint(down_s=1.0).start()
    endpoint.script = ["crash", "503", "503"]  # the server dies, its port closes, it restarts still loading
    try:
        cfg = _synth_cfg(shared_data, endpoint.url, http_retries=10)
        res = synthesize(cfg, tmp_path / "synthetic", progress=False)
    finally:
        endpoint.stop()
    assert endpoint.log[:3] == ["crash", "503", "503"] and set(endpoint.log[3:]) == {"ok"}
    assert res.stats["run"]["shards_generated"] == 3 and res.stats["passages"] == 6
    assert _passage_ids(tmp_path / "synthetic") == sorted(p.id for p in load_passages(cfg.passages, limit=6))
    # the same pairs as the same scripted LLM answering without faults: the outage cost no sample
    reference = synthesize(cfg, tmp_path / "reference", generator_factory=ScriptedGenerator, progress=False)
    assert _pairs(tmp_path / "synthetic") == _pairs(tmp_path / "reference") and reference.stats["accepted"] > 0
    assert res.stats["rejection_reasons"] == reference.stats["rejection_reasons"]


def test_llm_endpoint_down_for_good_stops_with_a_clear_error_and_a_rerun_resumes(ray_session, shared_data,
                                                                                 tmp_path):
    from tasks.synthesis.generators import GeneratorError
    from tasks.synthesis.plan import load_passages
    from tasks.synthesis.run import synthesize

    passages = load_passages([shared_data / "passages" / "en-nq-msmarco.jsonl"], limit=6)
    endpoint = LLMEndpoint().start()
    endpoint.fatal = passages[4].text[:40]  # the server dies for good at the third shard
    cfg = _synth_cfg(shared_data, endpoint.url, http_retries=3)
    out = tmp_path / "synthetic"
    t0 = time.monotonic()
    with pytest.raises(GeneratorError, match=rf"{endpoint.url}/chat/completions: giving up after 4 attempts; "
                                             rf"last error: connection error"):
        synthesize(cfg, out, progress=False)
    assert time.monotonic() - t0 < 120
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    kept = {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")}

    endpoint.fatal = None
    endpoint.start()  # back on the same port
    try:
        res = synthesize(cfg, out, progress=False)
    finally:
        endpoint.stop()
    assert res.stats["run"]["shards_generated"] == 1 and res.stats["run"]["shards_reused"] == 2
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    assert _passage_ids(out) == sorted(p.id for p in passages)  # each passage once, none lost, none twice


# ----------------------------------------------------------------------------- DVC remote

def test_dvc_remote_down_keeps_the_data_set_versioned_locally(tmp_path, caplog):
    from tasks.lineage import is_clean, read_dvc_file, track_dataset

    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)).config.edit() as conf:
        conf["remote"]["down"] = {"url": f"http://127.0.0.1:{_closed_port()}/dvc"}
        conf["core"]["remote"] = "down"
    data = tmp_path / "datasets" / "synthetic" / "k1"
    data.mkdir(parents=True)
    (data / "shard-00000.jsonl").write_text('{"query": "q", "response": "r"}\n')
    with caplog.at_level(logging.WARNING, logger="tasks.lineage"):
        md5 = track_dataset(tmp_path, data)
    assert "dvc push of ['datasets/synthetic/k1.dvc'] failed" in caplog.text
    assert "the data stays in the local cache" in caplog.text
    assert read_dvc_file(tmp_path / "datasets" / "synthetic" / "k1.dvc")["md5"] == md5
    assert is_clean(tmp_path, "datasets/synthetic/k1")
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5"
    assert (cache / md5[:2] / md5[2:]).is_file()  # the version is in the local cache, ready to push later
