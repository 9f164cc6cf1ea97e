"""MLflow at the edge: where runs go, what a stage logs, models that load back, run comparison.

Embedded default: a SQLite store `<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts`;
`infra.mlflow_tracking_uri` (or MLFLOW_TRACKING_URI) points at a tracking server instead. Only the
driver logs (SQLite takes one writer); Ray workers write files that the driver logs afterwards.

A tracking server that is down costs a few seconds of retries, then an error that names it: runs
log after their stage's outputs are complete on disk, so a rerun reuses them and logs again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow retries a failed request 7 times with a backoff factor of 2 (~4 minutes a call), so a
# server that is down stalls every log call; 3 retries with factor 1 give up after ~7 s. The
# variables are MLflow's own: set them to retry longer.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names its URI."""


def tracking_uri(run_dir: Path, configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def check_reachable(run_dir: Path, configured_uri: str | None = None, timeout: float = 10.0) -> None:
    """Fail fast, before Prefect and Ray start, when the tracking store is an HTTP server that does
    not answer: one GET of its `/health` (every MLflow server has it). Any HTTP answer counts as
    reachable (a proxy that wants credentials says so later, in `setup`); a refused connection, an
    unknown host or a timeout raise `TrackingError` naming the URI. Local stores are not checked here."""
    import urllib.error
    import urllib.request

    uri = tracking_uri(run_dir, configured_uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except OSError as e:  # URLError (refused, unknown host) or a timeout
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable (no answer from {uri.rstrip('/')}/health: {reason})\n"
            f"Start it, point infra.mlflow_tracking_uri / MLFLOW_TRACKING_URI elsewhere, or unset both to "
            f"log to {run_dir / 'mlflow.db'}.") from None


def setup(run_dir: Path, experiment: str, configured_uri: str | None = None) -> str:
    """Point MLflow at the store and return the experiment id (created with an absolute
    artifact location when the store is local)."""
    import mlflow

    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(run_dir, configured_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as e:  # unreachable server, refused credentials, unreadable store
        retries = os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] if uri.startswith("http") else "no"
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable ({retries} retries): {e}\n"
            f"Start it, point infra.mlflow_tracking_uri / MLFLOW_TRACKING_URI elsewhere, or unset both to "
            f"log to {run_dir / 'mlflow.db'}.") from None
    if exp is not None:
        return exp.experiment_id
    location = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:", "/")) else None
    return client.create_experiment(experiment, artifact_location=location)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """What a run's numbers depend on beyond its commit, config and data: the CPU (bf16 matrix
    products under `autocast: auto` round differently on AMX, on AVX512-BF16 and in float32), the
    CPUs this process may use, the GPUs and torch. Logged as `machine.*` tags and in summary.json;
    `q3e report` prints it beside the commit."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    if torch.cpu._is_amx_tile_supported():
        bf16 = "AMX"
    elif torch.cpu._is_avx512_bf16_supported():
        bf16 = "AVX512-BF16"
    else:
        bf16 = "none"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    gpu = f"{len(gpus)} x {gpus[0]}" if gpus and len(set(gpus)) == 1 else (", ".join(gpus) or "none")
    return {"cpu": cpu, "cpus": str(cpus), "cpu_bf16": bf16, "gpu": gpu, "torch": torch.__version__}


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = __import__("mlflow").MlflowClient()
    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
             for k, v in sorted(params.items())]
    for part in _chunks(items, 100):
        client.log_batch(run_id, params=[Param(p.key, p.value[:6000]) for p in part])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    client = __import__("mlflow").MlflowClient()
    ts = int(time.time() * 1000)
    items = [Metric(_metric_key(k), float(v), ts, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for part in _chunks(items, 500):
        client.log_batch(run_id, metrics=part)


def log_history(run_id: str, history: list[dict], prefix: str = "train/") -> None:
    """Per-step training metrics (loss, lr, throughput) with their step numbers."""
    import time

    from mlflow.entities import Metric

    client = __import__("mlflow").MlflowClient()
    ts = int(time.time() * 1000)
    items = [Metric(_metric_key(prefix + k), float(v), ts, int(rec["step"]))
             for rec in history for k, v in rec.items() if k != "step" and isinstance(v, (int, float))]
    for part in _chunks(items, 900):
        client.log_batch(run_id, metrics=part)


def log_artifacts(run_id: str, folder: Path, artifact_path: str) -> None:
    """The files of `folder` as the run's artifacts under `artifact_path/` (e.g. a trained `final/`)."""
    __import__("mlflow").MlflowClient().log_artifacts(run_id, str(folder), artifact_path=artifact_path)


def log_eval_results(run_id: str, results: dict[str, dict[str, float]],
                     result_file: Path | None = None, *, benchmarks: dict[str, dict] | None = None) -> None:
    """Log `eval/<task>/<metric>` of `evaluate_model`'s results, and `eval/<benchmark>/mean_task`,
    `mean_type`, `per_type/<type>` of its benchmark summaries (`MTEB(eng, v2)` as `MTEB-eng-v2`), and
    the result JSON under `eval/`, to an existing MLflow run; never creates one. nAUC abstention
    metrics are skipped."""
    import time

    from mlflow.entities import Metric

    from tasks.evaluation.benchmarks import benchmark_metrics

    now = int(time.time() * 1000)
    metrics = [Metric(_metric_key(f"eval/{task}/{m}"), float(v), now, 0) for task, scores in results.items()
               for m, v in scores.items() if not m.startswith("nauc") and math.isfinite(float(v))]
    for bench, numbers in benchmark_metrics(benchmarks or {}).items():
        for key, value in numbers.items():
            parts = value.items() if isinstance(value, dict) else [(None, value)]
            metrics += [Metric(_metric_key("/".join(filter(None, ("eval", bench, key, sub)))), float(v), now, 0)
                        for sub, v in parts]
    client = __import__("mlflow").MlflowClient()
    for part in _chunks(metrics, 500):
        client.log_batch(run_id, metrics=part)
    if result_file is not None:
        client.log_artifact(run_id, str(result_file), artifact_path="eval")


