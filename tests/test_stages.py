"""Content-addressed stage folders (tasks/stages.py): a stage's key is a function of its inputs (its
config section, the model, the keys of the stages it reads) and of nothing else, so a changed
setting reruns exactly the stages downstream of it; `done.json` is what makes a folder reusable.
The pool of Ray actors a synthesis or filtering stage gets is the flow's decision (`place_actors`),
from the stage's config and the cluster's resources; the placement it hands over is in no key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import stages
from tasks.config import load_config
from tasks.distributed import Placement, place_actors, task_threads
from tasks.stages import key_model, stage_dir, stage_key, synth_key, train_key, train_resources

DATA = "50ba92085f0651a5aaa6eed1845bb4cf.dir"  # a data version, as data.dvc records it


def recipe_keys(*overrides: str, data: str = DATA) -> dict[str, str]:
    """The keys of the embedding half of the recipe on the micro preset, each over the keys of the
    stages it reads (as flows/pipeline.py chains them)."""
    cfg = load_config("micro", list(overrides))
    keys = {"synthesis": synth_key(cfg.synth, data=data, root=".")}
    keys["stage1"] = train_key("stage1", train=cfg.stage1, model=cfg.model, synth=keys["synthesis"],
                               data=data)
    keys["filter"] = stage_key("filter", filter=cfg.filter, synth=keys["synthesis"], embedder=keys["stage1"],
                               model=key_model(cfg.model, gpu=False))
    keys["stage2"] = train_key("stage2", train=cfg.stage2, model=cfg.model, init=keys["stage1"],
                               filtered=keys["filter"], data=data)
    keys["merge"] = stage_key("merge", merge=cfg.merge, trained=keys["stage2"], base=None)
    keys["reranker"] = train_key("reranker", train=cfg.reranker, model=cfg.reranker_backbone,
                                 filtered=keys["filter"], data=data)
    return keys


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {stage for stage in a if a[stage] != b[stage]}


@pytest.fixture(scope="module")
def base_keys() -> dict[str, str]:
    return recipe_keys()


def test_the_same_inputs_give_the_same_key(base_keys):
    assert recipe_keys() == base_keys
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in base_keys.values())
    assert len(set(base_keys.values())) == len(base_keys)  # the stage's name is part of its key


@pytest.mark.parametrize("override, downstream", [
    ("stage2.lr=0.002", {"stage2", "merge"}),
    ("merge.num_checkpoints=2", {"merge"}),
    ("filter.threshold=0.5", {"filter", "stage2", "merge", "reranker"}),
    ("stage1.steps=3", {"stage1", "filter", "stage2", "merge", "reranker"}),  # the filter scores with stage 1
    ("synth.num_passages=9", {"synthesis", "stage1", "filter", "stage2", "merge", "reranker"}),
    ("model.max_doc_length=48", {"stage1", "filter", "stage2", "merge", "reranker"}),
])
def test_a_changed_setting_changes_its_stage_and_everything_downstream_only(base_keys, override, downstream):
    assert changed(base_keys, recipe_keys(override)) == downstream


@pytest.mark.parametrize("override", ["eval.batch_size=7", "infra.ray_num_cpus=1", "run_dir=elsewhere",
                                      "retrain.tolerance=0.1"])
def test_settings_no_stage_reads_change_no_key(base_keys, override):
    assert changed(base_keys, recipe_keys(override)) == set()


@pytest.mark.parametrize("native", [True, False])
def test_autocast_auto_is_keyed_as_this_machine_resolves_it(monkeypatch, base_keys, native):
    """`model.autocast: auto` trains in bf16 where the CPU multiplies bf16 natively and in float32
    elsewhere: the keys say which, so the two never share a folder (or a cache between machines)."""
    monkeypatch.setattr("tasks.models.backbone.native_bf16", lambda device: native)
    auto = recipe_keys("model.autocast=auto")
    assert auto == recipe_keys("model.autocast=bfloat16" if native else "model.autocast=null")
    # null keeps the keys autocast predates (KEY_NEUTRAL); bf16 changes every stage that runs the model
    assert changed(base_keys, auto) == ({"stage1", "filter", "stage2", "merge", "reranker"} if native else set())


def test_the_rerankers_own_autocast_changes_only_the_reranker(monkeypatch, base_keys):
    monkeypatch.setattr("tasks.models.backbone.native_bf16", lambda device: True)
    model = load_config("micro").model.model_dump()

    def with_own_reranker_model(autocast: str) -> dict[str, str]:
        own = model | {"autocast": autocast}
        return recipe_keys(*(f"reranker_model.{k}={v if v is not None else 'null'}" for k, v in own.items()
                             if not isinstance(v, dict)))

    assert changed(base_keys, with_own_reranker_model("null")) == set()  # the same block as `model`: same keys
    assert changed(base_keys, with_own_reranker_model("auto")) == {"reranker"}


def test_eq1_settings_change_the_embedders_not_the_reranker_that_never_reads_them(base_keys):
    """`loss` is eq. 1's; the reranker's block carries it too (base.yaml's anchor) but trains on eq. 2."""
    assert changed(base_keys, recipe_keys("reranker.loss.dd_mask_on=positive")) == set()
    assert changed(base_keys, recipe_keys("stage2.loss.dd_mask_on=positive")) == {"stage2", "merge"}
    assert changed(base_keys, recipe_keys("reranker.steps=7")) == {"reranker"}  # its own settings still count


def test_the_shared_rerank_prefix_keys_only_the_reranker(base_keys):
    """Only the reranker reads model.share_rerank_prefix; off, its key is the one from before the option."""
    off = recipe_keys("model.share_rerank_prefix=false")
    assert changed(base_keys, off) == {"reranker"}
    cfg = load_config("micro", ["model.share_rerank_prefix=false"])
    earlier = cfg.reranker_backbone.model_dump(mode="json")
    del earlier["share_rerank_prefix"], earlier["autocast"]  # as keys saw the model before either option
    reranker = cfg.reranker.model_copy(update={"loss": None})
    assert off["reranker"] == stage_key("reranker", train=reranker, model=earlier, filtered=off["filter"], data=DATA)


def test_a_gpu_stage_resolves_auto_for_the_gpu(monkeypatch):
    seen = []
    monkeypatch.setattr("tasks.models.backbone.native_bf16", lambda device: seen.append(str(device)) or True)
    cfg = load_config("micro", ["model.autocast=auto", "stage2.resources.gpus=1"])
    assert key_model(cfg.model, gpu=True).autocast == "bfloat16" and seen == ["cuda"]
    assert train_key("stage2", train=cfg.stage2, model=cfg.model) == \
        train_key("stage2", train=cfg.stage2, model=cfg.model.model_copy(update={"autocast": "bfloat16"}))
    assert seen[-1] == "cuda"


def test_a_new_data_version_changes_the_stages_that_read_data(base_keys):
    assert changed(base_keys, recipe_keys(data="0" * 32 + ".dir")) == \
        {"synthesis", "stage1", "filter", "stage2", "merge", "reranker"}


def test_a_remade_reused_set_or_edited_prompts_change_synthesis_and_everything_downstream(base_keys, tmp_path,
                                                                                          monkeypatch):
    """Two inputs of synthesis are not settings: the folder `synth.reuse` names, which `q3e synth
    --out` remakes under the same path, and the prompts (tasks/synthesis/prompts.py). Either one
    changed must not reuse the pairs (and the models) made before it."""
    from tasks.synthesis import prompts

    everything = set(base_keys)
    reused = tmp_path / "presynthesised"
    (reused / "rejected").mkdir(parents=True)
    (reused / "shard-00000.jsonl").write_text('{"query": "a"}\n')
    made = recipe_keys(f"synth.reuse={reused}")
    assert changed(base_keys, made) == everything and recipe_keys(f"synth.reuse={reused}") == made
    (reused / "rejected" / "rejected-00000.jsonl").write_text('{"query": "b"}\n')
    remade = recipe_keys(f"synth.reuse={reused}")
    assert changed(made, remade) == everything
    monkeypatch.setattr(prompts, "PROMPT_VERSION", prompts.PROMPT_VERSION + "-edited")
    assert changed(base_keys, recipe_keys()) == everything
    assert changed(remade, recipe_keys(f"synth.reuse={reused}")) == everything


def test_keys_do_not_depend_on_argument_order_or_path_type(monkeypatch):
    assert stage_key("eval", model="k1", reranker=None, data=DATA) == \
        stage_key("eval", data=DATA, reranker=None, model="k1")
    assert stage_key("merge", trained=Path("/a/b")) == stage_key("merge", trained="/a/b")
    assert stage_key("merge", trained=("x", "y")) == stage_key("merge", trained=["x", "y"])
    assert stage_key("merge", trained="k1") != stage_key("merge", trained="k2")
    before = stage_key("merge", trained="k1")
    monkeypatch.setattr(stages, "ARTIFACT_VERSION", "2")  # a new artifact format: nothing old is reused
    assert stage_key("merge", trained="k1") != before


def test_a_merge_key_names_what_it_merges_and_from_where_never_a_path(tmp_path):
    """The same merge in another clone reuses its folder: a task_slerp merge's key holds the key of
    the model its deltas start from (stage 1, or the backbone), not that model's path; a plain slerp
    reads no base, so none is in its key."""
    from flows.pipeline import merge_key

    cfg = load_config("micro")
    stage2 = {"key": "s2", "final": str(tmp_path / "a" / "stage2")}
    stage1_here = {"key": "s1", "final": str(tmp_path / "a" / "stage1")}
    stage1_there = {"key": "s1", "final": str(tmp_path / "b" / "stage1")}
    backbone = {"key": "bb", "final": str(tmp_path / "a" / "backbone")}
    slerp = merge_key("merge", cfg.merge, stage2, stage1_here)
    assert slerp == merge_key("merge", cfg.merge, stage2, stage1_there) == merge_key("merge", cfg.merge, stage2, None)
    task = cfg.merge.model_copy(update={"method": "task_slerp"})
    from_stage1 = merge_key("merge", task, stage2, stage1_here)
    assert from_stage1 == merge_key("merge", task, stage2, stage1_there)
    assert len({slerp, from_stage1, merge_key("merge", task, stage2, backbone)}) == 3


def test_an_edited_first_stage_file_changes_the_reranked_evaluations_key(tmp_path):
    """eval.first_stage is read by name, like conf/task_prompts.json: its contents are in the key of
    the evaluation that reranks it (the embedders' evaluations do not read it), so an edited file
    re-evaluates. Without a first stage the key is the one every earlier run computed."""
    import hashlib

    from tasks.data import DataError
    from tasks.evaluation.prompts import PROMPTS_FILE
    from tasks.stages import eval_key

    first = tmp_path / "first_stage.json"
    first.write_text(json.dumps({"nq-msmarco-hardneg": {"q0": {"d0": 2.0, "d1": 1.0}}}))
    cfg = load_config("micro", ["eval.first_stage=first_stage.json"]).eval  # relative to the project root

    def keys() -> tuple[str, str]:
        return (eval_key(cfg, model="m", reranker="r", data=DATA, root=tmp_path),
                eval_key(cfg, model="m", reranker=None, data=DATA, root=tmp_path))

    reranked, embedder = keys()
    assert keys() == (reranked, embedder)
    first.write_text(json.dumps({"nq-msmarco-hardneg": {"q0": {"d0": 1.0, "d1": 2.0}}}))
    assert keys()[0] != reranked and keys()[1] == embedder

    plain = load_config("micro").eval
    prompts = hashlib.sha256(PROMPTS_FILE.read_bytes()).hexdigest()[:16]
    assert eval_key(plain, model="m", reranker="r", data=DATA, root=tmp_path) == \
        stage_key("eval", eval=plain, model="m", reranker="r", data=DATA, prompts=prompts)
    first.unlink()
    with pytest.raises(DataError, match=f"eval.first_stage: {first} not found"):
        eval_key(cfg, model="m", reranker="r", data=DATA, root=tmp_path)


def test_the_backbone_stage_saves_the_weights_stage_2_starts_from_without_stage_1(tmp_path):
    """The base of a task_slerp merge of stage-2 balances when stage 1 does not run."""
    import torch

    from tasks.merge import load_checkpoint
    from tasks.training.loop import load_model

    cfg = load_config("micro")
    out = stages.backbone_stage(cfg.model, str(tmp_path / "backbone"))
    start = load_model(cfg.stage2, cfg.model, None, device="cpu").save(tmp_path / "start")
    saved, expected = load_checkpoint(out["final"]), load_checkpoint(start)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_a_stage_folder_counts_as_done_only_with_a_readable_marker(tmp_path):
    sd = stage_dir(tmp_path / "artifacts", "eval-stage2", "0123abcd", folder="eval")
    assert sd.path == tmp_path / "artifacts" / "eval" / "0123abcd"
    assert stage_dir(tmp_path, "stage2", "k").path == tmp_path / "stage2" / "k"
    assert sd.result() is None
    sd.path.mkdir(parents=True)
    (sd.path / "checkpoints").mkdir()  # what a stage leaves when it fails halfway: not done
    assert sd.result() is None

    result = {"final": sd.path / "model", "scores": {"nq": 0.5},
              "checkpoints": (sd.path / "a", sd.path / "b")}
    assert sd.complete(result) is result
    recorded = sd.result()
    assert recorded == {"final": str(sd.path / "model"), "scores": {"nq": 0.5},
                        "checkpoints": [str(sd.path / "a"), str(sd.path / "b")]}
    assert json.loads(sd.marker.read_text()) == recorded and not list(sd.path.glob("*.tmp*"))

    sd.marker.write_text('{"final": "cut')  # a marker cut short (a crash while writing it)
    assert sd.result() is None


def test_ray_train_stages_run_in_the_driver_others_in_a_ray_task():
    cfg = load_config("micro").stage2
    assert train_resources(cfg) == cfg.resources
    distributed = cfg.distributed.model_copy(update={"engine": "ray_train"})
    ray_train = cfg.model_copy(update={"distributed": distributed})
    assert train_resources(ray_train) is None


@pytest.mark.parametrize("omp, cpus, threads", [
    (None, 2.0, 2), (None, 0.5, 1),     # one torch thread per CPU the task holds, at least one
    ("1", 2.0, 1), ("4", 2.0, 2),       # OMP_NUM_THREADS of the driver caps it, never raises it
    ("", 2.0, 2), ("x", 2.0, 2),        # set but not a count: no cap
])
def test_a_stage_task_gets_a_thread_per_cpu_up_to_the_drivers_omp_num_threads(monkeypatch, omp, cpus, threads):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert task_threads(cpus) == threads


# ----------------------------------------------------------------------------- actor placement (the flow's)

def _section(workers: int, cpus: float = 1.0, gpus: float = 0.0):
    return load_config("micro", [f"filter.workers={workers}", f"filter.cpus_per_worker={cpus}",
                                 f"filter.gpus_per_worker={gpus}"]).filter


@pytest.mark.parametrize("workers, cpus, gpus, cluster, actors", [
    (2, 1.0, 0.0, {"CPU": 8.0}, 2),                  # fits: as configured
    (4, 1.0, 0.0, {"CPU": 2.0}, 2),                  # two CPUs hold two actors of one CPU
    (4, 0.1, 0.0, {"CPU": 0.3}, 3),                  # fractions: 0.3 / 0.1 fits 3, not 2.999...
    (4, 1.0, 0.5, {"CPU": 16.0, "GPU": 1.0}, 2),     # half a GPU each: two share the one device
    (3, 2.0, 1.0, {"CPU": 5.0, "GPU": 4.0}, 2),      # the scarcer resource decides
])
def test_the_embedded_ray_gets_the_pool_it_can_hold(monkeypatch, workers, cpus, gpus, cluster, actors):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = place_actors(_section(workers, cpus, gpus), "filter", resources=cluster)
    assert p == Placement(actors, cpus, gpus) and p.threads == max(1, round(cpus))


def test_a_pool_the_embedded_ray_cannot_hold_once_is_an_error_naming_the_settings(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"filter: not one actor of filter.workers=2 actors of 1 CPU\(s\) "
                                         r"and 1 GPU\(s\) each \(filter.cpus_per_worker, filter.gpus_per_worker\) "
                                         r"fits on the local Ray, which has 4 CPU\(s\) and 0 GPU\(s\)"):
        place_actors(_section(2, 1.0, 1.0), "filter", resources={"CPU": 4.0})


@pytest.mark.parametrize("how", ["infra.ray_address", "RAY_ADDRESS"])
def test_a_cluster_keeps_the_configured_pool_its_autoscaler_may_grow_into(monkeypatch, caplog, how):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = "ray://head:10001" if how == "infra.ray_address" else None
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "auto")
    with caplog.at_level("WARNING", logger="tasks.distributed"):
        p = place_actors(_section(8, 1.0, 1.0), "filter", address=address, resources={"CPU": 8.0})
    assert p == Placement(8, 1.0, 1.0) and "wait for nodes" in caplog.text


