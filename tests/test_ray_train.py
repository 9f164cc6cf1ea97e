"""Distributed training (tasks/training: engines.py, steps.py, ray_train.py): gathered in-batch
negatives give the single-device loss and gradients; a 2-worker Ray Train run trains the model the single-process trainer trains,
survives a worker failure by resuming from its checkpoint, and writes the trainer's layout.

The gradient tests run 2 real gloo processes (forked from this one, so the micro model is not
loaded again); the Ray Train tests use the session's local Ray (2 CPUs)."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tasks.config import ConfigError, DataSource, load_config
from tasks.data import Pair, load_sources
from tasks.stages import train_resources
from tasks.training import embedding_batch, embedding_step, list_checkpoints, reranker_step, train
from tasks.training.engines import DDPEngine, DeepSpeedEngine, DeepSpeedUnavailable, deepspeed_config, gather_with_grad

WORLD = 2


# ----------------------------------------------------------------------------- 2 gloo processes

def _rank_main(fn, rank, init_file, queue, args):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        # plain pickle: multiprocessing's would share tensors through fds that die with this process
        queue.put((rank, pickle.dumps(fn(rank, *args)), None))
        dist.destroy_process_group()
    except BaseException:  # the parent shows the child's traceback
        queue.put((rank, None, traceback.format_exc()))


def run_on_two_ranks(fn, *args) -> list:
    """fn(rank, *args) on 2 forked processes joined in a gloo group; their results by rank."""
    ctx = mp.get_context("fork")  # the children inherit the loaded models: no re-import, no reload
    queue = ctx.Queue()
    rendezvous = tempfile.mkdtemp(prefix="gloo-")
    init_file = os.path.join(rendezvous, "init")
    procs = [ctx.Process(target=_rank_main, args=(fn, r, init_file, queue, args), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, value, error = queue.get(timeout=300)  # a rank that died without a word
            assert error is None, f"rank {rank} failed:\n{error}"
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a rank waiting for a failed peer
                p.terminate()
        shutil.rmtree(rendezvous, ignore_errors=True)
    return [results[r] for r in range(WORLD)]


def _linear_encoder_grads(rank, x, w, gather):
    """Each rank encodes its half of x with the shared weight w and takes an InfoNCE-style loss over
    the gathered (or only the local) embeddings; returns the DDP-style averaged gradient of w."""
    w = w.clone().requires_grad_(True)
    half = x.shape[0] // WORLD
    local = torch.nn.functional.normalize(x[rank * half:(rank + 1) * half] @ w, dim=-1)
    if gather:
        emb, factor = gather_with_grad(local), WORLD
    else:
        emb, factor = local, 1
    loss = torch.nn.functional.cross_entropy(emb @ emb.roll(1, 0).T / 0.1, torch.arange(emb.shape[0]))
    (loss * factor).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    return float(loss), grad / WORLD


def _linear_reference(x, w):
    w = w.clone().requires_grad_(True)
    emb = torch.nn.functional.normalize(x @ w, dim=-1)
    loss = torch.nn.functional.cross_entropy(emb @ emb.roll(1, 0).T / 0.1, torch.arange(emb.shape[0]))
    loss.backward()
    return float(loss.detach()), w.grad


def test_gather_with_grad_gives_the_single_process_gradient():
    torch.manual_seed(0)
    x, w = torch.randn(8, 5), torch.randn(5, 4)
    ref_loss, ref_grad = _linear_reference(x, w)
    gathered = run_on_two_ranks(_linear_encoder_grads, x, w, True)
    for loss, grad in gathered:
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # without the gather every rank sees 4 items, not 8: another loss and another gradient
    local = run_on_two_ranks(_linear_encoder_grads, x, w, False)
    assert all(abs(loss - ref_loss) > 1e-2 for loss, _ in local)
    assert not torch.allclose(local[0][1], ref_grad, rtol=1e-3, atol=1e-4)


def test_gather_with_grad_trims_each_ranks_padding():
    def gather_padded(rank):
        # rank 0 has 3 real rows, rank 1 has 1; both send 3 (all_gather needs equal shapes)
        local = torch.full((3, 2), float(rank)).requires_grad_(True)
        out = gather_with_grad(local, sizes=[3, 1])
        out.sum().backward()
        return out.detach(), local.grad

    (out0, grad0), (out1, grad1) = run_on_two_ranks(gather_padded)
    assert torch.equal(out0, torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]]))
    assert torch.equal(out1, out0)
    assert torch.equal(grad0, torch.ones(3, 2))               # all its rows are real
    assert torch.equal(grad1, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))  # padding gets none


# ----------------------------------------------------------------------------- the shard steps

@pytest.fixture(scope="module")
def uneven_pairs(shared_data):
    """8 SNLI pairs whose hard negatives differ per worker slice (rank 0: 0+1+2+1, rank 1: 1+0+1+1, padded
    to 4) and where items 1 and 6 (different workers) share a positive: the same-positive mask must
    span workers."""
    pairs = load_sources([DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=16)])
    out = []
    for i, p in enumerate(pairs[:8]):
        negatives = {0: (), 2: (p.negatives[0], pairs[8 + i].positive), 5: ()}.get(i, p.negatives)
        out.append(Pair(p.query, pairs[1].positive if i == 6 else p.positive, negatives))
    return out


def assert_same_gradients(grads: dict, reference: dict) -> None:
    """Each parameter's gradient equals the reference to 1e-4 of its norm: per-worker batches pad to
    other widths than the full batch, so elements differ by float rounding (~1e-6), never more."""
    assert grads.keys() == reference.keys()
    for name, g in reference.items():
        err = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _shard_step(rank, model, batch, cfg):
    engine = DDPEngine(model, cfg)
    engine.zero_grad()
    loss = embedding_step(engine, batch, cfg, 1.0)
    return loss, _grads(model)


def _embedding_case(micro_cfg, micro_embedder, uneven_pairs, **update):
    cfg = micro_cfg.stage2.model_copy(update={"hard_negatives": 2} | update)
    batch = embedding_batch(uneven_pairs, cfg.hard_negatives, cfg.seed, 0)
    assert bool(batch.same_pos[1, 6])
    reference = copy.deepcopy(micro_embedder).train()
    reference.zero_grad(set_to_none=True)
    ref_loss = embedding_step(reference, batch, cfg, 1.0)
    model = copy.deepcopy(micro_embedder).train()
    ranks = run_on_two_ranks(_shard_step, model, batch, cfg)
    return ref_loss, _grads(reference), ranks


@pytest.mark.parametrize("mini_batch_size, hard_negatives", [(None, 2), (3, 2), (3, 0)],
                         ids=["end-to-end", "gradcache", "gradcache-no-hard-negatives"])
def test_two_workers_with_gathered_negatives_give_the_single_device_loss_and_gradients(
        micro_cfg, micro_embedder, uneven_pairs, mini_batch_size, hard_negatives):
    ref_loss, ref_grads, ranks = _embedding_case(micro_cfg, micro_embedder, uneven_pairs,
                                                 mini_batch_size=mini_batch_size, hard_negatives=hard_negatives)
    for loss, grads in ranks:
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert_same_gradients(grads, ref_grads)


@pytest.mark.parametrize("mini_batch_size", [None, 3], ids=["end-to-end", "gradcache"])
def test_two_workers_give_the_single_device_loss_with_the_other_readings_of_eq1(
        micro_cfg, micro_embedder, uneven_pairs, mini_batch_size):
    """loss.dd_mask_on query and loss.in_batch_docs positives_and_negatives on the gathered global
    batch (every worker's hard negatives are in-batch documents of every query)."""
    loss = micro_cfg.stage2.loss.model_copy(update={"dd_mask_on": "query", "in_batch_docs": "positives_and_negatives"})
    ref_loss, ref_grads, ranks = _embedding_case(micro_cfg, micro_embedder, uneven_pairs,
                                                 mini_batch_size=mini_batch_size, loss=loss)
    default_loss, _, _ = _embedding_case(micro_cfg, micro_embedder, uneven_pairs, mini_batch_size=mini_batch_size)
    assert ref_loss > default_loss  # the other items' negatives entered Z
    for got, grads in ranks:
        assert got == pytest.approx(ref_loss, abs=1e-5)
        assert_same_gradients(grads, ref_grads)


def test_without_gathering_each_worker_sees_only_its_slice(micro_cfg, micro_embedder, uneven_pairs):
    cfg = micro_cfg.stage2.distributed.model_copy(update={"engine": "ray_train", "gather_negatives": False})
    ref_loss, ref_grads, ranks = _embedding_case(micro_cfg, micro_embedder, uneven_pairs, distributed=cfg)
    # half the in-batch negatives per query: a smaller loss, and not the full batch's gradient
    assert ranks[0][0] == ranks[1][0] < ref_loss - 0.3
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_gradients(ranks[0][1], ref_grads)


def _recorded_shard_step(rank, model, batch, cfg):
    """_shard_step, also returning the [rows, width] of every forward pass with gradient."""
    engine = DDPEngine(model, cfg)
    shapes, forward = [], engine.forward

    def recording(input_ids, mask):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, mask)

    engine.forward = recording
    engine.zero_grad()
    return embedding_step(engine, batch, cfg, 1.0), _grads(model), shapes