def _metric_key(key: str) -> str:
    # MLflow keys: alphanumerics, _ - . / and spaces
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


# ----------------------------------------------------------------------------- models in MLflow

try:
    import mlflow.pyfunc as _pyfunc
    import pandas as pd

    class EmbeddingPyfunc(_pyfunc.PythonModel):
        """`mlflow.pyfunc.load_model(uri).predict(["text", ...])` -> [n, dim] unit embeddings."""

        def load_context(self, context):
            from tasks.models import Embedder

            self.model = Embedder.load(context.artifacts["model"])

        def predict(self, context, model_input: list[str], params: dict | None = None):
            """Documents by default; params={"instruction": ...} encodes the texts as queries."""
            instr = (params or {}).get("instruction")
            return self.model.encode(list(model_input), instruction=instr or None, is_query=bool(instr))

    class RerankerPyfunc(_pyfunc.PythonModel):
        """`predict(DataFrame[query, document])` -> relevance scores in (0, 1); params={"instruction": ...}."""

        def load_context(self, context):
            from tasks.models import Reranker

            self.model = Reranker.load(context.artifacts["model"])

        def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
            instr = (params or {}).get("instruction")
            return self.model.score(model_input["query"].tolist(), model_input["document"].tolist(),
                                    instruction=instr)
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the module importable anyway
    pass


def log_model(run_id: str, model_dir: Path, kind: str, name: str, registered_name: str | None = None) -> str:
    """Log a saved model folder as an MLflow pyfunc model that loads back; returns its model URI."""
    import mlflow

    code = Path(__file__).parent / "mlflow_models" / ("embedding.py" if kind == "embedding" else "reranker.py")
    python_model = str(code)  # models from code: nothing pickled
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=python_model, artifacts={"model": str(model_dir)},
            pip_requirements=["torch", "transformers", "sentence-transformers", "safetensors", "peft"],
            registered_model_name=registered_name)
    return info.model_uri


# ----------------------------------------------------------------------------- comparison

def search_runs(experiment: str, filter_string: str = "", parents_only: bool = True):
    import mlflow

    df = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string,
                            order_by=["attributes.start_time DESC"])
    if parents_only and not df.empty and "tags.mlflow.parentRunId" in df:
        df = df[df["tags.mlflow.parentRunId"].isna()]
    return df


def comparison_table(experiment: str, filter_string: str = "", metric_prefix: str = "final/"):
    """One row per pipeline run: id, start, preset, ablation, data version and its final metrics."""
    df = search_runs(experiment, filter_string)
    if df.empty:
        return df
    keep = {"run_id": "run_id", "start_time": "start", "status": "status", "tags.preset": "preset",
            "tags.ablation": "ablation", "tags.dvc_data_md5": "data", "tags.config_hash": "config"}
    cols = [c for c in keep if c in df] + sorted(c for c in df if c.startswith(f"metrics.{metric_prefix}"))
    out = df[cols].rename(columns={**keep, **{c: c[len("metrics."):] for c in cols if c.startswith("metrics.")}})
    if "start" in out:
        out["start"] = out["start"].astype(str).str[:19]
    if "data" in out:
        out["data"] = out["data"].astype(str).str[:10]
    return out


# ----------------------------------------------------------------------------- runs whose driver died

def driver_tags() -> dict[str, str]:
    """Tags that let a later run tell whether this run's driver is still alive."""
    import socket

    return {"driver_host": socket.gethostname(), "driver_pid": str(os.getpid()),
            "driver_start": str(_process_start(os.getpid()))}


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a process, or None: with the pid, it names one
    process even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def mark_dead_runs(experiment_id: str) -> list[str]:
    """Runs left RUNNING by a driver of this host that no longer exists (killed with SIGKILL, a
    power cut) are set to KILLED, so `q3e runs compare` does not show them as running; returns their ids."""
    import socket

    import mlflow

    client = mlflow.MlflowClient()
    host, out = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("driver_host") != host or not tags.get("driver_pid", "").isdigit():
            continue  # another machine's run, or one from before these tags: not ours to judge
        pid = int(tags["driver_pid"])
        if _process_start(pid) is not None and str(_process_start(pid)) == tags.get("driver_start"):
            continue  # still running
        client.set_terminated(run.info.run_id, status="KILLED")
        out.append(run.info.run_id)
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                                                       "attributes.status = 'RUNNING'", max_results=1000)
        for child in children:  # its stages' runs died with it
            client.set_terminated(child.info.run_id, status="KILLED")
    if out:
        log.warning("MLflow: %d run(s) left RUNNING by a driver that no longer exists marked KILLED: %s",
                    len(out), ", ".join(out))
    return out
