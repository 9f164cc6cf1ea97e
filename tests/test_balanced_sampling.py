"""Task-balanced sampling (tasks/training/sampling.py, `TrainConfig.sampling`): one task type per
batch, types drawn with the configured weights, resumable, and `mixed` unchanged."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import ConfigError, DataSource, SamplingConfig, load_config
from tasks.data import Pair, PairChain, load_sources
from tasks.training import TrainingInterrupted, batch_indices, train
from tasks.training.sampling import TaskBalancedSampler, batch_sampler, pair_task, task_types


def make_pairs(sizes: dict[str, int]) -> list[Pair]:
    """Pairs of the given task types (meta.task, as synthetic pairs carry it), interleaved."""
    out = []
    for t, n in sizes.items():
        out += [Pair(f"{t} query {i}", f"{t} doc {i}", meta={"task": t}) for i in range(n)]
    return sorted(out, key=lambda p: int(p.query.rsplit(" ", 1)[1]) * 7 % 11)  # not grouped by type


SIZES = {"retrieval": 40, "sts": 25, "bitext": 12, "classification": 9}


def balanced(weights=None, size=4, seed=0, sizes=SIZES):
    pairs = make_pairs(sizes)
    return pairs, batch_sampler(SamplingConfig(mode="task_balanced", weights=weights or {}), pairs, size, seed)


def test_every_batch_holds_one_task_type():
    pairs, sampler = balanced()
    seen = Counter()
    for b in range(300):
        idx = sampler(b)
        types = {pair_task(pairs[i]) for i in idx}
        assert len(idx) == 4 and len(types) == 1, (b, types)
        assert types == {sampler.task(b)}
        seen[sampler.task(b)] += 1
    assert set(seen) == set(SIZES)


def test_a_types_batches_walk_through_its_own_permutations():
    """Within a type, the first ceil(n / size) batches cover each of its pairs once (an epoch of it)."""
    pairs, sampler = balanced(size=5)
    taken: dict[str, list[int]] = {}
    for b in range(400):
        taken.setdefault(sampler.task(b), []).extend(sampler(b))
    for t, n in SIZES.items():
        assert sorted(taken[t][:n]) == sorted(i for i, p in enumerate(pairs) if pair_task(p) == t)


def _binomial_check(counts: Counter, probs: dict[str, float], draws: int) -> None:
    for t, p in probs.items():
        sd = math.sqrt(draws * p * (1 - p))
        assert abs(counts[t] - draws * p) <= max(5 * sd, 1e-9), (t, counts[t], draws * p, sd)


@pytest.mark.parametrize("weights", [None, {"retrieval": 1.0, "sts": 3.0, "bitext": 0.0, "classification": 1.0}])
def test_batch_frequencies_follow_the_weights(weights):
    """Each batch's type is a draw with p = weight / sum (default: the type's share of the pairs):
    the counts of 5000 batches lie within 5 binomial standard deviations of draws * p."""
    _, sampler = balanced(weights)
    draws = 5000
    counts = Counter(sampler.task(b) for b in range(draws))
    w = weights or SIZES
    probs = {t: w[t] / sum(w.values()) for t in SIZES}
    _binomial_check(counts, probs, draws)
    if weights:
        assert counts["bitext"] == 0  # weight 0 leaves a type out


def test_resume_draws_the_same_batches():
    """Batch b is a pure function of (seed, b): a sampler built afresh at step 137 (a resumed run)
    gives the batches the long-running one gives, whatever it was asked before."""
    _, first = balanced(seed=3)
    run = [first(b) for b in range(300)]
    _, resumed = balanced(seed=3)
    assert [resumed(b) for b in range(137, 300)] == run[137:]
    _, backwards = balanced(seed=3)
    assert [backwards(b) for b in reversed(range(300))] == run[::-1]
    _, other = balanced(seed=4)
    assert [other(b) for b in range(300)] != run


def test_mixed_is_todays_data_order():
    pairs, _ = balanced()
    mixed = batch_sampler(SamplingConfig(mode="mixed", weights={}), pairs, 8, 5)
    assert [mixed(b) for b in range(50)] == [batch_indices(len(pairs), b, 8, 5) for b in range(50)]
    assert load_config("micro").stage2.sampling == SamplingConfig(mode="mixed", weights={})


def test_weights_must_name_the_datas_types():
    pairs = make_pairs(SIZES)
    with pytest.raises(ValueError, match=r"names task type\(s\) \['nli'\] that no training pair has.*"
                                         r"retrieval \(40 pairs\)"):
        TaskBalancedSampler(task_types(pairs), {"nli": 1.0, **{t: 1.0 for t in SIZES}}, 4, 0)
    with pytest.raises(ValueError, match=r"gives no weight to task type\(s\) \['bitext', 'classification'\]"):
        TaskBalancedSampler(task_types(pairs), {"retrieval": 1.0, "sts": 1.0}, 4, 0)
    with pytest.raises(ValueError, match="all 0"):
        TaskBalancedSampler(task_types(pairs), {t: 0.0 for t in SIZES}, 4, 0)
    with pytest.raises(ConfigError, match="sampling.weights"):
        load_config("micro", ["stage2.sampling.weights={sts: -1}"])
    with pytest.raises(ConfigError, match="sampling.mode"):
        load_config("micro", ["stage2.sampling.mode=balanced"])


def test_task_types_from_sources_and_pairs(shared_data, tmp_path):
    """A source's task_type names all its pairs; without one a pair's meta.task, else sts when
    symmetric, else retrieval. Empty sources drop out with their DataSource."""
    assert pair_task(Pair("a", "b")) == "retrieval"
    assert pair_task(Pair("a", "b", symmetric=True)) == "sts"
    assert pair_task(Pair("a", "b", symmetric=True, meta={"task": "bitext"})) == "bitext"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sources = [DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=5),
               DataSource(path=str(empty)),
               DataSource(path=str(shared_data / "zh-pairs" / "zh-nli-train.jsonl"), limit=3, symmetric=True),
               DataSource(path=str(shared_data / "zh-pairs" / "zh-nli-train.jsonl"), limit=4, task_type="zh-nli")]
    pairs = load_sources(sources)
    assert isinstance(pairs, PairChain) and pairs.sources == [sources[0], sources[2], sources[3]]
    assert task_types(pairs) == ["retrieval"] * 5 + ["sts"] * 3 + ["zh-nli"] * 4
    assert task_types(list(pairs)) == ["retrieval"] * 5 + ["sts"] * 3 + ["retrieval"] * 4  # no sources: from the pairs


@pytest.fixture(scope="module")
def two_task_pairs(shared_data):
    return load_sources([
        DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=24),
        DataSource(path=str(shared_data / "zh-pairs" / "zh-nli-train.jsonl"), limit=24, task_type="zh-nli",
                   instruction="Retrieve semantically similar text."),
    ])


def test_training_resumes_with_the_same_balanced_batches(micro_cfg, two_task_pairs, tmp_path, monkeypatch):
    """The trainer's batches with task_balanced: one task each, and a run stopped after step 3
    resumes (from its step-2 checkpoint) with the uninterrupted run's batches and weights."""
    import tasks.training.loop as loop

    seen: dict[str, list[tuple[int, list[str]]]] = {}
    run = "full"
    real = loop.embedding_batch

    def spy(chunk, k, seed, b):
        seen.setdefault(run, []).append((b, [p.query for p in chunk]))
        return real(chunk, k, seed, b)

    monkeypatch.setattr(loop, "embedding_batch", spy)
    cfg = micro_cfg.stage2.model_copy(update={
        "steps": 6, "batch_size": 8, "checkpoint_every": 2, "hard_negatives": 1, "seed": 2,  # seed 2: both tasks
        "sampling": SamplingConfig(mode="task_balanced", weights={"retrieval": 1.0, "zh-nli": 1.0})})
    full = train(cfg, micro_cfg.model, tmp_path / "full", pairs=two_task_pairs, progress=False)
    run = "cut"
    with pytest.raises(TrainingInterrupted):
        train(cfg, micro_cfg.model, tmp_path / "cut", pairs=two_task_pairs, progress=False, stop_after=3)
    run = "resumed"
    resumed = train(cfg, micro_cfg.model, tmp_path / "cut", pairs=two_task_pairs, progress=False)
    assert resumed.resumed_from == 2
    assert seen["resumed"] == seen["full"][2:]
    task_of = {p.query: t for p, t in zip(two_task_pairs, task_types(two_task_pairs))}
    kinds = [{task_of[q] for q in queries} for _, queries in seen["full"]]
    assert all(len(k) == 1 for k in kinds) and set().union(*kinds) == {"retrieval", "zh-nli"}
    a, b = load_file(str(full.final / "model.safetensors")), load_file(str(resumed.final / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