def test_workers_encode_in_length_buckets_with_positives_and_negatives_in_one_pass_group(
        micro_cfg, micro_embedder, uneven_pairs):
    cfg = micro_cfg.stage2.model_copy(update={"hard_negatives": 2, "length_bucket": 3})
    batch = embedding_batch(uneven_pairs, cfg.hard_negatives, cfg.seed, 0)
    reference = copy.deepcopy(micro_embedder).train()
    reference.zero_grad(set_to_none=True)
    ref_loss = embedding_step(reference, batch, cfg, 1.0)
    ranks = run_on_two_ranks(_recorded_shard_step, copy.deepcopy(micro_embedder).train(), batch, cfg)
    for loss, grads, shapes in ranks:
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert_same_gradients(grads, _grads(reference))
        # 4 queries: passes of 3 + 1; 4 positives + 4 hard negatives (rank 1's padded) together: 3 + 3 + 2,
        # shortest first, each padded only to its own longest text
        assert [rows for rows, _ in shapes] == [3, 1, 3, 3, 2]
        widths = [width for _, width in shapes[2:]]
        assert widths == sorted(widths) and widths[0] < widths[-1]


def _reranker_shard(rank, model, pairs, cfg):
    engine = DDPEngine(model, cfg)
    engine.zero_grad()
    loss, tokens = reranker_step(engine, pairs, cfg, cfg.seed, 0, 1.0)
    return loss, tokens, _grads(model)


