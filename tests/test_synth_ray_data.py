"""The Ray Data synthesis engine (`synth.engine: ray_data`) and the vLLM backend.

The engine must write exactly the files of the actor engine: the micro LM samples for real, so
equal files mean every Ray Data batch was one whole shard with the actor engine's seeds. Ray and
Ray Data always run for real; the LLM is the micro model or a real HTTP server on loopback. vLLM
cannot be installed here: its backend is checked for the error a missing install gives and, with a
stand-in `vllm` module, for what it sends to vLLM.
"""

from __future__ import annotations

import filecmp
import functools
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import ray

from tasks.config import GeneratorConfig, SynthConfig
from tasks.synthesis.generators import GeneratorError, Secret, build_generator
from tasks.synthesis.plan import load_passages, make_plan
from tasks.synthesis.prompts import classification_prompt, configuration_prompt
from tasks.synthesis.run import content_settings, synthesize
from tests.configs import synth_cfg
from tests.fakes import KEY, CrashingGenerator, FakeOpenAI
from tests.processes import wait_for_free_cpus

MIX = {"retrieval": 2, "bitext": 1, "sts": 1, "classification": 1}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json*") if p.name != "stats.json")


def _same_files(a: Path, b: Path) -> None:
    names = _files(a)
    assert names == _files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch or errors


def _records(folder: Path) -> tuple[list[dict], list[dict]]:
    read = lambda pattern: [json.loads(line) for f in sorted(folder.glob(pattern))  # noqa: E731
                            for line in f.read_text().splitlines()]
    return read("shard-*.jsonl"), read("rejected/rejected-*.jsonl")


@pytest.fixture(scope="module")
def micro_synth(shared_data, personas_file) -> SynthConfig:
    """7 passages in shards of 2 (the last one short), all four task kinds (seed 2); the micro LM samples."""
    return synth_cfg(shared_data, personas_file, workers=2, num_passages=7, shard_size=2, kinds=MIX, seed=2,
                     engine="ray_data", generator={"max_new_tokens": 16})


@pytest.fixture(scope="module")
def ray_data_run(ray_session, micro_synth, module_tmp) -> Path:
    out = module_tmp("ray-data") / "synth"
    res = synthesize(micro_synth, out, progress=False)
    assert res.stats["run"]["shards_generated"] == 4
    return out


