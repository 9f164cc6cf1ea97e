"""Structured decoding in synthesis (`synth.generator.structured`): the JSON schema of each stage's
answer, how each backend applies it, and what the real bundled SmolLM2 writes under it.

The schema fixes the format (keys, the choices the prompt offers, string length and script); the
content checks of `_parse` still judge every answer.
"""

from __future__ import annotations

import json
import re
import sys
import types

import jsonschema
import pytest

from tasks.config import GeneratorConfig, SynthConfig, load_config
from tasks.synthesis.generators import Secret, build_generator
from tasks.synthesis.plan import Plan, check_config, load_passages, make_plan
from tasks.synthesis.prompts import (
    DIFFICULTIES, QUESTION_TYPES, classification_prompt, configuration_prompt, query_prompt,
)
from tasks.synthesis.run import content_settings, use_prefill
from tasks.synthesis.schemas import (
    classification_schema, configuration_schema, query_schema, script_pattern, sts_schema, translation_schema,
)
from tasks.synthesis.shard import synthesize_shard
from tasks.synthesis.text import truncate_words
from tests.fakes import KEY, FakeOpenAI, ScriptedGenerator

EN = "passages/en-nq-msmarco.jsonl"
ZH = "passages/zh-sohu-news.jsonl"


@pytest.fixture(scope="module")
def personas(shared_data) -> list[str]:
    lines = (shared_data / "personas" / "personahub-5k.txt").read_text(encoding="utf-8").splitlines()
    return [x.strip() for x in lines[:40] if x.strip()]


# ----------------------------------------------------------------------------- the schemas

def test_configuration_schema_offers_exactly_the_prompts_choices(personas):
    candidates = personas[:5]
    msgs = configuration_prompt("A passage.", candidates, "English")
    offered = re.findall(r"^\d+\. (.*)$", msgs[-1]["content"], re.M)
    def options(name: str) -> list[str]:
        return re.findall(r"^- (\w+): ", msgs[0]["content"].split(name + ":\n", 1)[1], re.M)

    schema = configuration_schema(candidates)
    props = schema["properties"]
    assert list(props) == ["Character", "Question_Type", "Difficulty"] == schema["required"]
    assert schema["additionalProperties"] is False
    assert props["Character"]["enum"] == offered == candidates
    assert props["Question_Type"]["enum"] == options("Question_Type")[:5] == list(QUESTION_TYPES)
    assert props["Difficulty"]["enum"] == options("Difficulty")[:3] == list(DIFFICULTIES)
    # the template's own examples answer in the schema's format
    examples = re.findall(r"<Example\d>(.*?)</Example\d>", msgs[0]["content"], re.S)
    assert len(examples) == 3
    for example in examples:
        example_candidates = re.findall(r"^\d+\. (.*)$", example, re.M)
        out = json.loads(example.split("**output**:\n", 1)[1])
        jsonschema.validate(out, configuration_schema(example_candidates))


def test_text_schemas_bound_length_and_script():
    en = query_schema(10, "English")  # up to 20 words: 160 characters
    jsonschema.validate({"Query": "how do mitochondria make energy"}, en)
    jsonschema.validate({"Query": "x" * 160}, en)
    for bad in ["x" * 161, "", 'how "cells" work', "line\nbreak"]:  # no raw quote or newline: valid JSON
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"Query": bad}, en)
    zh = query_schema(20, "Chinese")  # up to 40 Chinese words: 80 characters (76 without a "2021年" lead)
    jsonschema.validate({"Query": "线" * 76}, zh)
    for ok in ["线粒体如何产生能量？", "2021年iPhone的价格是多少"]:
        jsonschema.validate({"Query": ok}, zh)
    for bad in ["How do mitochondria make energy?", "iPhone价格", "线粒体" * 30, "", "ミトコンドリア"]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"Query": bad}, zh)
    with pytest.raises(jsonschema.ValidationError):  # no other keys
        jsonschema.validate({"Query": "x", "Answer": "y"}, query_schema(5, "English"))
    assert re.fullmatch(script_pattern("English")[1:-1], "Le musée est fermé le lundi.")
    assert not re.fullmatch(script_pattern("English")[1:-1], "博物馆 is closed")
    jsonschema.validate({"Translation": "博物馆周一闭馆。"}, translation_schema("Chinese"))
    jsonschema.validate({"Sentence": "On stage a guy plays guitar."}, sts_schema("English"))
    with pytest.raises(jsonschema.ValidationError):  # a sentence ends: not cut at an unescaped quote
        jsonschema.validate({"Sentence": "The second season of the series "}, sts_schema("English"))
    labels = ["health", "sports"]
    schema = classification_schema(labels)
    assert schema["properties"]["Label"]["enum"] == labels
    assert schema["properties"]["Description"]["maxLength"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"Label": "politics", "Description": "x"}, schema)