def test_reranker_on_two_workers_gives_the_single_device_loss_and_gradients(micro_cfg, micro_reranker,
                                                                             uneven_pairs):
    # 7 queries x (1 positive + 2 negatives) = 21 examples, sorted by length and dealt out in turn:
    # shares of 11, rank 1's padded with one weight-0 filler; chunks of 5 -> 5, 5, 1 (rank 1's last
    # chunk is only the filler)
    pairs = uneven_pairs[:7]
    cfg = micro_cfg.reranker.model_copy(update={"hard_negatives": 2, "mini_batch_size": 5})
    reference = copy.deepcopy(micro_reranker).train()
    reference.zero_grad(set_to_none=True)
    ref_loss, ref_tokens = reranker_step(reference, pairs, cfg, cfg.seed, 0, 1.0)
    ref_grads = _grads(reference)
    ranks = run_on_two_ranks(_reranker_shard, copy.deepcopy(micro_reranker).train(), pairs, cfg)
    for loss, tokens, grads in ranks:
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        assert tokens == ref_tokens
        assert_same_gradients(grads, ref_grads)


# ----------------------------------------------------------------------------- configuration, DeepSpeed

def test_distributed_is_configuration_only(micro_cfg):
    cfg = load_config("micro", ["stage2.distributed.engine=ray_train", "stage2.distributed.num_workers=2"])
    assert cfg.stage2.distributed.num_workers == 2 and cfg.stage2.distributed.gather_negatives
    assert train_resources(cfg.stage2) is None              # the pipeline runs it on the driver
    assert train_resources(micro_cfg.stage2) == micro_cfg.stage2.resources
    for bad, message in (("stage2.distributed.num_workers=3", "not a multiple of distributed.num_workers"),
                         ("stage2.distributed.backend=nccl", "nccl needs use_gpu"),
                         ("stage2.distributed.deepspeed=zero4", "zero2, zero3 or a path")):
        with pytest.raises(ConfigError, match=message):
            load_config("micro", ["stage2.distributed.engine=ray_train", "stage2.distributed.num_workers=2", bad])
    with pytest.raises(ConfigError, match="need engine: ray_train"):
        load_config("micro", ["stage2.distributed.num_workers=2"])


