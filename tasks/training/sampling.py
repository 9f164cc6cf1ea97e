"""Which pairs make up batch b (`TrainConfig.sampling`):

- mixed: seeded per-epoch permutations of all pairs (`steps.batch_indices`), so a batch mixes
  every task the stage trains on;
- task_balanced: each batch holds pairs of one task type, the type drawn with the configured
  weights (default: proportional to its pairs), then the type's next pairs in its own seeded
  per-epoch permutations. In-batch negatives from another task are easy negatives (an NLI
  hypothesis is no competitor for an MS MARCO passage), and the paper's model without merging
  "uses data sampling to balance various tasks" (Table 5).

Both are pure functions of (seed, b): a resumed run draws the batches of the uninterrupted one
and a checkpoint holds no sampler state. In task_balanced mode, batch b's type is the b-th draw
of one seeded stream, and its pairs follow from how many of batches 0..b-1 drew that type.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Sequence

import numpy as np

from tasks.config import DataSource, SamplingConfig
from tasks.data import Pair, PairChain
from tasks.data.pairs import pair_task
from tasks.training.steps import batch_indices

log = logging.getLogger(__name__)

BatchSampler = Callable[[int], list[int]]  # batch number -> indices into the stage's pairs


def task_types(pairs: Sequence[Pair]) -> list[str]:
    """The task type of every pair. A source's `task_type` covers all its pairs without reading
    them (`load_sources` keeps each part's DataSource); the others are read once (`pair_task`)."""
    parts = list(zip(pairs.parts, pairs.sources)) if isinstance(pairs, PairChain) else [(pairs, None)]
    out: list[str] = []
    for part, src in parts:
        if isinstance(src, DataSource) and src.task_type:
            out += [src.task_type] * len(part)
        else:
            out += [pair_task(p) for p in part]
    return out


def _stream_seed(name: str) -> int:
    """A seed of a task type's own pair order that does not depend on which other types exist."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


class TaskBalancedSampler:
    """Batches of one task type each (see the module docstring).

    types: the task type of every pair (`task_types`); weights: type -> weight (>= 0; empty =
    proportional to the type's pairs; non-empty = every type present must be named); size: pairs
    per batch; seed: the stage's seed."""

    def __init__(self, types: Sequence[str], weights: dict[str, float], size: int, seed: int):
        if not types:
            raise ValueError("task_balanced sampling: no pairs")
        self.names = sorted(set(types))
        codes = {t: c for c, t in enumerate(self.names)}
        labels = np.fromiter((codes[t] for t in types), dtype=np.int64, count=len(types))
        self.members = [np.flatnonzero(labels == c) for c in range(len(self.names))]
        sizes = {t: len(m) for t, m in zip(self.names, self.members)}
        listing = ", ".join(f"{t} ({n} pairs)" for t, n in sizes.items())
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"sampling.weights names task type(s) {unknown} that no training pair has; "
                             f"the data's types: {listing}")
        missing = [t for t in self.names if weights and t not in weights]
        if missing:
            raise ValueError(f"sampling.weights gives no weight to task type(s) {missing}; name every type "
                             f"of the data (0 leaves one out): {listing}")
        w = np.array([float(weights[t]) if weights else float(sizes[t]) for t in self.names])
        if not w.sum() > 0:
            raise ValueError(f"sampling.weights are all 0 for the data's types: {listing}")
        self.probs = w / w.sum()
        self.cdf = np.cumsum(self.probs)
        self.last = int(np.flatnonzero(w > 0)[-1])  # u beyond a rounded cdf[-1] still draws a weighted type
        self.size, self.seed = size, seed
        self._rng = np.random.default_rng([seed, 0x7A5C])
        self._draws = np.zeros(0, dtype=np.int64)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # type -> (epoch, its permutation)
        small = [t for t, n in sizes.items() if 0 < n < size and w[codes[t]] > 0]
        if small:
            log.warning("task_balanced sampling: task type(s) %s have fewer pairs than a batch (%d): their "
                        "batches repeat pairs", small, size)
        log.info("task_balanced sampling: %s", ", ".join(f"{t} p={p:.3f}" for t, p in zip(self.names, self.probs)))

    def draws(self, upto: int) -> np.ndarray:
        """The task codes of batches 0..upto-1: one uniform per batch from a single seeded stream,
        extended in blocks (the stream's prefix does not depend on how far it was drawn)."""
        if len(self._draws) < upto:
            more = max(upto - len(self._draws), len(self._draws), 1024)
            u = self._rng.random(more)
            codes = np.minimum(np.searchsorted(self.cdf, u, side="right"), self.last)
            self._draws = np.concatenate([self._draws, codes])
        return self._draws[:upto]

    def task(self, batch: int) -> str:
        return self.names[int(self.draws(batch + 1)[batch])]

    def __call__(self, batch: int) -> list[int]:
        draws = self.draws(batch + 1)
        code = int(draws[batch])
        members = self.members[code]
        n = len(members)
        earlier = int(np.count_nonzero(draws[:batch] == code))  # this type's batches before this one
        out = []
        for k in range(earlier * self.size, (earlier + 1) * self.size):
            epoch, pos = divmod(k, n)
            cached = self._perms.get(code)
            if cached is None or cached[0] != epoch:
                cached = (epoch, np.random.default_rng([self.seed, _stream_seed(self.names[code]), epoch]).permutation(n))
                self._perms[code] = cached
            out.append(int(members[cached[1][pos]]))
        return out


def batch_sampler(cfg: SamplingConfig, pairs: Sequence[Pair], size: int, seed: int) -> BatchSampler:
    """The stage's batches: batch number -> indices into `pairs` (`size` of them)."""
    if cfg.mode == "mixed":
        n = len(pairs)
        return lambda b: batch_indices(n, b, size, seed)
    return TaskBalancedSampler(task_types(pairs), cfg.weights, size, seed)