# ----------------------------------------------------------------------------- SmolLM2 under a schema

@pytest.fixture(scope="module")
def smol():
    """The default generator: the bundled SmolLM2-135M-Instruct (~20 s to load once)."""
    return build_generator(GeneratorConfig())


@pytest.mark.slow  # the real SmolLM2 decoding under a grammar: ~30 s on 2 cores with the test below
def test_smollm2_configuration_answers_are_valid_json_within_the_enums(smol, shared_data, personas):
    passages = load_passages([shared_data / EN, shared_data / ZH], limit=2)
    assert [p.language for p in passages] == ["English", "Chinese"]
    candidates = [personas[0:5], personas[5:10]]
    prompts = [configuration_prompt(truncate_words(p.text, 48), c, p.language)
               for p, c in zip(passages, candidates)]
    schemas = [configuration_schema(c) for c in candidates]
    outs = smol.generate(prompts, seed=0, temperature=0.8, max_new_tokens=96, schemas=schemas)
    for out, schema in zip(outs, schemas):
        jsonschema.validate(json.loads(out), schema)  # strict JSON: no lenient parsing needed


@pytest.mark.slow
def test_smollm2_chinese_query_is_chinese_and_bounded(smol, shared_data, personas):
    passage = load_passages([shared_data / ZH], limit=1)[0]
    prompt = query_prompt(personas[0], truncate_words(passage.text, 48), "keywords", "high_school", 5,
                          corpus_language="Chinese", query_language="Chinese")
    schema = query_schema(5, "Chinese")
    out, = smol.generate([prompt], seed=0, temperature=0.8, max_new_tokens=96, schemas=[schema])
    jsonschema.validate(json.loads(out), schema)


# ----------------------------------------------------------------------------- the local backend's mechanics

def test_transformers_backend_constrains_each_row_to_its_own_schema():
    """One call mixing two schemas and a free prompt (the tiny random micro LM: only the grammar
    makes its answers JSON)."""
    gen = build_generator(GeneratorConfig(model="micro", batch_size=4))
    prompts = [classification_prompt("passage " * n, ["alpha", "beta"], "English") for n in (3, 9, 5)]
    schemas = [classification_schema(["alpha", "beta"]), configuration_schema(["a nurse", "a pilot"]), None]
    outs = gen.generate(prompts, seed=1, temperature=1.0, max_new_tokens=48, schemas=schemas)
    jsonschema.validate(json.loads(outs[0]), schemas[0])
    jsonschema.validate(json.loads(outs[1]), schemas[1])
    again = gen.generate(prompts, seed=1, temperature=1.0, max_new_tokens=48, schemas=schemas)
    assert again == outs  # seeded
    assert len(gen._grammars) == 2  # compiled once per distinct schema
    with pytest.raises(ValueError, match="both a schema and a prefill"):
        gen.generate([classification_prompt("p", ["alpha", "beta"], "English", prefill=True)], seed=0,
                     temperature=0.0, max_new_tokens=4, schemas=[schemas[0]])


# ----------------------------------------------------------------------------- the other backends

