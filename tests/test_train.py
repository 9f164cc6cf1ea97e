"""The trainer: a micro model that really learns, exact resumption, GradCache equivalence, LoRA,
the reranker objective, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tasks.config import DataSource, LoraConfig
from tasks.data import Pair, load_sources
from tasks.models import Embedder, Reranker
from tasks.training import (
    TrainingInterrupted, batch_indices, embedding_batch, embedding_step, list_checkpoints, lr_lambda, train,
)
from tasks.training.steps import reranker_examples


@pytest.fixture(scope="module")
def snli_pairs(shared_data):
    return load_sources([DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=64)])


def _mrr(model: Embedder, pairs) -> float:
    q = model.encode([p.query for p in pairs], is_query=True)
    d = model.encode([p.positive for p in pairs])
    ranks = (-(q @ d.T)).argsort(1)
    return float(np.mean([1 / (1 + int(np.where(ranks[i] == i)[0][0])) for i in range(len(pairs))]))


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_micro_model_learns_to_retrieve_its_training_positives(micro_cfg, snli_pairs, tmp_path, autocast):
    model_cfg = micro_cfg.model.model_copy(update={"autocast": autocast})
    before = _mrr(Embedder.load(model_cfg, device="cpu"), snli_pairs)
    cfg = micro_cfg.stage2.model_copy(update={"steps": 40, "batch_size": 16, "hard_negatives": 1,
                                              "checkpoint_every": 20, "lr": 2e-3, "warmup_ratio": 0.05})
    res = train(cfg, model_cfg, tmp_path / "run", pairs=snli_pairs, progress=False)
    after = _mrr(Embedder.load(str(res.final), device="cpu"), snli_pairs)
    first = np.mean([h["loss"] for h in res.history[:5]])
    last = np.mean([h["loss"] for h in res.history[-5:]])
    assert last < 0.7 * first
    assert after > before + 0.25 and after > 0.4, (before, after)
    assert (res.final / "loss.png").is_file()
    summary = json.loads((res.final / "train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["seconds_per_step"] > 0


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_resume_gives_bit_identical_weights(micro_cfg, snli_pairs, tmp_path, autocast):
    cfg = micro_cfg.stage2.model_copy(update={"steps": 6, "batch_size": 8, "checkpoint_every": 2,
                                              "hard_negatives": 1})
    model_cfg = micro_cfg.model.model_copy(update={"autocast": autocast})
    full = train(cfg, model_cfg, tmp_path / "full", pairs=snli_pairs, progress=False)
    with pytest.raises(TrainingInterrupted):
        train(cfg, model_cfg, tmp_path / "cut", pairs=snli_pairs, progress=False, stop_after=3)
    assert [c.name for c in list_checkpoints(tmp_path / "cut")] == ["step-000002"]
    # a crash while writing the next checkpoint leaves a .tmp folder: it must be ignored
    (tmp_path / "cut" / "checkpoints" / "step-000004.tmp").mkdir()
    resumed = train(cfg, model_cfg, tmp_path / "cut", pairs=snli_pairs, progress=False)
    assert resumed.resumed_from == 2
    a, b = _weights(full.final), _weights(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    again = train(cfg, model_cfg, tmp_path / "cut", pairs=snli_pairs, progress=False)
    assert again.skipped


DAMAGE_CFG = {"steps": 6, "batch_size": 8, "checkpoint_every": 2, "hard_negatives": 1, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def interrupted(micro_cfg, snli_pairs, module_tmp):
    """An uninterrupted run and one stopped after step 5 (checkpoints 2 and 4 on disk), made once for
    the damages below, which each damage a copy of the stopped one."""
    cfg = micro_cfg.stage2.model_copy(update=DAMAGE_CFG)
    root = module_tmp("interrupted")
    full = train(cfg, micro_cfg.model, root / "full", pairs=snli_pairs, progress=False)
    with pytest.raises(TrainingInterrupted):
        train(cfg, micro_cfg.model, root / "cut", pairs=snli_pairs, progress=False, stop_after=5)
    assert [c.name for c in list_checkpoints(root / "cut")] == ["step-000002", "step-000004"]
    return _weights(full.final), root / "cut"


@pytest.mark.parametrize("damage", ["truncated weights", "tampered trainer state", "missing state"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(micro_cfg, snli_pairs, interrupted, tmp_path, caplog,
                                                             damage):
    """A truncated model.safetensors (a power cut before fsync), a trainer_state.pt that is not a
    torch state, or a missing file: resuming names the file, takes the previous checkpoint, and
    ends with the weights of an uninterrupted run. A stage keeps two checkpoints while it runs
    (keep_checkpoints: 1 here), so there is one to fall back to."""
    cfg = micro_cfg.stage2.model_copy(update=DAMAGE_CFG)
    full_weights, stopped = interrupted
    shutil.copytree(stopped, tmp_path / "cut")
    newest = tmp_path / "cut" / "checkpoints" / "step-000004"
    bad = {"truncated weights": newest / "model" / "model.safetensors",
           "tampered trainer state": newest / "trainer_state.pt",
           "missing state": newest / "trainer_state.pt"}[damage]
    if damage == "truncated weights":
        os.truncate(bad, 1000)
    elif damage == "tampered trainer state":
        bad.write_bytes(b"not a torch file")
    else:
        bad.unlink()
    caplog.set_level(logging.WARNING, logger="tasks.training.checkpoint")
    resumed = train(cfg, micro_cfg.model, tmp_path / "cut", pairs=snli_pairs, progress=False)
    assert resumed.resumed_from == 2
    assert any(str(bad) in r.getMessage() and "step-000004" in r.getMessage() for r in caplog.records)
    b = _weights(resumed.final)
    assert all(torch.equal(full_weights[k], b[k]) for k in full_weights)
    assert [c.parent.name for c in resumed.checkpoints] == ["step-000006"]  # complete: keep_checkpoints


def test_keeps_only_the_last_checkpoints(micro_cfg, snli_pairs, tmp_path):
    cfg = micro_cfg.stage2.model_copy(update={"steps": 8, "batch_size": 4, "checkpoint_every": 2,
                                              "keep_checkpoints": 3})
    res = train(cfg, micro_cfg.model, tmp_path / "r", pairs=snli_pairs, progress=False)
    assert [c.parent.name for c in res.checkpoints] == ["step-000004", "step-000006", "step-000008"]
    assert all((c / "model.safetensors").is_file() for c in res.checkpoints)


def _grads_after_one_step(model, batch, cfg):
    model.zero_grad(set_to_none=True)
    loss = embedding_step(model, batch, cfg, 1.0)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradcache_matches_plain_backprop(micro_cfg, snli_pairs):
    model = Embedder.load(micro_cfg.model, device="cpu")
    model.train()
    cfg = micro_cfg.stage2.model_copy(update={"hard_negatives": 1, "batch_size": 12})
    batch = embedding_batch(snli_pairs[:12], 1, 0, 0)
    loss_a, grads_a = _grads_after_one_step(model, batch, cfg)
    loss_b, grads_b = _grads_after_one_step(model, batch, cfg.model_copy(update={"mini_batch_size": 5}))
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n


def test_lora_stage_trains_adapters_and_exports_a_merged_model(micro_cfg, snli_pairs, tmp_path):
    cfg = micro_cfg.stage2.model_copy(update={"steps": 4, "batch_size": 8, "checkpoint_every": 2,
                                              "lora": LoraConfig(enabled=True, r=4, alpha=8), "lr": 1e-2})
    res = train(cfg, micro_cfg.model, tmp_path / "lora", pairs=snli_pairs, progress=False)
    assert (res.checkpoints[-1].parent / "adapter" / "adapter_model.safetensors").is_file()
    merged = Embedder.load(str(res.final), device="cpu")
    base = Embedder.load(micro_cfg.model, device="cpu")
    assert not np.allclose(merged.encode(["a dog runs"]), base.encode(["a dog runs"]), atol=1e-4)
    # resume of a LoRA run: interrupted + resumed equals uninterrupted
    with pytest.raises(TrainingInterrupted):
        train(cfg, micro_cfg.model, tmp_path / "lora2", pairs=snli_pairs, progress=False, stop_after=2)
    res2 = train(cfg, micro_cfg.model, tmp_path / "lora2", pairs=snli_pairs, progress=False)
    a, b = _weights(res.final), _weights(res2.final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_reranker_learns_yes_for_positives(micro_cfg, snli_pairs, tmp_path, autocast):
    pairs = snli_pairs[:16]
    cfg = micro_cfg.reranker.model_copy(update={"steps": 30, "batch_size": 8, "hard_negatives": 1,
                                                "lr": 2e-3, "checkpoint_every": 15})
    res = train(cfg, micro_cfg.model.model_copy(update={"autocast": autocast}), tmp_path / "rr", pairs=pairs,
                progress=False)
    model = Reranker.load(str(res.final), device="cpu")
    assert model.cfg.autocast == autocast
    pos = model.score([p.query for p in pairs], [p.positive for p in pairs])
    neg = model.score([p.query for p in pairs], [p.negatives[0] for p in pairs])
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert (pos > neg).mean() >= 0.75, (pos, neg)
    assert (res.final / "cross-encoder" / "model.safetensors").is_file()


@pytest.mark.parametrize("objective", ["embedding", "reranker"])
def test_frozen_embeddings_stay_as_loaded_while_the_layers_train(micro_cfg, snli_pairs, tmp_path, objective):
    """freeze_embeddings: the token embedding matrix (the reranker's LM head is the same tensor in a
    tied model) leaves training as it came in, every other weight moves; resuming keeps it so."""
    base = micro_cfg.stage2 if objective == "embedding" else micro_cfg.reranker
    cfg = base.model_copy(update={"steps": 4, "batch_size": 4, "checkpoint_every": 2, "lr": 1e-2,
                                  "freeze_embeddings": True})
    res = train(cfg, micro_cfg.model, tmp_path / "frozen", pairs=snli_pairs[:16], progress=False)
    plain = train(cfg.model_copy(update={"freeze_embeddings": False}), micro_cfg.model, tmp_path / "plain",
                  pairs=snli_pairs[:16], progress=False)
    start = (Embedder if objective == "embedding" else Reranker).load(micro_cfg.model, device="cpu")
    start = {k: v for k, v in start.backbone.state_dict().items()}
    frozen, moved = _weights(res.final), _weights(plain.final)
    emb = [k for k in frozen if k.endswith("embed_tokens.weight")]
    assert len(emb) == 1 and torch.equal(frozen[emb[0]], start[emb[0]])
    assert not torch.equal(moved[emb[0]], start[emb[0]])  # trained, the same steps move it
    layers = [k for k in frozen if "layers." in k and k.endswith("weight") and "norm" not in k]
    assert layers and all(not torch.equal(frozen[k], start[k]) for k in layers)
    # interrupted after 2 steps and resumed: the same weights as straight through
    with pytest.raises(TrainingInterrupted):
        train(cfg, micro_cfg.model, tmp_path / "again", pairs=snli_pairs[:16], progress=False, stop_after=2)
    again = _weights(train(cfg, micro_cfg.model, tmp_path / "again", pairs=snli_pairs[:16], progress=False).final)
    assert all(torch.equal(again[k], frozen[k]) for k in frozen)


@pytest.mark.parametrize("objective", ["embedding", "reranker"])
def test_frozen_lower_layers_stay_as_loaded_while_the_upper_ones_train(micro_cfg, snli_pairs, tmp_path, objective):
    """freeze_layers 1: the token embeddings and decoder layer 0 leave training as they came in, layer 1
    and the final norm move; more layers than the model has is an error that says so."""
    base = micro_cfg.stage2 if objective == "embedding" else micro_cfg.reranker
    cfg = base.model_copy(update={"steps": 3, "batch_size": 4, "checkpoint_every": 3, "lr": 1e-2, "freeze_layers": 1})
    res = train(cfg, micro_cfg.model, tmp_path / "frozen", pairs=snli_pairs[:12], progress=False)
    start = (Embedder if objective == "embedding" else Reranker).load(micro_cfg.model, device="cpu")
    start = dict(start.backbone.state_dict())
    frozen = _weights(res.final)
    kept = [k for k in frozen if k.endswith("embed_tokens.weight") or "layers.0." in k]
    trained = [k for k in frozen if "layers.1." in k and k.endswith("proj.weight")]
    assert len(kept) > 5 and trained
    assert all(torch.equal(frozen[k], start[k]) for k in kept)
    assert all(not torch.equal(frozen[k], start[k]) for k in trained)
    with pytest.raises(ValueError, match="freeze_layers 3 is more than the model's 2 layers"):
        train(cfg.model_copy(update={"freeze_layers": 3}), micro_cfg.model, tmp_path / "bad",
              pairs=snli_pairs[:12], progress=False)


def test_two_token_reranker_loss_option(micro_cfg, snli_pairs, tmp_path):
    cfg = micro_cfg.reranker.model_copy(update={"steps": 2, "batch_size": 4, "two_token": True})
    res = train(cfg, micro_cfg.model, tmp_path / "rr2", pairs=snli_pairs[:8], progress=False)
    assert res.history[0]["loss"] < 2.0  # 2-way softmax: about log 2 at the start, not log |V|


def test_a_symmetric_pairs_reranker_examples_come_in_a_drawn_order():
    """reranker.symmetric_order drawn: each example of a symmetric pair has its two texts swapped
    with probability 1/2, a function of (seed, batch); labels and asymmetric pairs are untouched, and
    as_given is the order of the pair."""
    sym = [Pair(f"a{i}", f"b{i}", (f"n{i}",), "Retrieve semantically similar text.", symmetric=True) for i in range(32)]
    asym = [Pair(f"q{i}", f"d{i}", (f"m{i}",), "Given a question, retrieve passages") for i in range(8)]
    given, labels = reranker_examples(sym + asym, 1, seed=0, batch=3)
    assert [(a[0], b) for a, b in zip(given, labels)][:4] == [("a0", 1), ("a0", 0), ("a1", 1), ("a1", 0)]
    assert all(q[0] in "aq" for q, _, _ in given)
    drawn, drawn_labels = reranker_examples(sym + asym, 1, seed=0, batch=3, symmetric_order="drawn")
    assert drawn_labels == labels
    assert drawn == reranker_examples(sym + asym, 1, seed=0, batch=3, symmetric_order="drawn")[0]
    assert drawn != reranker_examples(sym + asym, 1, seed=0, batch=4, symmetric_order="drawn")[0]
    swapped = [d != g for d, g in zip(drawn, given)]
    assert 16 <= sum(swapped[:64]) <= 48  # about half of the 64 symmetric examples
    assert not any(swapped[64:])  # the question -> passage pairs keep their order
    assert all(d == (g[1], g[0], g[2]) for d, g, s in zip(drawn, given, swapped) if s)


def test_data_order_is_a_pure_function_of_seed_and_batch():
    a = [batch_indices(10, b, 4, seed=3) for b in range(5)]
    assert a == [batch_indices(10, b, 4, seed=3) for b in range(5)]
    flat = [i for b in a[:5] for i in b]
    assert sorted(flat[:10]) == list(range(10))  # one epoch visits every item once
    assert a != [batch_indices(10, b, 4, seed=4) for b in range(5)]


def test_warmup_then_cosine(micro_cfg):
    cfg = micro_cfg.stage2.model_copy(update={"steps": 100, "warmup_ratio": 0.1, "min_lr_ratio": 0.1})
    f = lr_lambda(cfg)
    assert f(0) < f(5) < f(9) <= 1.0
    assert abs(f(10) - 1.0) < 1e-9
    assert f(50) < f(20) and abs(f(100) - 0.1) < 1e-9


def test_no_pairs_is_a_clear_error(micro_cfg, tmp_path):
    with pytest.raises(ValueError, match="no training pairs"):
        train(micro_cfg.stage2, micro_cfg.model, tmp_path / "x", pairs=[], progress=False)


def test_plain_warmup_steps_use_qd_infonce_then_the_full_loss(micro_cfg, snli_pairs, tmp_path):
    base = micro_cfg.stage2.model_copy(update={"steps": 4, "batch_size": 8, "hard_negatives": 1,
                                               "checkpoint_every": 4, "lr": 1e-3})
    plain_loss = base.loss.model_copy(update={"qq": False, "dd": False, "mask_false_negatives": False})
    warm = base.model_copy(update={"loss": base.loss.model_copy(update={"plain_warmup_steps": 2})})
    runs = {name: train(cfg, micro_cfg.model, tmp_path / name, pairs=snli_pairs, progress=False).history
            for name, cfg in [("warm", warm), ("plain", base.model_copy(update={"loss": plain_loss})),
                              ("full", base)]}
    loss = {name: [h["loss"] for h in hist] for name, hist in runs.items()}
    # steps 1-2 are the plain loss's run exactly; from step 3 on, the full loss of eq. 1
    assert loss["warm"][:2] == loss["plain"][:2]
    assert abs(loss["full"][0] - loss["plain"][0]) > 0.1  # the two losses differ on these batches
    assert abs(loss["warm"][2] - loss["plain"][2]) > 0.1


def test_length_buckets_give_the_one_pass_embeddings_and_gradients_in_input_order(micro_cfg, snli_pairs):
    from tasks.training import embed_by_length

    model = Embedder.load(micro_cfg.model, device="cpu")
    texts = [p.query if i % 3 else p.query * 4 for i, p in enumerate(snli_pairs[:21])]  # mixed lengths
    results = []
    for bucket in (0, 4):
        model.zero_grad(set_to_none=True)
        emb = embed_by_length(model, texts, 64, bucket=bucket)
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        results.append((emb.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (e0, g0), (e4, g4) = results
    torch.testing.assert_close(e4, e0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g4, g0, rtol=1e-4, atol=1e-5)
    assert not torch.equal(e0[0], e0[1])  # distinct texts: a permutation would be caught


def test_reranker_length_buckets_give_the_one_pass_loss_and_gradients(micro_cfg, snli_pairs):
    """A reranker step in forward passes of similar-length examples equals one padded pass."""
    from tasks.training import reranker_step

    model = Reranker.load(micro_cfg.model, device="cpu")
    pairs = [dataclasses.replace(p, positive=p.positive * (1 + 3 * (i % 2))) for i, p in enumerate(snli_pairs[:6])]
    results = []
    for mini in (100, 4):  # one pass of all 12 examples / buckets of 4
        cfg = micro_cfg.reranker.model_copy(update={"mini_batch_size": mini, "hard_negatives": 1})
        model.zero_grad(set_to_none=True)
        loss, tokens = reranker_step(model, pairs, cfg, 0, 0, 1.0)
        results.append((loss, tokens, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (l0, t0, g0), (l4, t4, g4) = results
    assert abs(l4 - l0) < 1e-5 and t4 == t0  # the same loss over the same real tokens
    torch.testing.assert_close(g4, g0, rtol=1e-4, atol=1e-5)


def test_adam_betas_come_from_the_config(micro_cfg):
    from tasks.config import ConfigError, load_config
    from tasks.training.engines import build_optimizer

    cfg = micro_cfg.stage2.model_copy(update={"adam_betas": (0.8, 0.95)})
    _, optimizer, _ = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.8, 0.95)] * 2
    assert load_config("micro", ["reranker.adam_betas=[0.9, 0.95]"]).reranker.adam_betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="adam_betas"):
        load_config("micro", ["stage1.adam_betas=[0.9, 1.0]"])
