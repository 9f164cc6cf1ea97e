"""Content-addressed stage artifacts, and the stage entry points the pipeline runs on Ray.

A stage's folder is `<root>/<kind>/<stage>/<key>` where `key` hashes everything the stage's
output depends on: its own config section, the model config, and the keys of the stages it
reads. Same key = same inputs = reuse the folder (its `done.json` says it is complete); any
change upstream changes every key downstream, so exactly those stages run again. A stage that
failed halfway left its checkpoints/shards in its folder and resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import DataSource, EvalConfig, ModelConfig, Resources, SynthConfig, TrainConfig
from tasks.data import atomic_write_text
from tasks.distributed import Placement

# Bump when a stage's output format or semantics change, so old artifacts are not reused.
ARTIFACT_VERSION = "1"


def _jsonable(x: Any) -> Any:
    if hasattr(x, "key_dump"):
        return x.key_dump()
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json")
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def stage_key(name: str, **inputs: Any) -> str:
    blob = json.dumps({"stage": name, "version": ARTIFACT_VERSION, "inputs": _jsonable(inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageDir:
    name: str
    key: str
    path: Path

    @property
    def marker(self) -> Path:
        return self.path / "done.json"

    def result(self) -> dict | None:
        """The recorded result if the stage completed, else None."""
        if self.marker.is_file():
            try:
                return json.loads(self.marker.read_text())
            except json.JSONDecodeError:
                return None
        return None

    def complete(self, result: dict) -> dict:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.marker, json.dumps(_jsonable(result), indent=2))
        return result


def stage_dir(base: Path, name: str, key: str, folder: str | None = None) -> StageDir:
    """The folder of stage `name` for `key`: `base/<folder or name>/<key>`."""
    return StageDir(name, key, base / (folder or name) / key)


def file_digest(path: str | Path, setting: str) -> str:
    """The content hash of a file a stage reads by name (`setting` names where the path came from):
    an edited file changes the key though its path does not."""
    from tasks.data import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{setting}: {p} not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def folder_digest(path: str | Path) -> str | None:
    """The content hash of the files under a folder (their names and bytes, in name order); None
    where there is no folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def key_model(model: ModelConfig, *, gpu: bool, reranker: bool = False) -> ModelConfig:
    """`model` as a stage key holds it: `autocast: auto` as the stage's device resolves it (a GPU
    where the stage asks for one, else this machine's default device), so a model trained or
    scored in bf16 and one in float32 never share a folder; `share_rerank_prefix` only where the
    stage trains a reranker (an embedder never reads it)."""
    from tasks.models.backbone import default_device, resolve_autocast

    device = "cuda" if gpu else default_device()
    update: dict[str, Any] = {"autocast": resolve_autocast(model.autocast, device)}
    if not reranker:
        update["share_rerank_prefix"] = False
    return model.model_copy(update=update)


def train_key(name: str, *, train: TrainConfig, model: ModelConfig, **inputs: Any) -> str:
    """The key of a training stage: `stage_key` over `key_model(model)` on the stage's device."""
    gpu = train.resources.gpus > 0 or (train.distributed.engine == "ray_train" and train.distributed.use_gpu)
    reranker = train.objective != "embedding"
    if reranker:  # the reranker trains on eq. 2 whatever `loss` (eq. 1's settings) says
        train = train.model_copy(update={"loss": None})
    return stage_key(name, train=train, model=key_model(model, gpu=gpu, reranker=reranker), **inputs)


def synth_key(cfg: SynthConfig, *, data: str, root: str | Path) -> str:
    """The key of synthesis: its config, the data version, the prompts' version (an edited prompt
    writes other pairs from the same settings) and, with `synth.reuse`, the contents of the reused
    folder (`q3e synth --out` remakes it under the same path)."""
    from tasks.data import resolve_path
    from tasks.synthesis.prompts import PROMPT_VERSION

    inputs: dict[str, Any] = {"prompts": PROMPT_VERSION}
    if cfg.reuse:
        inputs["reused"] = folder_digest(resolve_path(cfg.reuse, root))
    return stage_key("synthesis", synth=cfg, data=data, **inputs)


