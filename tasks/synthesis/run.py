"""The synthesis stage's entry point, `synthesize`: plans the passages, retrieves personas, runs the
missing shards on Ray and writes the stats.

Layout of `out_dir`:
  shard-00000.jsonl ...        accepted pairs (ms-swift format + `instruction` + `meta` provenance)
  rejected/rejected-00000.jsonl  rejected samples with stage, reason and the LLM's last output
                               (a subfolder, so a trainer that reads `out_dir/*.jsonl` sees only pairs)
  stats.json                   counts, acceptance, rejection reasons, throughput of the last run
  manifest.json                what the shards were made from; a rerun with other settings is refused
Shard i holds passages [i*shard_size, (i+1)*shard_size) and is a deterministic function of those
passages, the config and the seed; a rerun generates only missing shards, so a killed-and-resumed
run ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.config import SynthConfig
from tasks.data import atomic_write_text, iter_jsonl, resolve_path, write_jsonl
from tasks.distributed import Placement, ray_for, run_on_actors
from tasks.synthesis.encoders import persona_cache, persona_encoder
from tasks.synthesis.engines import SynthWorker, run_on_ray_data
from tasks.synthesis.generators import Generator, Secret, build_generator
from tasks.synthesis.plan import (
    Passage, check_config, load_passages, load_personas, make_plan, relevant_texts, retrieve_personas,
)
from tasks.synthesis.prompts import PROMPT_VERSION
from tasks.synthesis.text import truncate_words

log = logging.getLogger(__name__)


@dataclass
class SynthResult:
    out_dir: Path
    shards: list[Path]
    stats: dict[str, Any]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.jsonl"


def rejected_name(i: int) -> str:
    return f"rejected/rejected-{i:05d}.jsonl"


def content_settings(cfg: SynthConfig) -> dict[str, Any]:
    """The settings the shards' content depends on (not where or how fast it runs)."""
    d = cfg.model_dump(mode="json")
    for k in ("enabled", "engine", "workers", "cpus_per_worker", "gpus_per_worker", "num_passages", "reuse"):
        d.pop(k, None)
    for k in ("base_url", "api_key_env", "concurrency", "timeout_s", "http_retries", "backoff_s",
              "max_backoff_s", "vllm_args"):
        d["generator"].pop(k, None)
    if not d["generator"]["chat_template_kwargs"]:  # absent when unused: older folders still resume
        del d["generator"]["chat_template_kwargs"]
    if not d["generator"]["structured"]:  # the same: folders made before structured decoding were without it
        del d["generator"]["structured"]
    if d["generator"]["context_guidance"] == 1:  # the same: folders made before the setting existed
        del d["generator"]["context_guidance"]
    if not d["exclude_relevant"]:  # the same: folders made before the setting existed
        del d["exclude_relevant"]
    return d


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def synth_manifest(cfg: SynthConfig, root: str | Path | None = None) -> tuple[list[Passage], dict[str, Any]]:
    """The passages a synthesis run uses and its manifest: everything its shards' content depends
    on. Two runs with equal manifests write the same shards, so a folder with this manifest can be
    resumed or reused (`synth.reuse`)."""
    passages = load_passages(cfg.passages, root=root, limit=cfg.num_passages,
                             exclude=relevant_texts(cfg.exclude_relevant, root=root),
                             sample_seed=cfg.seed if cfg.passage_order == "sample" else None)
    persona_path = resolve_path(cfg.personas, root)
    return passages, {
        "prompt_version": PROMPT_VERSION, "settings": content_settings(cfg),
        "passages": _sha("\n".join(f"{p.source}|{p.id}|{p.text}" for p in passages).encode()),
        "personas": _sha(persona_path.read_bytes()) if persona_path.is_file() else None,
        "persona_retriever": cfg.persona_retriever, "num_shards": math.ceil(len(passages) / cfg.shard_size),
    }


