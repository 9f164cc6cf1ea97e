"""Context-aware decoding of synthetic queries (`synth.generator.context_guidance`): the generator
decodes each retrieval query against the same prompt without its passage, so that the query leans
on what the passage says (tasks/synthesis/generators.py, `ContextGuidance`)."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

import tasks.synthesis.generators as generators
from tasks.config import GeneratorConfig, load_config
from tasks.synthesis.generators import ContextGuidance, build_generator
from tasks.synthesis.plan import check_config, load_passages, make_plan
from tasks.synthesis.prompts import query_prompt
from tasks.synthesis.run import content_settings
from tasks.synthesis.schemas import query_schema
from tasks.synthesis.shard import synthesize_shard
from tests.fakes import ScriptedGenerator

PERSONA = "A nurse working night shifts"


def _query_prompts(passages: list[str]) -> tuple[list, list]:
    def prompt(passage):
        return query_prompt(PERSONA, passage, "keywords", "high_school", 5, corpus_language="English",
                            query_language="English")
    return [prompt(p) for p in passages], [prompt("") for _ in passages]


class _Recording(ContextGuidance):
    """ContextGuidance that keeps what it saw and returned at each step."""

    steps: list[dict] = []

    def __call__(self, input_ids, scores):
        uncond = self.unconditional_logprobs(input_ids)
        self.unconditional_logprobs = lambda _ids: uncond  # the parent's call reuses this step's
        out = super().__call__(input_ids, scores)
        del self.unconditional_logprobs
        _Recording.steps.append({"ids": input_ids.clone(), "scores": scores.clone(), "uncond": uncond,
                                 "out": out.clone()})
        return out


def test_guidance_reads_the_passageless_prompt_as_a_full_forward_would(monkeypatch):
    """Rows of different lengths (left padding, a shared cached prefix): at every step the
    unconditional log-probabilities equal a plain forward of that row's passage-less prompt plus
    the tokens generated so far, and the returned scores are eq. cond + (g-1)(cond - uncond) on
    the plausible tokens, -inf elsewhere."""
    gen = build_generator(GeneratorConfig(model="micro", batch_size=4, context_guidance=2.0))
    prompts, uncond = _query_prompts(["short passage", "a much longer passage " * 6, "middle sized passage " * 2])
    uncond[1] = query_prompt("A retired pilot", "", "keywords", "phd", 9, corpus_language="English",
                             query_language="English")  # a row whose passage-less prompt differs in length too
    monkeypatch.setattr(generators, "ContextGuidance", _Recording)
    _Recording.steps = []
    gen.generate(prompts, seed=3, temperature=1.0, max_new_tokens=6, unconditional=uncond)
    assert len(_Recording.steps) == 6

    start = _Recording.steps[0]["ids"].shape[1]
    order = sorted(range(3), key=lambda i: -len(gen._tokenize([prompts[i]], 6)[0]))  # batch_by_length's rows
    uids = gen._tokenize(uncond, 6)
    model = gen.model
    with torch.inference_mode():
        for step in _Recording.steps:
            new = step["ids"][:, start:]
            for row, i in enumerate(order):
                if any(t in gen.stop_ids for t in new[row].tolist()):
                    continue  # a finished row is fed padding from here on
                full = torch.tensor([uids[i] + new[row].tolist()])
                ref = torch.log_softmax(model(input_ids=full).logits[0, -1].float(), -1)
                torch.testing.assert_close(step["uncond"][row], ref, atol=2e-4, rtol=1e-4)
            cond = torch.log_softmax(step["scores"].float(), -1)
            expect = cond + (cond - step["uncond"])
            plausible = cond >= cond.max(-1, keepdim=True).values + math.log(0.1)
            assert torch.equal(torch.isfinite(step["out"]), plausible)
            torch.testing.assert_close(step["out"][plausible], expect[plausible])


def test_guidance_composes_with_the_grammar_and_is_off_at_one():
    prompts, uncond = _query_prompts(["the night shift rota of a city hospital", "jazz clubs of New Orleans"])
    schemas = [query_schema(5, "English")] * 2
    on = build_generator(GeneratorConfig(model="micro", batch_size=2, context_guidance=3.0))
    outs = on.generate(prompts, seed=1, temperature=1.0, max_new_tokens=40, schemas=schemas, unconditional=uncond)
    for out in outs:  # the micro LM is random: only the grammar makes its answers JSON
        jsonschema.validate(json.loads(out), schemas[0])
    assert on.generate(prompts, seed=1, temperature=1.0, max_new_tokens=40, schemas=schemas,
                       unconditional=uncond) == outs  # seeded
    off = build_generator(GeneratorConfig(model="micro", batch_size=2))
    plain = off.generate(prompts, seed=1, temperature=1.0, max_new_tokens=40, schemas=schemas)
    assert off.generate(prompts, seed=1, temperature=1.0, max_new_tokens=40, schemas=schemas,
                        unconditional=uncond) == plain  # g = 1 ignores the passage-less prompts
    with pytest.raises(ValueError, match="1 unconditional prompts for 2 prompts"):
        on.generate(prompts, seed=1, temperature=1.0, max_new_tokens=4, unconditional=uncond[:1])


class _Recorder(ScriptedGenerator):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[list, list | None]] = []

    def generate(self, prompts, *, seed, temperature, max_new_tokens, schemas=None, **kw):
        self.seen.append((prompts, kw.get("unconditional", "absent")))
        return super().generate(prompts, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)


def test_only_query_prompts_get_a_passageless_twin(shared_data):
    micro = load_config("micro").synth
    mix = {"retrieval": 1, "bitext": 1, "sts": 1, "classification": 1}
    cfg = micro.model_copy(update={"kinds": mix, "bitext_languages": ["English", "Chinese"],
                                   "generator": micro.generator.model_copy(update={"context_guidance": 2.0})})
    plans = [make_plan(p, cfg) for p in load_passages(
        [shared_data / "passages/en-nq-msmarco.jsonl", shared_data / "passages/zh-sohu-news.jsonl"], limit=8)]
    for p in plans:
        p.personas = [PERSONA, "A retired pilot who loves jazz"]
    gen = _Recorder()
    synthesize_shard(gen, plans, cfg, 0)
    queries = 0
    for prompts, uncond in gen.seen:
        assert len(uncond) == len(prompts)
        for prompt, twin in zip(prompts, uncond):
            title = prompt[0]["content"]
            if twin is None:
                assert "generate a query" not in title
                continue
            queries += 1
            assert "generate a query" in title and twin[:-1] == prompt[:-1]  # same instructions and example
            passage = prompt[-1]["content"].split("**Passage**\n")[1].split("\n\n**Requirement**")[0]
            assert passage and passage not in twin[-1]["content"]
            assert twin[-1]["content"] == prompt[-1]["content"].replace(passage, "")
    assert queries == sum(p.kind == "retrieval" for p in plans) > 0

    gen = _Recorder()  # off: backends without the keyword keep working
    synthesize_shard(gen, plans, micro.model_copy(update={"kinds": mix, "bitext_languages": ["English", "Chinese"]}), 0)
    assert all(uncond == "absent" for _, uncond in gen.seen)


def test_guidance_is_a_transformers_setting_recorded_when_on():
    base = load_config("micro").synth
    guided = base.model_copy(update={"generator": base.generator.model_copy(update={"context_guidance": 2.0})})
    check_config(guided)
    assert content_settings(guided)["generator"]["context_guidance"] == 2.0
    assert "context_guidance" not in content_settings(base)["generator"]  # folders made before it still match
    remote = guided.model_copy(update={"generator": guided.generator.model_copy(
        update={"backend": "openai", "base_url": "http://localhost:1"})})
    with pytest.raises(ValueError, match="context_guidance=2.0 needs the transformers backend"):
        check_config(remote)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        GeneratorConfig(context_guidance=0.5)