def test_openai_backend_sends_the_schema_as_response_format():
    schema = configuration_schema(["A tourist", "A geographer"])
    prompt = configuration_prompt("Paris is the capital of France.", ["A tourist", "A geographer"], "English")
    with FakeOpenAI() as srv:
        gen = build_generator(GeneratorConfig(backend="openai", model="qwen3-32b", base_url=srv.url),
                              api_key=Secret(KEY))
        gen.generate([prompt, prompt], seed=1, temperature=0.0, max_new_tokens=40, schemas=[schema, None])
    constrained, free = sorted(srv.requests, key=lambda b: "response_format" not in b)
    assert constrained["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "configuration", "schema": schema, "strict": True}}
    assert "response_format" not in free


@pytest.mark.parametrize("field", ["structured_outputs", "guided_decoding"])
def test_vllm_backend_passes_the_schema_to_structured_outputs(monkeypatch, field):
    """New vLLM takes `structured_outputs=StructuredOutputsParams(json=...)`, older vLLM
    `guided_decoding=GuidedDecodingParams(json=...)`: the backend uses what the installed one has."""
    from transformers import AutoTokenizer

    class LLM:
        def __init__(self, model: str, **engine_args):
            self.model, self.calls = model, []
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=4096))

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(self.model)

        def generate(self, requests, params, use_tqdm=True):
            self.calls.append(params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="{}")]) for _ in requests]

    params_cls = "StructuredOutputsParams" if field == "structured_outputs" else "GuidedDecodingParams"
    sampling = types.SimpleNamespace(**{params_cls: lambda **kw: ("constraint", kw)})
    fake_vllm = types.SimpleNamespace(LLM=LLM, SamplingParams=types.SimpleNamespace, sampling_params=sampling)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    gen = build_generator(GeneratorConfig(backend="vllm", model="micro"))
    schema = configuration_schema(["a nurse"])
    prompt = configuration_prompt("short", ["a nurse"], "English")
    gen.generate([prompt, prompt], seed=3, temperature=0.5, max_new_tokens=32, schemas=[schema, None])
    constrained, free = gen.llm.calls[0]
    assert getattr(constrained, field) == ("constraint", {"json": schema}) and constrained.stop is None
    assert not hasattr(free, "structured_outputs") and not hasattr(free, "guided_decoding")


# ----------------------------------------------------------------------------- the switch

class Recorder(ScriptedGenerator):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[list, list | None]] = []

    def generate(self, prompts, *, seed, temperature, max_new_tokens, schemas=None):
        self.seen.append((prompts, schemas))
        return super().generate(prompts, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)


def _plans(shared_data, cfg: SynthConfig) -> list[Plan]:
    plans = [make_plan(p, cfg) for p in load_passages([shared_data / EN, shared_data / ZH], limit=8)]
    for p in plans:
        p.personas = ["A nurse working night shifts", "A retired pilot who loves jazz"]
    return plans


def test_structured_switch_chooses_schemas_or_the_old_prefill_path(shared_data):
    micro = load_config("micro").synth
    mix = {"retrieval": 1, "bitext": 1, "sts": 1, "classification": 1}
    on = micro.model_copy(update={"kinds": mix, "bitext_languages": ["English", "Chinese"]})
    assert on.generator.structured and not use_prefill(on)
    gen = Recorder()
    synthesize_shard(gen, _plans(shared_data, on), on, 0, prefill=use_prefill(on))
    for prompts, schemas in gen.seen:
        assert schemas is not None and len(schemas) == len(prompts)
        assert all(m[-1]["role"] == "user" for m in prompts)  # no prefill: the grammar writes it all
        titles = {s["title"] for s in schemas}
        assert titles <= {"configuration", "query", "translation", "sts", "classification"}

    off = on.model_copy(update={"generator": on.generator.model_copy(update={"structured": False})})
    assert use_prefill(off)  # the transformers backend's old default
    gen = Recorder()
    synthesize_shard(gen, _plans(shared_data, off), off, 0, prefill=use_prefill(off))
    for prompts, schemas in gen.seen:
        assert schemas is None and all(m[-1]["role"] == "assistant" for m in prompts)

    both = on.model_copy(update={"generator": on.generator.model_copy(update={"json_prefill": True})})
    with pytest.raises(ValueError, match="json_prefill and synth.generator.structured"):
        check_config(both)
    # structured folders record the switch; unstructured ones look like folders made before it existed
    assert content_settings(on)["generator"]["structured"] is True
    assert "structured" not in content_settings(off)["generator"]


def test_passage_files_are_interleaved_and_queries_follow_the_passage_language(shared_data):
    passages = load_passages([shared_data / EN, shared_data / ZH], limit=6)
    assert [p.language for p in passages] == ["English", "Chinese"] * 3
    assert load_passages([shared_data / EN], limit=3) == passages[::2]
    cfg = SynthConfig(languages=["passage"])
    assert [make_plan(p, cfg).language for p in passages] == [p.language for p in passages]