def _reuse(cfg: SynthConfig, root: Path, out_dir: Path, manifest: dict[str, Any]) -> str | None:
    """Copy the shards of `cfg.reuse` (a folder made by `q3e synth` with the same settings) into
    `out_dir`; returns the folder, or None (with a warning naming what differs) when it was made
    with other settings or is missing, in which case the run generates its own."""
    import shutil

    src = resolve_path(cfg.reuse, root)
    if not (src / "manifest.json").is_file():
        log.warning("synth.reuse: %s has no manifest.json (not a `q3e synth` folder): generating in this run", src)
        return None
    made = json.loads((src / "manifest.json").read_text())
    diff = sorted(k for k in set(made) | set(manifest) if made.get(k) != manifest.get(k))
    if diff:
        log.warning("synth.reuse: %s was made with other settings (%s differ): generating in this run; "
                    "`q3e synth --out %s` with these settings remakes it", src, ", ".join(diff), cfg.reuse)
        return None
    shards = [shard_name(i) for i in range(manifest["num_shards"])]
    if not all((src / name).is_file() for name in shards):
        log.warning("synth.reuse: %s lacks some of its %d shards: generating the missing ones in this run",
                    src, len(shards))
    for name in ["manifest.json"] + [rejected_name(i) for i in range(manifest["num_shards"])] + shards:
        if (src / name).is_file() and not (out_dir / name).is_file():  # shards last: each marks one done
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, out_dir / name)
    log.info("synthesis: reusing %s (made by `q3e synth` with these settings; synth.reuse=null generates "
             "the pairs in this run instead)", src)
    return str(cfg.reuse)


def _check_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = out_dir / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(f"{out_dir}: its shards were made with other settings ({', '.join(diff)} differ); "
                             f"use a new output folder or delete this one")
    else:
        atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def use_prefill(cfg: SynthConfig) -> bool:
    """Structured decoding writes the whole answer (the grammar must see its opening), so it
    replaces the prefill; without it the prefill is on by default for the local backends."""
    g = cfg.generator
    if g.structured:
        return False
    return g.json_prefill if g.json_prefill is not None else g.backend in ("transformers", "vllm")


def synthesize(cfg: SynthConfig, out_dir: str | Path, *, data_root: str | Path | None = None,
               placement: Placement | None = None, progress: bool = True,
               generator_factory: Callable[[], Generator] | None = None) -> SynthResult:
    """Synthesise training pairs from `cfg.passages` into sharded JSONL under `out_dir`.

    Relative paths in `cfg` are resolved against `data_root` (default: the working directory).
    The shards run on Ray actors as `placement` says (the flow's `place_actors`) on the Ray that
    is up; with no placement, as `cfg` asks (`workers`, `cpus_per_worker`, `gpus_per_worker`), and
    with no Ray up on a local instance started for the call (`ray_for`). `generator_factory` (a
    picklable zero-argument callable) replaces the configured backend: it is called once in each
    Ray worker. Only missing shards are generated."""
    t0 = time.perf_counter()
    check_config(cfg)
    out_dir = Path(out_dir)
    root = Path(data_root) if data_root is not None else Path.cwd()
    passages, manifest = synth_manifest(cfg, root)
    persona_path = resolve_path(cfg.personas, root)
    plans = [make_plan(p, cfg) for p in passages]
    n_shards = manifest["num_shards"]
    out_dir.mkdir(parents=True, exist_ok=True)
    reused_from = _reuse(cfg, root, out_dir, manifest) if cfg.reuse else None
    _check_manifest(out_dir, manifest)
    missing = [i for i in range(n_shards) if not (out_dir / shard_name(i)).is_file()]
    todo_plans = [pl for i in missing for pl in plans[i * cfg.shard_size:(i + 1) * cfg.shard_size]]
    log.info("synthesis: %d passages in %d shards, %d to generate -> %s", len(plans), n_shards, len(missing), out_dir)

    # Persona retrieval in the driver: one small encoder, one cached persona matrix for all shards.
    retrieval = [pl for pl in todo_plans if pl.kind == "retrieval"]
    if retrieval:
        personas = load_personas(persona_path)
        encoder = persona_encoder(cfg.persona_retriever)
        cache = persona_cache(persona_path, cfg.persona_retriever)
        tops = retrieve_personas([truncate_words(pl.passage.text, cfg.max_passage_words) for pl in retrieval],
                                 personas, encoder, top_k=cfg.top_personas, cache=cache)
        for pl, top in zip(retrieval, tops):
            pl.personas = top

    gen_seconds = 0.0

    def write(i: int, result: dict[str, Any]) -> None:
        nonlocal gen_seconds
        gen_seconds += result["seconds"]
        write_jsonl(out_dir / rejected_name(i), result["rejected"])
        write_jsonl(out_dir / shard_name(i), result["accepted"])  # last: its presence marks the shard done

    placement = placement or Placement.requested(cfg)
    if missing:
        factory = generator_factory or functools.partial(
            build_generator, cfg.generator, api_key=Secret.from_env(cfg.generator.api_key_env))
        prefill = use_prefill(cfg)
        shards = {i: plans[i * cfg.shard_size:(i + 1) * cfg.shard_size] for i in missing}
        with ray_for(placement):
            if cfg.engine == "ray_data":
                run_on_ray_data(shards, cfg, (factory, placement.threads, cfg, prefill), placement=placement,
                                on_result=write, progress=progress)
            else:
                tasks = [(i, "run", (i, shard, cfg, prefill)) for i, shard in shards.items()]
                run_on_actors(SynthWorker, (factory, placement.threads), tasks, placement=placement,
                              on_result=write, progress=progress, desc="synth", total=n_shards)
    seconds = time.perf_counter() - t0
    stats = shard_stats(out_dir, n_shards)
    new_accepted = sum(1 for i in missing for _ in iter_jsonl(out_dir / shard_name(i)))
    stats["run"] = {
        "workers": placement.actors, "shards_generated": len(missing),
        "shards_reused": n_shards - len(missing),
        "reused_from": reused_from,
        "passages_generated": len(todo_plans), "accepted_generated": new_accepted,
        "seconds": round(seconds, 2), "generation_seconds": round(gen_seconds, 2),
        "accepted_per_min": round(60 * new_accepted / seconds, 2) if missing else None,
        "passages_per_min": round(60 * len(todo_plans) / seconds, 2) if missing else None,
    }
    atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    if progress:
        print_summary(stats, title=f"synthesis -> {out_dir}")
    return SynthResult(out_dir, [out_dir / shard_name(i) for i in range(n_shards)], stats)