def eval_key(cfg: EvalConfig, *, model: str, reranker: str | None, data: str, root: str | Path) -> str:
    """The key of one model's evaluation: the eval config, the keys of the model (and reranker) it
    scores, the data version, and the contents of the files it reads by name: the task instructions
    (conf/task_prompts.json) and, where a reranker reranks it, the first stage `eval.first_stage`
    (a path relative to the project root `root`)."""
    from tasks.data import resolve_path
    from tasks.evaluation.prompts import PROMPTS_FILE

    inputs: dict[str, Any] = {"prompts": file_digest(PROMPTS_FILE, "task prompts")}
    if cfg.first_stage and reranker is not None:  # only the reranked scores read it
        inputs["first_stage"] = file_digest(resolve_path(cfg.first_stage, root), "eval.first_stage")
    # eval.autocast `auto` as this machine resolves it: bf16 and float32 scores get their own keys
    from tasks.models.backbone import default_device, resolve_autocast

    cfg = cfg.model_copy(update={"autocast": resolve_autocast(cfg.autocast, default_device())})
    return stage_key("eval", eval=cfg, model=model, reranker=reranker, data=data, **inputs)


# ----------------------------------------------------------------------------- entry points (run on Ray)

def train_resources(cfg: TrainConfig) -> Resources | None:
    """The Ray task a training stage runs in; None = run it in the driver: with
    `distributed.engine: ray_train`, Ray Train places its own workers (a task holding the CPUs
    would leave none for them)."""
    return None if cfg.distributed.engine == "ray_train" else cfg.resources


def train_stage(cfg: TrainConfig, model_cfg: ModelConfig, out_dir: str, *, init: str | None = None,
                extra_data: list[str] | None = None, data_root: str | None = None) -> dict:
    """Train one stage; `extra_data` = folders of synthetic shards appended to the stage's data.
    The engine (one process, or Ray Train workers) is `cfg.distributed.engine`."""
    from tasks.training import train

    sources = list(cfg.data) + [DataSource(path=p) for p in (extra_data or [])]
    cfg = cfg.model_copy(update={"data": sources})
    res = train(cfg, model_cfg, out_dir, init=init, data_root=data_root, progress=True)
    return {"final": str(res.final), "checkpoints": [str(c) for c in res.checkpoints],
            "seconds_per_step": res.seconds_per_step, "peak_memory_mb": res.peak_memory_mb,
            "steps": len(res.history), "first_loss": res.history[0]["loss"] if res.history else None,
            "last_loss": res.history[-1]["loss"] if res.history else None,
            "history": str(Path(out_dir) / "metrics.jsonl"), "loss_plot": str(res.final / "loss.png")}


def backbone_stage(model_cfg: ModelConfig, out_dir: str) -> dict:
    """The backbone as a stage 2 without stage 1 starts from it, saved as a model folder: the base of
    a task_slerp merge of stage-2 models (the deltas are taken from it)."""
    from tasks.models import Embedder

    path = Embedder.load(model_cfg).save(Path(out_dir) / "model")
    return {"final": str(path)}


def merge_stage(checkpoints: list[str], out_dir: str, *, weights: list[float] | None = None,
                base: str | None = None) -> dict:
    from tasks.merge import slerp_merge

    from tasks.merge import MERGE_RECORD

    path = slerp_merge(checkpoints, Path(out_dir) / "model", weights=weights, base=base)
    spread = json.loads((path / MERGE_RECORD).read_text())["relative_spread"]
    return {"final": str(path), "checkpoints": checkpoints, "method": "task_slerp" if base else "slerp",
            "relative_spread": spread}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _under(root: str | None, paths: list[str]) -> list[str]:
    from tasks.data import resolve_path

    return [str(resolve_path(p, root)) for p in paths]