@pytest.mark.slow  # both engines end to end on the micro LM
def test_ray_data_writes_the_actor_engines_shards(ray_data_run, micro_synth, tmp_path):
    one_actor = micro_synth.model_copy(update={"engine": "actors", "workers": 1})
    actors = synthesize(one_actor, tmp_path / "actors", progress=False)
    _same_files(tmp_path / "actors", ray_data_run)  # shards, rejected files and manifest, byte for byte
    stats = json.loads((ray_data_run / "stats.json").read_text())
    content = lambda st: {k: v for k, v in st.items() if k != "run"}  # noqa: E731 - "run" holds timings
    assert content(stats) == content(actors.stats)

    # complete and duplicate-free: each passage once, in the shard that holds it, accepted or rejected
    plans = [make_plan(p, micro_synth) for p in load_passages(micro_synth.passages, limit=7)]
    accepted, rejected = _records(ray_data_run)
    seen = [(r["meta"]["shard"], r["meta"]["passage_id"]) for r in accepted + rejected]
    assert sorted(seen) == sorted((i // 2, p.passage.id) for i, p in enumerate(plans))
    assert stats["accepted"] + stats["rejected"] == 7 and stats["llm_calls"] >= 7
    assert {r["meta"]["task"] for r in accepted + rejected} == set(MIX)


@pytest.mark.slow
def test_ray_data_resume_after_a_kill_and_a_crash_generates_only_missing_shards(ray_data_run, micro_synth,
                                                                              tmp_path):
    out = tmp_path / "synth"
    shutil.copytree(ray_data_run, out)
    for name in ("shard-00001.jsonl", "shard-00003.jsonl", "rejected/rejected-00003.jsonl"):
        (out / name).unlink()  # a run killed before these were written
    finished = {n: (out / n).stat().st_mtime_ns for n in ("shard-00000.jsonl", "shard-00002.jsonl",
                                                          "rejected/rejected-00000.jsonl",
                                                          "rejected/rejected-00002.jsonl")}
    one = micro_synth.model_copy(update={"workers": 1})

    # the rerun crashes on the short last shard (a worker's backend fails): the error comes through
    # as itself and that shard is not written; shard 1 may have been finished before it
    passages = load_passages(one.passages, limit=7)
    crash = functools.partial(CrashingGenerator, one.generator, passages[6].text[:60])
    with pytest.raises(GeneratorError, match="simulated crash") as crashed:
        synthesize(one, out, generator_factory=crash, progress=False)
    assert not (out / "shard-00003.jsonl").exists()
    # the error is still held (a Prefect state, a caller's retry loop) and no cycle collection runs:
    # the crashed pool's actor must still give its CPU back, or the rerun below (or a later stage
    # that asks for every CPU) waits for it for ever
    assert wait_for_free_cpus() == ray.cluster_resources()["CPU"], crashed.value
    missing = 2 - (out / "shard-00001.jsonl").exists()

    res = synthesize(one, out, progress=False)
    assert (res.stats["run"]["shards_generated"], res.stats["run"]["shards_reused"]) == (missing, 4 - missing)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # finished shards: not rewritten
    _same_files(ray_data_run, out)
    # a folder finished by one engine is finished for the other (the engine is not in the manifest)
    again = synthesize(micro_synth.model_copy(update={"engine": "actors"}), out, progress=False)
    assert again.stats["run"]["shards_generated"] == 0


def test_openai_backend_on_ray_data_loses_no_sample_to_429_and_5xx(ray_session, shared_data, personas_file,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("Q3E_TEST_API_KEY", KEY)
    generator = {"backend": "openai", "model": "qwen3-32b", "api_key_env": "Q3E_TEST_API_KEY",
                 "concurrency": 3, "backoff_s": 0.001, "max_backoff_s": 0.01}
    cfg = synth_cfg(shared_data, personas_file, workers=2, shard_size=4, seed=3, kinds=MIX,
                    languages=["English", "German"], engine="ray_data", generator=generator)
    with FakeOpenAI() as clean:
        gen = cfg.generator.model_copy(update={"base_url": clean.url})
        reference = cfg.model_copy(update={"engine": "actors", "workers": 1, "generator": gen})
        synthesize(reference, tmp_path / "clean", progress=False)
    n = len(clean.requests)  # the answers the run needs
    kinds = [("status", 429, {"Retry-After": "0"}), ("status", 500), ("status", 429), ("status", 503),
             ("status", 502)]
    with FakeOpenAI() as srv:
        srv.delay = 0.02  # requests overlap
        # every other request fails
        srv.script = [x for i in range(n) for x in (kinds[i % len(kinds)], ("llm",))]
        # n retries per request: none can run out, however the n faults fall among concurrent requests
        gen = cfg.generator.model_copy(update={"base_url": srv.url, "http_retries": n})
        res = synthesize(cfg.model_copy(update={"generator": gen}), tmp_path / "faulty", progress=False)
    assert not srv.script and len(srv.requests) == 2 * n  # all n faults were served, each retried
    assert srv.max_active >= 2
    _same_files(tmp_path / "clean", tmp_path / "faulty")
    accepted, rejected = _records(tmp_path / "faulty")
    assert len(accepted) + len(rejected) == 8 == res.stats["passages"]
    assert len({r["meta"]["passage_id"] for r in accepted + rejected}) == 8


# ----------------------------------------------------------------------------- the vllm backend

def test_vllm_backend_without_vllm_names_the_gpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, installed or not
    with pytest.raises(GeneratorError, match=r"needs the vllm package.*pip install '\.\[gpu\]'") as e:
        build_generator(GeneratorConfig(backend="vllm", model="micro"))
    assert isinstance(e.value.__cause__, ImportError)


def test_vllm_backend_renders_chat_prompts_and_keeps_their_order(monkeypatch):
    """What the backend hands vLLM (a stand-in module records it): chat-templated token ids (with
    the template's variables) cut from the left to fit the context, one seeded request each, and
    completions in prompt order with the prefill put back in front."""
    from transformers import AutoTokenizer

    class LLM:
        def __init__(self, model: str, **engine_args):
            self.model, self.engine_args, self.calls = model, engine_args, []
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=200))

        def get_tokenizer(self):  # the micro model's template, plus Qwen3's switch to skip thinking
            tok = AutoTokenizer.from_pretrained(self.model)
            tok.chat_template += ("{% if enable_thinking is defined and not enable_thinking %}"
                                  "<think></think>{% endif %}")
            return tok

        def generate(self, requests, params, use_tqdm=True):
            self.calls.append((requests, params))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f'answer {i}"}}')])
                    for i in range(len(requests))]

    fake_vllm = types.SimpleNamespace(LLM=LLM, SamplingParams=types.SimpleNamespace)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    gen = build_generator(GeneratorConfig(backend="vllm", model="micro", top_p=0.9,
                                          chat_template_kwargs={"enable_thinking": False},
                                          vllm_args={"tensor_parallel_size": 2}))
    assert gen.llm.engine_args == {"tensor_parallel_size": 2} and Path(gen.llm.model, "config.json").is_file()
    prompts = [classification_prompt("a passage " * 50, ["a", "b"], "English", prefill=True),
               configuration_prompt("short", ["a nurse"], "English")]
    outs = gen.generate(prompts, seed=11, temperature=0.7, max_new_tokens=8)
    assert outs == ['{"Label": "answer 0"}', 'answer 1"}']

    (requests, params), = gen.llm.calls
    tok = gen.tokenizer
    full = [tok.encode(tok.apply_chat_template(prompts[0], tokenize=False, continue_final_message=True,
                                               add_generation_prompt=False), add_special_tokens=False),
            tok.encode(tok.apply_chat_template(prompts[1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False), add_special_tokens=False)]
    assert all(len(ids) > 192 for ids in full)  # both longer than the context leaves them (200 - 8)
    assert [r["prompt_token_ids"] for r in requests] == [ids[-192:] for ids in full]
    assert tok.decode(requests[1]["prompt_token_ids"]).endswith("<|im_start|>assistant\n<think></think>")
    assert [(p.seed, p.temperature, p.top_p, p.max_tokens) for p in params] == [(11, 0.7, 0.9, 8)] * 2
    assert [p.stop for p in params] == [["}"], None]  # only a JSON prefill stops at its closing brace


def test_chat_template_kwargs_reach_an_openai_server_and_the_manifest():
    with FakeOpenAI() as srv:
        cfg = GeneratorConfig(backend="openai", model="qwen3-32b", base_url=srv.url,
                              chat_template_kwargs={"enable_thinking": False})
        gen = build_generator(cfg, api_key=Secret(KEY))
        gen.generate([configuration_prompt("p", ["a nurse"], "English")], seed=1, temperature=0.0,
                     max_new_tokens=8)
    assert srv.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    # they change the answers, so they are part of a folder's settings; unset, they are left out, so
    # folders made before the option existed still resume
    assert content_settings(SynthConfig(generator=cfg))["generator"]["chat_template_kwargs"] == \
        {"enable_thinking": False}
    assert "chat_template_kwargs" not in content_settings(SynthConfig())["generator"]
