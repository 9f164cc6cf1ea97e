"""Ray at the edge: connect (or start a local instance) and run a stage's heavy work as a Ray task.

With no address configured, a local Ray instance is started with the machine's CPUs and no
dashboard; `infra.ray_address` (or RAY_ADDRESS) points at a cluster instead (`auto`,
`ray://head:10001`, `10.0.0.5:6379`): configuration only. On a cluster, the run folder must be
on storage every node sees (NFS, a mounted bucket), as stage inputs and outputs are paths.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

# Variables a Ray worker needs to see the same world as the driver (set before ray.init: workers
# do not see variables set afterwards).
FORWARDED_ENV = ("Q3E_CACHE_DIR", "Q3E_CONF_DIR", "Q3E_SHARED_DATA", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS")


def init_ray(address: str | None = None, num_cpus: int | None = None, *, object_store_mb: int | None = None):
    """Connect to `address` (or RAY_ADDRESS), else start a local instance; idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    t0 = time.perf_counter()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        kwargs: dict[str, Any] = dict(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                                      runtime_env=runtime_env, log_to_driver=True)
        if object_store_mb:
            kwargs["object_store_memory"] = object_store_mb * 2**20
        ray.init(**kwargs)
    log.info("ray %s in %.1f s: %s", "connected" if address else "started", time.perf_counter() - t0,
             {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
    return ray


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _threaded(fn: Callable, num_threads: int) -> Callable:
    def call(*args, **kwargs):
        import torch

        # Ray sets OMP_NUM_THREADS from the task's CPUs; make torch use exactly that many.
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
    remote = ray.remote(num_cpus=cpus, num_gpus=num_gpus, max_retries=max_retries)(_threaded(fn, int(cpus)))
    return ray.get(remote.remote(*args, **kwargs))
