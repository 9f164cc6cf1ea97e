"""The engines that run synthesis shards on Ray (`synth.engine`): `SynthWorker`, a Ray actor that
takes shard after shard (`actors`), and `SynthShards`, its Ray Data `map_batches` form (`ray_data`)."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from typing import Any, Callable

from tasks.config import SynthConfig
from tasks.distributed import Placement
from tasks.synthesis.generators import Generator
from tasks.synthesis.plan import Passage, Plan
from tasks.synthesis.shard import synthesize_shard


class SynthWorker:
    """A Ray actor: loads the generator once, then synthesises shard after shard."""

    def __init__(self, factory: Callable[[], Generator], num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.generator = factory()

    def run(self, shard: int, plans: list[Plan], cfg: SynthConfig, prefill: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        accepted, rejected = synthesize_shard(self.generator, plans, cfg, shard, prefill=prefill)
        return {"accepted": accepted, "rejected": rejected, "seconds": time.perf_counter() - t0}


class SynthShards(SynthWorker):
    """The `map_batches` UDF of the ray_data engine: a batch holds whole shards' plans (one row per
    passage); it returns one row per shard with its records as JSON text (their fields vary by task
    kind, which a columnar block handles badly)."""

    def __init__(self, factory: Callable[[], Generator], num_threads: int, cfg: SynthConfig, prefill: bool):
        super().__init__(factory, num_threads)
        self.cfg = cfg
        self.prefill = prefill

    def __call__(self, batch) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "passages": [], "accepted": [], "rejected": [], "seconds": []}
        for shard, rows in itertools.groupby(batch.to_pylist(), key=lambda r: r["shard"]):
            plans = [plan_from_row(r) for r in rows]
            result = self.run(shard, plans, self.cfg, self.prefill)
            out["shard"].append(shard)
            out["passages"].append(len(plans))
            out["accepted"].append(json.dumps(result["accepted"], ensure_ascii=False))
            out["rejected"].append(json.dumps(result["rejected"], ensure_ascii=False))
            out["seconds"].append(result["seconds"])
        return out


def plan_row(plan: Plan, shard: int) -> dict[str, Any]:
    """A plan as a Ray Data row (the passage becomes a struct column)."""
    return {"shard": shard, **asdict(plan)}


def plan_from_row(row: dict[str, Any]) -> Plan:
    fields = {k: v for k, v in row.items() if k != "shard"}
    return Plan(**fields | {"passage": Passage(**row["passage"]), "personas": list(row["personas"] or [])})


def run_on_ray_data(shards: dict[int, list[Plan]], cfg: SynthConfig, init_args: tuple, *,
                    placement: Placement, on_result: Callable[[int, dict[str, Any]], None],
                    progress: bool = True) -> None:
    """Synthesise `shards` (index -> plans) with Ray Data: one block per shard, `map_batches` of
    `SynthShards` on a pool of `placement.actors` actors (no more than there are shards), each
    with the placement's CPUs and GPUs, and `batch_size=shard_size`, so every batch is one whole
    shard (Ray Data joins blocks smaller than a batch, and only the corpus's last shard is short)
    and its records equal the actor engine's. `on_result(shard, result)` runs in the driver as
    shards stream out; a failure stops the run, losing only the shards still in flight. The pool's
    actors end with the run, however it ends (they run in a placement group removed at the end)."""
    import pyarrow as pa
    import ray.data
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rows = {i: [plan_row(p, i) for p in plans] for i, plans in shards.items()}
    schema = pa.Table.from_pylist([r for shard_rows in rows.values() for r in shard_rows]).schema
    ds = ray.data.from_arrow([pa.Table.from_pylist(r, schema=schema) for r in rows.values()])
    actors = min(placement.actors, len(rows))
    # The pool runs in a placement group of its own, removed when the run ends however it ends:
    # that kills its actors. Ray Data, stopped by an error, only drops its handles to them, and
    # the error's traceback and the executor hold each other (and the handles) in reference
    # cycles, so until Python's cycle collector happens to run the actors would live on, holding
    # their CPUs, and a rerun or a later stage that needs them would wait for ever.
    group = placement_group([{"CPU": placement.cpus} | ({"GPU": placement.gpus} if placement.gpus else {})]
                            * actors)
    try:
        ds = ds.map_batches(SynthShards, fn_constructor_args=init_args, batch_size=cfg.shard_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=placement.cpus, num_gpus=placement.gpus,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(group))
        ctx = ds.context
        ctx.raise_original_map_exception = True  # a GeneratorError reaches the caller as itself
        ctx.enable_progress_bars = ctx.print_on_execution_start = progress
        for row in ds.iter_rows():
            i = int(row["shard"])
            if row["passages"] != len(shards[i]):
                raise RuntimeError(f"Ray Data gave a worker part of shard {i} ({row['passages']} of "
                                   f"{len(shards[i])} passages); the shard was not written")
            on_result(i, {"accepted": json.loads(row["accepted"]), "rejected": json.loads(row["rejected"]),
                          "seconds": row["seconds"]})
    finally:
        remove_placement_group(group)