def eval_stage(model, cfg: EvalConfig, out_dir: str, *, reranker: str | None = None,
               data_root: str | None = None, label: str = "model") -> dict:
    """Evaluate one model (and optionally the reranker on a first stage's top-k) through mteb; local
    paths in the eval config are relative to the project root. Returns the results, and per
    benchmark (`<benchmark>@<dim>` for each of eval.dims) its Mean(Task) / Mean(Type) summary."""
    from tasks.evaluation.benchmarks import benchmark_metrics
    from tasks.evaluation.first_stage import first_stage_path
    from tasks.evaluation.run import evaluate_model

    local = {key: _under(data_root, getattr(cfg, key)) for key in ("task_dirs", "sts", "pairclf")}
    if cfg.first_stage:
        local["first_stage"] = _under(data_root, [cfg.first_stage])[0]
    cfg = cfg.model_copy(update=local)
    out = Path(out_dir) / "results.json"
    results: dict = {}
    benchmarks: dict = {}
    metrics: dict = {}
    # the full dimension gives the main scores; each of eval.dims (MRL) adds `<task>@<dim>` entries
    for dim in [None, *cfg.dims]:
        path = out if dim is None else out.with_name(f"results@{dim}.json")
        scores = evaluate_model(model, cfg, reranker=reranker, dim=dim, show=False, out=path)
        results.update(scores if dim is None else {f"{task}@{dim}": m for task, m in scores.items()})
        at = "" if dim is None else f"@{dim}"
        summaries = json.loads(path.read_text()).get("benchmarks", {})
        benchmarks.update({bench + at: summary for bench, summary in summaries.items()})
        # MLflow: eval/<benchmark>/mean_task, with a path-safe name (MTEB(eng, v2) -> MTEB-eng-v2)
        metrics.update({name + at: numbers for name, numbers in benchmark_metrics(summaries).items()})
    table = Path(out_dir) / "results.md"
    rows = ["| task | main score |", "|---|---|"] + [f"| {t} | {m['main_score']:.4f} |" for t, m in results.items()]
    atomic_write_text(table, "\n".join(rows) + "\n")
    out_record = {"results": results, "results_json": str(out), "table": str(table), "label": label,
                  "metrics": {"eval": {**results, **metrics}}}
    if benchmarks:
        out_record["benchmarks"] = benchmarks
    if cfg.save_first_stage and first_stage_path(out).is_file():
        out_record["first_stage"] = str(first_stage_path(out))
    return out_record


def synth_stage(cfg, out_dir: str, *, data_root: str | None = None, placement: Placement | None = None,
                project_root: str | None = None, dvc_remote: str | None = None) -> dict:
    """Synthesis into a DVC-tracked data set folder, its actors placed as `placement` says; returns
    its shard folder and DVC version."""
    from tasks.lineage import track_dataset
    from tasks.synthesis.run import synthesize

    res = synthesize(cfg, out_dir, data_root=data_root, placement=placement, progress=True)
    stats_path = Path(out_dir) / "stats.json"
    out = {"shards_dir": str(res.out_dir), "n_accepted": int(res.stats.get("accepted", 0)),
           "stats": str(stats_path), "metrics": {"synth": _numbers(res.stats)}}
    if project_root:
        out["dvc_synthetic_md5"] = track_dataset(project_root, out_dir, dvc_remote)
    return out


def filter_stage(cfg, pairs_dir: str, out_dir: str, *, embedder: str, placement: Placement | None = None,
                 project_root: str | None = None, dvc_remote: str | None = None) -> dict:
    """Filtering into a DVC-tracked data set folder, its actors placed as `placement` says."""
    from tasks.filter import filter_pairs
    from tasks.lineage import track_dataset

    res = filter_pairs(cfg, pairs_dir, out_dir, embedder=embedder, placement=placement, progress=True)
    out = {"kept_dir": str(res.out_dir), "n_kept": int(res.report.get("kept", 0)),
           "report": str(Path(out_dir) / "report.json"), "histogram": str(res.histogram),
           "metrics": {"filter": _numbers(res.report)}}
    if project_root:
        out["dvc_filtered_md5"] = track_dataset(project_root, out_dir, dvc_remote)
    return out


def _numbers(d: dict, depth: int = 2) -> dict:
    """The numeric leaves of a stats/report dict (for MLflow metrics)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, dict) and depth > 0:
            sub = _numbers(v, depth - 1)
            if sub:
                out[k] = sub
    return out