def test_a_stage_called_without_a_placement_takes_its_configs_request():
    cfg = _section(3, 0.5, 0.25)
    assert Placement.requested(cfg) == Placement(3, 0.5, 0.25) and Placement.requested(cfg).total_cpus == 2
    with pytest.raises(ValueError, match="actors >= 1"):
        Placement(0)


def test_a_setting_added_later_keeps_earlier_stage_keys_at_its_neutral_value(micro_cfg):
    """model.autocast came after stage keys: left at null (what every stage computed before it), the
    key is the one a run before it recorded, so its cached stages stay valid; set, it is a new key."""
    model = micro_cfg.model
    earlier = model.model_dump(mode="json")
    del earlier["autocast"]  # the model settings as stage keys saw them before the option existed
    assert stage_key("stage1", model=model) == stage_key("stage1", model=earlier)
    assert stage_key("stage1", model=model.model_copy(update={"autocast": "bfloat16"})) != stage_key(
        "stage1", model=model)


def test_freezing_the_embeddings_keys_only_the_stage_that_freezes(base_keys, micro_cfg):
    """stage.freeze_embeddings changes what a stage trains: set in stage 2 it changes stage 2 and the
    merge, in the reranker the reranker only; left false, a stage's key is the one from before the option."""
    assert changed(base_keys, recipe_keys("stage2.freeze_embeddings=true")) == {"stage2", "merge"}
    assert changed(base_keys, recipe_keys("reranker.freeze_embeddings=true")) == {"reranker"}
    earlier = micro_cfg.stage2.model_dump(mode="json")
    del earlier["freeze_embeddings"], earlier["symmetric_order"], earlier["freeze_layers"]  # before these options
    assert stage_key("stage2", train=micro_cfg.stage2) == stage_key("stage2", train=earlier)


def test_freezing_lower_layers_keys_only_the_stage_that_freezes(base_keys):
    """stage.freeze_layers set in stage 2 changes stage 2 and the merge (left at 0, the key is the one
    from before the option: the test above)."""
    assert changed(base_keys, recipe_keys("stage2.freeze_layers=1")) == {"stage2", "merge"}