def test_the_driver_streams_catalog_sources_once_before_any_worker_starts(tmp_path, monkeypatch):
    """Every Ray Train worker reads the stage's data; a catalog entry is streamed from the hub into its
    JSONL cache by the driver first, so the workers read the cache instead of each streaming the hub."""
    from tasks.data.catalog import cache_path
    from tasks.training.ray_train import train_distributed

    class RayStarts(Exception):
        pass

    def no_ray(address=None):
        raise RayStarts

    monkeypatch.setattr("tasks.distributed.init_ray", no_ray)
    cfg = load_config("micro", ["stage2.distributed.engine=ray_train", "stage2.distributed.num_workers=2",
                                "stage2.data=[{catalog: msmarco, limit: 2}]", "data.catalog_offline=true"]).stage2
    cache = cache_path(cfg.data[0], tmp_path)
    assert not cache.exists()
    with pytest.raises(RayStarts):
        train_distributed(cfg, "unused", tmp_path / "out", data_root=tmp_path)
    assert cache.is_file() and len(cache.read_text().splitlines()) == 2


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_deepspeed_configs_are_sized_from_the_train_config(micro_cfg, preset):
    from tasks.config import CONF_DIR

    raw = json.loads((CONF_DIR / "deepspeed" / f"{preset}.json").read_text())
    assert raw["zero_optimization"]["stage"] == int(preset[-1])
    assert "auto" not in json.dumps(raw) and "optimizer" not in raw and "scheduler" not in raw
    cfg = micro_cfg.stage2.model_copy(update={"batch_size": 64, "max_grad_norm": 0.5})
    ds = deepspeed_config(preset, cfg, world=8, dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == raw["zero_optimization"]


def test_deepspeed_json_with_its_own_optimizer_is_refused(micro_cfg, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(str(path), micro_cfg.stage2)
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(str(tmp_path / "missing.json"), micro_cfg.stage2)


def test_deepspeed_branch_fails_clearly_without_deepspeed(micro_cfg, micro_embedder):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    cfg = micro_cfg.stage2.model_copy(update={"distributed": micro_cfg.stage2.distributed.model_copy(
        update={"engine": "ray_train", "deepspeed": "zero2"})})
    with pytest.raises(DeepSpeedUnavailable, match=r"deepspeed='zero2'.*pip install deepspeed.*deepspeed: null"):
        DeepSpeedEngine(micro_embedder, cfg, deepspeed_config("zero2", cfg, 1, torch.float32))


# ----------------------------------------------------------------------------- Ray Train end to end

@pytest.fixture(scope="module")
def snli_pairs(shared_data):
    return load_sources([DataSource(path=str(shared_data / "triplets-en" / "snli_dev_triplets.jsonl"), limit=64)])


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_ray_train_two_workers_match_one_process_and_resume_after_a_worker_failure(
        micro_cfg, snli_pairs, ray_session, tmp_path, monkeypatch):
    import mlflow

    cfg = micro_cfg.stage2.model_copy(update={"steps": 3, "batch_size": 8, "checkpoint_every": 2,
                                              "hard_negatives": 1})
    single = train(cfg, micro_cfg.model, tmp_path / "single", pairs=snli_pairs, progress=False)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().create_experiment("ray-train", artifact_location=(tmp_path / "art").as_uri())
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id

    from tasks.training import train_distributed

    dcfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={
        "engine": "ray_train", "num_workers": 2, "resources_per_worker": {"CPU": 1}, "max_failures": 1})})
    # both workers stop after step 2 (its checkpoint written) as if they had crashed; Ray Train
    # restarts the worker group, which resumes from checkpoints/step-000002 and finishes step 3
    res = train_distributed(dcfg, micro_cfg.model, tmp_path / "dist", pairs=snli_pairs, stop_after=2,
                            mlflow_run_id=run_id)
    assert res.resumed_from == 2 and not res.skipped

    # the same batches, schedule and loss as the single process
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert res.history[0]["loss"] == pytest.approx(single.history[0]["loss"], abs=1e-5)
    for a, b in zip(res.history, single.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["lr"] == b["lr"]
    wa, wb = _weights(res.final), _weights(single.final)
    assert wa.keys() == wb.keys()
    # fp32 all-reduce + Adam's normalised updates (lr 1e-3): agreement to ~1e-4 after 3 steps
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 5e-4

    # the trainer's layout, which merge / evaluation / `train` resumption read
    out = tmp_path / "dist"
    assert [c.name for c in list_checkpoints(out)] == ["step-000002", "step-000003"]
    for c in list_checkpoints(out):
        assert {p.name for p in c.iterdir()} >= {"model", "trainer_state.pt", "state.json"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
    assert train(dcfg, micro_cfg.model, out, pairs=snli_pairs).skipped  # done: no workers started

    # the driver logged the steps (each once, though the first worker group ran steps 1-2) and the
    # final model to MLflow
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    losses = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert losses == [h["loss"] for h in res.history]
    assert "model.safetensors" in {os.path.basename(a.path) for a in client.list_artifacts(run_id, "final")}


@pytest.mark.slow
def test_a_deepspeed_run_without_deepspeed_stops_with_the_workers_reason(micro_cfg, snli_pairs, ray_session,
                                                                          tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    cfg = load_config("micro", ["stage2.distributed.engine=ray_train", "stage2.distributed.deepspeed=zero2"]).stage2
    # the worker's own exception reaches the caller, not Ray's "training failed" wrapper
    with pytest.raises(DeepSpeedUnavailable, match="pip install deepspeed"):
        train(cfg, micro_cfg.model, tmp_path / "ds", pairs=snli_pairs)
    assert list_checkpoints(tmp_path / "ds") == []
