"""Ray at the edge: connect (or start a local instance), run a stage's heavy work as a Ray task,
or spread shards over a pool of Ray actors.

The flow (or the command line) connects once, with `init_ray`, and decides where a stage's actors
run, with `place_actors`: a `Placement` (how many actors, CPUs and GPUs each) it hands to the stage.
A stage only uses the Ray that is up; called as a library with no placement, it takes its config's
own request, and with no Ray up it starts a local instance for the call (`ray_for`).

With no address configured, a local Ray instance is started with the machine's CPUs and no
dashboard, reachable from this machine only: every Ray process listens on 127.0.0.1 (Ray's own
local-only mode, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`; set it to 1 to open the local instance
to other nodes), and Ray's token authentication stays on; `infra.ray_address` (or RAY_ADDRESS) points at a cluster instead (`auto`,
`ray://head:10001`, `10.0.0.5:6379`): configuration only. On a cluster, the run folder must be
on storage every node sees (NFS, a mounted bucket), as stage inputs and outputs are paths.

A worker process that dies (killed, out of memory, node lost) is replaced and its task run again,
once by default: tasks return their results to the driver, which writes each output file
atomically, so a retried task can neither duplicate nor half-write anything.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from tasks.config import FilterConfig, SynthConfig

log = logging.getLogger(__name__)

# Variables a Ray worker needs to see the same world as the driver (set before ray.init: workers
# do not see variables set afterwards). A cluster's workers get them as the job's runtime_env; a local
# instance's workers inherit the driver's whole environment from the processes ray.init starts, so it
# gets none: a runtime_env starts every worker through Ray's setup_worker.py, one more interpreter
# (0.4 s an actor on this 2-core machine).
FORWARDED_ENV = ("Q3E_CACHE_DIR", "Q3E_CONF_DIR", "Q3E_SHARED_DATA", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS")


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_only() -> None:
    """Make the next local `ray.init()` bind every Ray process to 127.0.0.1.

    Ray on Linux advertises the machine's external address and its gRPC servers listen on every
    interface; on macOS and Windows it keeps to the loopback address. That mode is switched by
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when Ray is imported (so the module constant is
    set too, for a Ray already imported) and inherited by the processes Ray starts. A value the
    user set is left as it is."""
    if LOCAL_ONLY_ENV in os.environ:
        return
    os.environ[LOCAL_ONLY_ENV] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int | None = None, *, object_store_mb: int | None = None):
    """Connect to `address` (or RAY_ADDRESS), else start a local instance; idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    if address:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    else:
        local_only()
        kwargs: dict[str, Any] = dict(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                                      log_to_driver=True)
        if object_store_mb:
            kwargs["object_store_memory"] = object_store_mb * 2**20
        ray.init(**kwargs)
    log.info("ray %s in %.1f s: %s", "connected" if address else "started", time.perf_counter() - t0,
             {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
    return ray


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def task_threads(cpus: float) -> int:
    """torch threads of a task that holds `cpus` CPUs: one per CPU, at most the OMP_NUM_THREADS of
    the driver's environment where it is set (a machine shared with other jobs, parallel tests)."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    n = max(1, int(cpus))
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


def _threaded(fn: Callable, num_threads: int) -> Callable:
    def call(*args, **kwargs):
        import torch

        # Ray sets OMP_NUM_THREADS in the worker from the task's CPUs; torch uses what the driver decided.
        torch.set_num_threads(max(1, num_threads))
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        return result, time.perf_counter() - t0

    return call


def run_remote(fn: Callable, *args, num_cpus: float | None = None, num_gpus: float = 0.0,
               max_retries: int = 1, **kwargs) -> tuple[Any, float]:
    """Run `fn(*args, **kwargs)` as one Ray task with these resources; returns (result, compute seconds).
    Retried once if its worker dies (stages resume from their own checkpoints/shards)."""
    import ray

    cpus = num_cpus if num_cpus is not None else cluster_cpus()
    remote = ray.remote(num_cpus=cpus, num_gpus=num_gpus, max_retries=max_retries)(_threaded(fn, task_threads(cpus)))
    return ray.get(remote.remote(*args, **kwargs))


@dataclass(frozen=True)
class Placement:
    """Where a stage's pool of Ray actors runs: `actors` actors, each holding `cpus` CPUs and `gpus`
    GPUs (a fraction shares a device). Decided by the flow or the command line (`place_actors`)."""

    actors: int
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus <= 0 or self.gpus < 0:
            raise ValueError(f"a placement needs actors >= 1, cpus > 0 and gpus >= 0, got {self}")

    @classmethod
    def requested(cls, section: SynthConfig | FilterConfig) -> Placement:
        """What a stage's config asks for: `workers` actors of `cpus_per_worker` / `gpus_per_worker`."""
        return cls(section.workers, section.cpus_per_worker, section.gpus_per_worker)

    @property
    def threads(self) -> int:
        """torch threads in each actor: its whole CPUs, at least one."""
        return max(1, round(self.cpus))

    @property
    def total_cpus(self) -> int:
        return max(1, math.ceil(self.actors * self.cpus))


def place_actors(section: SynthConfig | FilterConfig, name: str, *, address: str | None = None,
                 resources: dict[str, float] | None = None) -> Placement:
    """The pool a stage's actors get, from its config section (`name`: synth, filter) and the Ray
    cluster's total `resources` (default: those of the Ray that `init_ray` brought up).

    The embedded Ray (no `address`, no $RAY_ADDRESS) is this machine: the pool is cut to the actors
    its CPUs and GPUs hold at once (one more would never start, and the shards queued on it would
    wait for ever), and a pool that does not fit even once is an error. A cluster (`address`) may
    add nodes on demand (its autoscaler), so its request stands, with a warning when the nodes up
    now cannot hold it."""
    want = Placement.requested(section)
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    have = {k: float(resources.get(k, 0.0)) for k in ("CPU", "GPU")}
    # the epsilon: 0.3 / 0.1 is 2.999... in floats, while Ray (counting in units of 1e-4) fits 3
    fits = min([math.floor(have["CPU"] / want.cpus + 1e-6)]
               + ([math.floor(have["GPU"] / want.gpus + 1e-6)] if want.gpus else []))
    if fits >= want.actors:
        return want
    asked = (f"{name}.workers={want.actors} actors of {want.cpus:g} CPU(s) and {want.gpus:g} GPU(s) each "
             f"({name}.cpus_per_worker, {name}.gpus_per_worker)")
    has = f"{have['CPU']:g} CPU(s) and {have['GPU']:g} GPU(s)"
    if address or os.environ.get("RAY_ADDRESS"):
        log.warning("%s: the Ray cluster has %s now, fewer than %s; the actors that do not fit "
                    "wait for nodes", name, has, asked)
        return want
    if fits < 1:
        raise ValueError(f"{name}: not one actor of {asked} fits on the local Ray, which has {has} "
                         f"(infra.ray_num_cpus sets its CPUs)")
    log.info("%s: %d actor(s): the local Ray, with %s, holds no more of %s", name, fits, has, asked)
    return replace(want, actors=fits)


@contextmanager
def ray_for(placement: Placement) -> Iterator[None]:
    """The Ray a stage's actors run on: the instance already up (the flow's or the command line's,
    `init_ray`), as it is; else (a stage called as a library) `init_ray` with the placement's CPUs,
    a local instance (or $RAY_ADDRESS's cluster), shut down on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    init_ray(num_cpus=placement.total_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def run_on_actors(actor_cls: type, init_args: tuple, tasks: Sequence[tuple[Any, str, tuple]], *,
                  placement: Placement, on_result: Callable[[Any, Any], None],
                  progress: bool = True, desc: str = "shards", total: int | None = None,
                  max_restarts: int = 1) -> None:
    """Run `actor.<method>(*args)` for each (key, method, args) on a pool of `placement.actors`
    actors (no more than there are tasks), each built once with `init_args` and holding the
    placement's CPUs and GPUs; `on_result(key, result)` runs in the driver as results arrive.

    An actor whose process dies is restarted (its `__init__` runs again) and the task it was
    running is retried, up to `max_restarts` times per actor. A task that fails otherwise (an
    exception) is not retried: the tasks in flight still finish (and are handed to on_result)
    before the first error is raised, so a rerun has less to redo."""
    import ray
    from tqdm.auto import tqdm

    todo = list(tasks)
    if not todo:
        return
    remote = ray.remote(actor_cls).options(num_cpus=placement.cpus, num_gpus=placement.gpus,
                                           max_restarts=max_restarts, max_task_retries=max_restarts)
    actors = [remote.remote(*init_args) for _ in range(min(placement.actors, len(todo)))]
    total = total if total is not None else len(todo)
    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit="shard", disable=not progress)
    in_flight: dict[Any, tuple[Any, Any]] = {}
    error: BaseException | None = None

    def submit(actor) -> None:
        key, method, args = todo.pop(0)
        in_flight[getattr(actor, method).remote(*args)] = (actor, key)

    try:
        for a in actors:
            if todo:
                submit(a)
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, key = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - re-raised once the others are in
                error = error or e
                continue
            on_result(key, result)
            bar.update(1)
            if todo and error is None:
                submit(actor)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    if error is not None:
        raise error