def shard_stats(out_dir: Path, n_shards: int) -> dict[str, Any]:
    """Counts over all shards on disk (deterministic: the same for a resumed and an uninterrupted
    run), read one record at a time: 12M accepted pairs are counted, never held."""
    by_kind: dict[str, dict[str, int]] = {}
    counts = {key: Counter() for key in ("question_type", "difficulty", "language")}
    reasons: Counter = Counter()
    generators: set[str] = set()
    accepted = rejected = llm_calls = 0
    for i in range(n_shards):
        for _, r in iter_jsonl(out_dir / shard_name(i)):
            m = r.get("meta", {})
            accepted += 1
            by_kind.setdefault(m.get("task"), {"accepted": 0, "rejected": 0})["accepted"] += 1
            for key, counter in counts.items():
                if m.get(key) is not None:
                    counter[str(m[key])] += 1
            generators.add(str(m.get("generator")))
            llm_calls += m.get("llm_calls", 0)
        for _, r in iter_jsonl(out_dir / rejected_name(i)):
            rejected += 1
            by_kind.setdefault(r.get("task"), {"accepted": 0, "rejected": 0})["rejected"] += 1
            reasons[r["reason"]] += 1
            generators.add(str(r.get("meta", {}).get("generator")))
            llm_calls += r["meta"].get("llm_calls", 0)
    total = accepted + rejected
    gens = sorted(generators)
    return {
        "prompt_version": PROMPT_VERSION, "generator": gens[0] if len(gens) == 1 else gens,
        "shards": n_shards, "passages": total, "accepted": accepted, "rejected": rejected,
        "acceptance_rate": round(accepted / total, 4) if total else 0.0,
        "llm_calls": llm_calls,
        "by_kind": dict(sorted(by_kind.items())),
        "by_question_type": dict(sorted(counts["question_type"].items())),
        "by_difficulty": dict(sorted(counts["difficulty"].items())),
        "by_language": dict(sorted(counts["language"].items())),
        "rejection_reasons": dict(reasons.most_common()),
    }


def print_summary(stats: dict[str, Any], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("passages / shards", f"{stats['passages']} / {stats['shards']}")
    t.add_row("accepted", f"{stats['accepted']} ({100 * stats['acceptance_rate']:.1f}%)")
    t.add_row("rejected", str(stats["rejected"]))
    for kind, c in stats["by_kind"].items():
        t.add_row(f"  {kind}", f"{c['accepted']} accepted, {c['rejected']} rejected")
    for name in ("by_question_type", "by_difficulty", "by_language"):
        if stats[name]:
            t.add_row(name.replace("by_", "").replace("_", " "), ", ".join(f"{k} {v}" for k, v in stats[name].items()))
    for reason, n in list(stats["rejection_reasons"].items())[:6]:
        t.add_row(f"  rejected: {reason}", str(n))
    run = stats.get("run") or {}
    if run:
        t.add_row("shards generated / reused", f"{run['shards_generated']} / {run['shards_reused']}")
        if run.get("reused_from"):
            t.add_row("reused from", f"{run['reused_from']} (synth.reuse=null regenerates)")
        t.add_row("time", f"{run['seconds']:.1f} s with {run['workers']} worker(s)")
        if run.get("accepted_per_min") is not None:
            t.add_row("throughput", f"{run['accepted_per_min']:.1f} accepted pairs/min")
    Console().print(t)
