"""Synthesis (paper §3.3, A.1): prompts, lenient parsing/validation, the two generator backends, and
the Ray-distributed, resumable `synthesize` on real passages.

Where exact outputs are needed the LLM is a scripted backend (a class implementing the generator
protocol, or a real HTTP server on loopback speaking the OpenAI API: tests/fakes.py); Ray always
runs for real, on the pool of actors the caller hands over (each actor reports what Ray gave it).
"""

from __future__ import annotations

import filecmp
import functools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.config import GeneratorConfig, SynthConfig
from tasks.distributed import Placement
from tasks.synthesis.generators import GeneratorError, Secret, build_generator, json_object_closed
from tasks.synthesis.openai_server import OpenAIGenerator
from tasks.synthesis.parse import Reject, match_character, normalise_choice, parse_json_answer
from tasks.synthesis.plan import load_passages, make_plan
from tasks.synthesis.prompts import (
    DIFFICULTIES, INSTRUCTIONS, PROMPT_VERSION, QUESTION_TYPES, classification_prompt, configuration_prompt,
    query_prompt,
)
from tasks.synthesis.run import synthesize
from tasks.synthesis.text import check_text
from tests.configs import PASSAGES, synth_cfg
from tests.fakes import KEY, CrashingGenerator, FakeOpenAI, ScriptedGenerator


# ----------------------------------------------------------------------------- prompts (paper A.1)

def _in_order(text: str, parts: list[str]) -> None:
    pos = 0
    for part in parts:
        i = text.find(part, pos)
        assert i >= 0, f"missing or out of order: {part!r}"
        pos = i + len(part)


def test_configuration_prompt_follows_the_paper_template():
    msgs = configuration_prompt("PASSAGE TEXT", ["persona one", "persona two"], "English")
    assert [m["role"] for m in msgs] == ["system", "user"]
    text = msgs[0]["content"] + "\n\n" + msgs[1]["content"]
    _in_order(text, [
        "Given a **Passage** and **Character**, select the appropriate option from three fields: Character, "
        "Question_Type, Difficulty, and return the output in JSON format.",
        "First, select the Character who are likely to be interested in the Passage from the candidates. Then "
        "select the Question_Type that the Character might ask about the Passage; Finally, choose the Difficulty "
        "of the possible question based on the Passage, the Character, and the Question_Type.",
        "Character: Given by input **Character**",
        "Question_Type:", *[f"- {t}: " for t in QUESTION_TYPES],
        "Difficulty:", *[f"- {d}: " for d in DIFFICULTIES],
        "Here are some examples", "<Example1>", "<Example2>", "<Example3>",
        "Now, generate the **output** based on the **Passage** and **Character** from user, the **Passage** will be "
        "in English language and the **Character** will be in English.",
        "Ensure to generate only the JSON output with content in English.",
        "**Passage**:\nPASSAGE TEXT", "**Character**:\n1. persona one\n2. persona two",
    ])
    for out in re.findall(r"\*\*output\*\*:\n(\{.*\})", msgs[0]["content"]):  # the examples obey the rules
        ex = json.loads(out)
        assert ex["Question_Type"] in QUESTION_TYPES and ex["Difficulty"] in DIFFICULTIES
    assert configuration_prompt("p", ["c"], "English", prefill=True)[-1] == \
        {"role": "assistant", "content": '{"Character": "'}


def test_query_prompt_follows_the_paper_template():
    msgs = query_prompt("a nurse", "PASSAGE", "summary", "phd", 12, corpus_language="Chinese",
                        query_language="French")
    # the template's example is a demonstration turn: a request in the template's format and its answer
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert json.loads(msgs[2]["content"]) == {"Query": "How do mitochondria produce energy for the cell?"}
    _in_order(msgs[1]["content"], ["**Character**\n", "**Passage**\nThe mitochondrion", "**Requirement**\n",
                                   "- Type: acquire_knowledge;",
                                   "- Language: the language in which the results are generated should be "
                                   "English language;"])
    text = msgs[0]["content"] + "\n\n" + msgs[3]["content"]
    _in_order(text, [
        "Given a **Character**, **Passage**, and **Requirement**, generate a query from the **Character**'s "
        "perspective that satisfies the **Requirement** and can be used to retrieve the **Passage**. Please return "
        "the result in JSON format.",
        "Here is an example:",
        "Now, generate the **output** based on the **Character**, **Passage** and **Requirement** from user, the "
        "**Passage** will be in Chinese language, the **Character** and **Requirement** will be in English.",
        "Ensure to generate only the JSON output, with the key in English and the value in French language.",
        "**Character**\na nurse", "**Passage**\nPASSAGE", "**Requirement**",
        "- Type: summary;", "- Difficulty: phd;",
        "- Length: the length of the generated sentences should be 12 words;",
        "- Language: the language in which the results are generated should be French language;",
    ])


# ----------------------------------------------------------------------------- parsing and validation

@pytest.mark.parametrize("text", [
    '{"Query": "how tall is it"}',
    'Here you go:\n```json\n{"Query": "how tall is it"}\n```\nHope this helps!',
    "{'Query': 'how tall is it'}",
    '{"Query": "how tall is it",}',
    '{"Query": "how tall is it"',
    'Sure. {"Query": "how tall is it"} {"Query": "second"}',
])
def test_lenient_json_parsing(text):
    assert parse_json_answer(text, ("Query",))["Query"] == "how tall is it"


def test_unescaped_quotes_are_recovered_by_key_scan():
    text = '{"Character": "A die-hard fan of "Chasing Life" who supports it", "Question_Type": "summary", ' \
           '"Difficulty": "phd"}'
    obj = parse_json_answer(text, ("Character", "Question_Type", "Difficulty"))
    assert obj == {"Character": 'A die-hard fan of "Chasing Life" who supports it', "Question_Type": "summary",
                   "Difficulty": "phd"}


@pytest.mark.parametrize("text, code", [("no json at all", "no_json"), ("", "empty_output"),
                                        ("[1, 2, 3]", "no_json")])
def test_unparseable_answers_are_rejected(text, code):
    with pytest.raises(Reject) as e:
        parse_json_answer(text)
    assert e.value.code == code


def test_choices_are_normalised_case_insensitively():
    assert normalise_choice("Yes or No", list(QUESTION_TYPES), "question_type") == "yes_or_no"
    assert normalise_choice("acquire knowledge", list(QUESTION_TYPES), "question_type") == "acquire_knowledge"
    assert normalise_choice("Ph.D.", list(DIFFICULTIES), "difficulty") == "phd"
    assert normalise_choice("High School", list(DIFFICULTIES), "difficulty") == "high_school"
    with pytest.raises(Reject, match="invalid_question_type"):
        normalise_choice("opinion", list(QUESTION_TYPES), "question_type")
    cands = ["A nurse working night shifts", "A retired pilot who loves jazz"]
    assert match_character("2", cands) == cands[1]
    assert match_character("a retired pilot who loves jazz.", cands) == cands[1]
    assert match_character("retired pilot, loves jazz", cands) == cands[1]
    with pytest.raises(Reject, match="unknown_character"):
        match_character("A chef", cands)


def test_generated_text_validation():
    passage = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    assert check_text("  how tall is the eiffel tower ", passage, language="English", length=5) == \
        "how tall is the eiffel tower"
    cases = [
        ("wrought-iron lattice tower on the Champ de Mars", "copied_passage"),
        (passage, "copied_passage"),
        ("How do mitochondria produce energy for the cell?", "copied_example"),
        ("On the stage, a guy plays the guitar. The tower is tall.", "copied_example"),
        ("埃菲尔铁塔有多高", "wrong_language"),
        ("what about the wrought-iron lattice tower on the Champ de Mars", "copied_passage"),
        ("how tall is it " * 4, "repetitive_query"),
        (" ".join(f"tower{i}" for i in range(40)), "query_too_long"),
        ("", "empty_query"),
        ("**Passage** tower", "template_echo"),
    ]
    for text, code in cases:
        with pytest.raises(Reject) as e:
            check_text(text, passage, language="English", length=5)
        assert e.value.code == code, text
    assert check_text("埃菲尔铁塔有多高", passage, language="Chinese", length=5)
    # Chinese has no spaces: a copied clause is one run of the passage's characters
    zh = "2月12日，日本奥运大臣桥本圣子在内阁会议后的例行记者会上表示，前日本足协主席川渊三郎将接替森喜朗出任东京奥组委主席。"
    with pytest.raises(Reject) as e:
        check_text("日本奥运大臣桥本圣子在内阁会议后表示", zh, language="Chinese", length=10)
    assert e.value.code == "copied_passage"
    assert check_text("东京奥组委的新主席是谁", zh, language="Chinese", length=10)  # shares 5 characters


def test_plans_are_deterministic_and_follow_the_mix(shared_data):
    passages = load_passages([shared_data / PASSAGES], limit=400)
    cfg = SynthConfig(kinds={"retrieval": 3, "sts": 1}, languages=["English", "German"], seed=7)
    plans = [make_plan(p, cfg) for p in passages]
    assert plans == [make_plan(p, cfg) for p in passages]
    share = sum(p.kind == "retrieval" for p in plans) / len(plans)
    assert 0.68 < share < 0.82
    assert {p.language for p in plans} == {"English", "German"}
    other = [make_plan(p, cfg.model_copy(update={"seed": 8})) for p in passages]
    assert [p.kind for p in other] != [p.kind for p in plans]


def test_offered_choices_come_in_an_order_drawn_per_passage(shared_data):
    """A small generator answers with the last configuration example and the first label: each
    passage sees them in its own seeded order, the same on every call (the prompt is retried and
    resumed as it was), and the classification schema offers the labels as the prompt lists them."""
    from tasks.synthesis.shard import _Job, _prompt, _schema

    passages = load_passages([shared_data / PASSAGES], limit=40)
    cfg = SynthConfig(kinds={"classification": 1}, seed=3)
    jobs = [_Job(make_plan(p, cfg)) for p in passages]

    def labels(job):
        text = _prompt(job, "classification", cfg, prefill=False)[-1]["content"]
        return re.findall(r"^- (.+)$", text.split("**Labels**\n")[1], flags=re.M)

    orders = [labels(j) for j in jobs]
    assert all(sorted(o) == sorted(cfg.labels) for o in orders)
    assert orders == [labels(j) for j in jobs]
    assert len({o[0] for o in orders}) >= 6  # 10 labels, 40 passages: the first one varies
    assert [_schema(j, "classification", cfg)["properties"]["Label"]["enum"] for j in jobs] == orders

    def examples(job):
        system = _prompt(job, "configuration", cfg, prefill=False)[0]["content"]
        return [json.loads(o)["Question_Type"] for o in re.findall(r"\*\*output\*\*:\n(\{.*\})", system)]

    shown = [examples(j) for j in jobs]
    assert all(sorted(s) == ["acquire_knowledge", "background", "yes_or_no"] for s in shown)
    assert len({s[-1] for s in shown}) == 3
    assert shown == [examples(j) for j in jobs]
    with pytest.raises(ValueError, match="permutation"):
        configuration_prompt("p", ["c"], "English", example_order=[0, 0, 1])


# ----------------------------------------------------------------------------- the local backend

def test_dev_positives_are_never_synthesis_passages(shared_data):
    """synth.exclude_relevant: the relevant documents of a dev set are skipped, the count is kept."""
    from tasks.synthesis.plan import relevant_texts

    path = shared_data / "passages" / "en-nq-msmarco.jsonl"
    positives = relevant_texts([shared_data / "beir" / "nq-msmarco-hardneg"])
    plain = load_passages([path], limit=320)
    kept = load_passages([path], limit=320, exclude=positives)
    assert len({p.text for p in plain} & positives) == 4  # p0, p99, p200, p301 are dev positives
    assert len(kept) == 320 and not {p.text for p in kept} & positives
    assert [p.id for p in kept][:3] == ["p1", "p2", "p3"]


def test_passages_are_a_seeded_sample_of_the_whole_file(shared_data):
    """synth.passage_order=sample: the default English corpus is grouped by topic (its first 160
    passages are the negatives of two dev queries), so the synthesis passages are a uniform sample
    of each file, the same for a seed, without excluded texts; `file` keeps file order."""
    from tasks.synthesis.plan import relevant_texts

    path = shared_data / "passages" / "en-nq-msmarco.jsonl"
    zh = shared_data / "passages" / "zh-sohu-news.jsonl"
    order = {p.id: i for i, p in enumerate(load_passages([path]))}
    positives = relevant_texts([shared_data / "beir" / "nq-msmarco-hardneg"])
    first = load_passages([path], limit=160, exclude=positives)
    sample = load_passages([path], limit=160, exclude=positives, sample_seed=0)
    assert max(order[p.id] for p in first) < 170
    positions = sorted(order[p.id] for p in sample)
    assert len(set(positions)) == 160 and positions[-1] > 1100  # spread over the whole file
    assert sum(pos >= 623 for pos in positions) > 50  # both halves of the file
    assert not {p.text for p in sample} & positives
    assert [p.id for p in load_passages([path], limit=160, exclude=positives, sample_seed=0)] == \
        [p.id for p in sample]
    assert [p.id for p in load_passages([path], limit=160, sample_seed=1)] != [p.id for p in sample]
    mixed = load_passages([path, zh], limit=40, sample_seed=0)  # still interleaved: half from each file
    assert [p.source for p in mixed[:4]] == [path.name, zh.name, path.name, zh.name]
    assert len(load_passages([path], sample_seed=0)) == len(order)  # no limit: every passage, shuffled


def test_transformers_backend_batches_and_continues_a_prefill():
    gen = build_generator(GeneratorConfig(model="micro", batch_size=2))
    prompts = [classification_prompt("passage " * n, ["a", "b"], "English", prefill=True) for n in (3, 30, 9)]
    a = gen.generate(prompts, seed=3, temperature=0.8, max_new_tokens=8)
    assert len(a) == 3 and all(x.startswith('{"Label": "') for x in a)
    assert gen.generate(prompts, seed=3, temperature=0.8, max_new_tokens=8) == a  # seeded
    assert gen.generate(prompts, seed=4, temperature=0.8, max_new_tokens=8) != a
    # the shared template prefix is computed once and reused: same greedy output as without it
    greedy = gen.generate(prompts, seed=0, temperature=0.0, max_new_tokens=6)
    assert gen._prefixes
    gen.min_prefix_tokens = 10**9
    assert gen.generate(prompts, seed=0, temperature=0.0, max_new_tokens=6) == greedy
    assert json_object_closed('{"a": "x"} trailing') and not json_object_closed('{"a": {"b": 1}')


# ----------------------------------------------------------------------------- synthesize on Ray

def test_synthesize_with_a_scripted_llm(ray_session, shared_data, personas_file, tmp_path):
    from tasks.synthesis.encoders import persona_encoder
    from tasks.synthesis.plan import load_personas, retrieve_personas

    cfg = synth_cfg(shared_data, personas_file, workers=2, generator={"max_retries": 1, "json_prefill": False})
    out = tmp_path / "synth"
    res = synthesize(cfg, out, generator_factory=ScriptedGenerator, progress=False)

    passages = load_passages(cfg.passages, limit=8)
    by_id = {p.id: p for p in passages}
    accepted = [json.loads(line) for s in res.shards for line in s.read_text().splitlines()]
    rejected = [json.loads(line) for f in sorted((out / "rejected").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    reasons = {r["passage_id"]: r["reason"] for r in rejected}
    assert reasons == {"p1": "configuration/no_json", "p2": "configuration/invalid_question_type",
                       "p3": "query/copied_passage", "p4": "configuration/missing_character"}
    assert {r["passage_id"]: r["meta"]["llm_calls"] for r in rejected} == {"p1": 2, "p2": 2, "p3": 3, "p4": 2}
    assert all(r["output"] and r["detail"] is not None for r in rejected)

    assert [r["meta"]["passage_id"] for r in accepted] == ["p0", "p5", "p6", "p7"]
    tops = retrieve_personas([by_id[i].text for i in ("p5",)], load_personas(personas_file),
                             persona_encoder(cfg.persona_retriever), top_k=5)
    for rec in accepted:
        m = rec["meta"]
        assert set(rec) == {"query", "response", "rejected_response", "instruction", "meta"}
        assert rec["response"] == by_id[m["passage_id"]].text and rec["rejected_response"] == []
        assert rec["instruction"] == INSTRUCTIONS["retrieval"]
        assert rec["query"] == "what is known about " + " ".join(by_id[m["passage_id"]].text.split()[:3])
        assert m["task"] == "retrieval" and m["generator"] == "scripted" and m["prompt_version"] == PROMPT_VERSION
        assert m["seed"] == cfg.seed and m["language"] == "English" and m["length"] in cfg.query_lengths
        assert m["question_type"] in QUESTION_TYPES and m["difficulty"] in DIFFICULTIES
    p5 = next(r for r in accepted if r["meta"]["passage_id"] == "p5")["meta"]  # lenient: by number, aliases
    assert (p5["persona"], p5["question_type"], p5["difficulty"]) == (tops[0][1], "yes_or_no", "university")
    assert next(r for r in accepted if r["meta"]["passage_id"] == "p6")["meta"]["llm_calls"] == 3  # one retry

    stats = json.loads((out / "stats.json").read_text())
    assert stats == res.stats
    assert (stats["accepted"], stats["rejected"], stats["acceptance_rate"]) == (4, 4, 0.5)
    assert stats["by_kind"] == {"retrieval": {"accepted": 4, "rejected": 4}}
    assert stats["rejection_reasons"]["configuration/no_json"] == 1 and stats["run"]["shards_generated"] == 4
    assert sum(stats["by_question_type"].values()) == 4 and stats["by_difficulty"]["high_school"] == 3

    # the folder remembers what made it: other settings are refused, the same ones reuse every shard
    with pytest.raises(ValueError, match="other settings"):
        synthesize(cfg.model_copy(update={"seed": 1}), out, generator_factory=ScriptedGenerator, progress=False)
    again = synthesize(cfg, out, generator_factory=ScriptedGenerator, progress=False)
    assert again.stats["run"]["shards_generated"] == 0 and again.stats["accepted"] == 4

    # synth.reuse: a folder made with the same settings is copied, not generated, and the run says so
    reused = synthesize(cfg.model_copy(update={"reuse": str(out)}), tmp_path / "copy",
                        generator_factory=ScriptedGenerator, progress=False)
    assert reused.stats["run"]["shards_generated"] == 0 and reused.stats["run"]["reused_from"] == str(out)
    assert [f.read_bytes() for f in reused.shards] == [f.read_bytes() for f in res.shards]
    assert reused.stats["accepted"] == 4 and reused.stats["rejection_reasons"] == stats["rejection_reasons"]
    # ... and one made with other settings is not: the run generates its own
    other = synthesize(cfg.model_copy(update={"reuse": str(out), "seed": 1}), tmp_path / "other",
                       generator_factory=ScriptedGenerator, progress=False)
    assert other.stats["run"]["shards_generated"] == 4 and other.stats["run"]["reused_from"] is None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jsonl"))


def reporting_generator(folder: Path) -> ScriptedGenerator:
    """The scripted LLM, built in a Ray actor that first writes what it holds to `folder/<pid>.json`:
    the resources Ray assigned it, its torch threads and the CPUs of the Ray it runs on."""
    import ray
    import torch

    held = {"resources": ray.get_runtime_context().get_assigned_resources(),
            "threads": torch.get_num_threads(), "cluster_cpus": ray.cluster_resources().get("CPU")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}.json").write_text(json.dumps(held))
    return ScriptedGenerator()


def _held(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_synthesis_runs_the_pool_it_is_handed_on_either_engine(ray_session, shared_data, personas_file,
                                                                tmp_path):
    """The config asks for two actors; the placement decides: two actors of one CPU on the actor
    engine, one of two CPUs (the fixture's Ray has two) on Ray Data, and the files are the same."""
    cfg = synth_cfg(shared_data, personas_file, workers=2, kinds={"sts": 1, "classification": 1})
    for engine, placement in (("actors", Placement(actors=2, cpus=1.0)),
                              ("ray_data", Placement(actors=1, cpus=2.0))):
        factory = functools.partial(reporting_generator, tmp_path / f"held-{engine}")
        res = synthesize(cfg.model_copy(update={"engine": engine}), tmp_path / engine, placement=placement,
                         generator_factory=factory, progress=False)
        actors = _held(tmp_path / f"held-{engine}")
        assert len(actors) == placement.actors == res.stats["run"]["workers"], engine
        assert all(a["resources"].get("CPU") == placement.cpus and not a["resources"].get("GPU")
                   and a["threads"] == placement.threads for a in actors), (engine, actors)
        assert res.stats["run"]["shards_generated"] == 4
    names = _files(tmp_path / "actors")
    assert names == _files(tmp_path / "ray_data") and len(names) == 8
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "actors", tmp_path / "ray_data", names, shallow=False)
    assert not mismatch and not errors


@pytest.mark.slow  # starts an interpreter, and a Ray instance in it
def test_synthesize_called_as_a_library_with_no_ray_up_starts_one_for_the_call(shared_data, personas_file,
                                                                               tmp_path):
    """No placement and no Ray: the config's own request (two actors of one CPU) on a local Ray of
    those two CPUs, started for the call and shut down after it."""
    root = Path(__file__).resolve().parent.parent
    script = textwrap.dedent(f"""
        import functools, json, sys
        from pathlib import Path
        import ray
        from tasks.synthesis.run import synthesize
        from tests.configs import synth_cfg
        from tests.test_synthesize import reporting_generator
        cfg = synth_cfg(Path({str(shared_data)!r}), Path({str(personas_file)!r}), workers=2,
                        kinds={{"sts": 1, "classification": 1}})
        before = ray.is_initialized()
        factory = functools.partial(reporting_generator, Path({str(tmp_path / "held")!r}))
        res = synthesize(cfg, {str(tmp_path / "synth")!r}, progress=False, generator_factory=factory)
        print("RESULT " + json.dumps({{"before": before, "after": ray.is_initialized(),
                                      "workers": res.stats["run"]["workers"]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.split("RESULT ", 1)[1]) == {"before": False, "after": False, "workers": 2}
    actors = _held(tmp_path / "held")
    assert len(actors) == 2
    assert all(a["resources"].get("CPU") == 1.0 and a["cluster_cpus"] == 2.0 for a in actors), actors
    assert len(_files(tmp_path / "synth")) == 8


@pytest.mark.slow
def test_micro_generator_end_to_end_and_resume_equals_uninterrupted(ray_session, shared_data, personas_file,
                                                                     tmp_path):
    cfg = synth_cfg(shared_data, personas_file, workers=2, generator={"max_new_tokens": 16},
                    kinds={"retrieval": 2, "bitext": 1, "sts": 1, "classification": 1})
    full = synthesize(cfg, tmp_path / "full", progress=False)  # the real micro LM: garbage, mostly rejected
    assert len(full.shards) == 4 and full.stats["passages"] == 8
    assert full.stats["generator"] == "micro" and full.stats["llm_calls"] >= 8
    rejected = [json.loads(line) for f in sorted((tmp_path / "full" / "rejected").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    assert rejected and all(r["reason"].split("/")[0] in ("configuration", "query", "translation", "sts",
                                                          "classification") for r in rejected)

    passages = load_passages(cfg.passages, limit=8)
    one = cfg.model_copy(update={"workers": 1})
    crash = functools.partial(CrashingGenerator, cfg.generator, passages[5].text[:60])
    with pytest.raises(GeneratorError, match="simulated crash"):
        synthesize(one, tmp_path / "resumed", generator_factory=crash, progress=False)
    assert _files(tmp_path / "resumed") == ["rejected/rejected-00000.jsonl", "rejected/rejected-00001.jsonl",
                                            "shard-00000.jsonl", "shard-00001.jsonl"]
    resumed = synthesize(one, tmp_path / "resumed", progress=False)
    assert resumed.stats["run"]["shards_generated"] == 2 and resumed.stats["run"]["shards_reused"] == 2

    names = _files(tmp_path / "full")
    assert names == _files(tmp_path / "resumed") and len(names) == 8
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "full", tmp_path / "resumed", names, shallow=False)
    assert not mismatch and not errors
    assert {k: v for k, v in full.stats.items() if k != "run"} == {k: v for k, v in resumed.stats.items()
                                                                   if k != "run"}


# ----------------------------------------------------------------------------- the OpenAI-compatible backend

def _openai(server: FakeOpenAI, **kw) -> OpenAIGenerator:
    kw = {"api_key": Secret(KEY), "backoff_s": 0.01, "max_backoff_s": 0.05, "http_retries": 3} | kw
    return OpenAIGenerator(server.url, "qwen3-32b", **kw)


def _config_prompt() -> list[dict]:
    return configuration_prompt("Paris is the capital of France.", ["A tourist", "A geographer"], "English")


def test_openai_backend_requests_and_concurrency():
    with FakeOpenAI() as srv:
        srv.delay = 0.05
        gen = _openai(srv, concurrency=3)
        outs = gen.generate([_config_prompt()] * 7, seed=5, temperature=0.6, max_new_tokens=40)
    assert len(outs) == 7 and all(parse_json_answer(o)["Character"] == "A tourist" for o in outs)
    body = srv.requests[0]
    assert body["model"] == "qwen3-32b" and body["seed"] == 5 and body["max_tokens"] == 40
    assert body["temperature"] == 0.6 and body["messages"] == _config_prompt()
    assert 1 < srv.max_active <= 3


def test_openai_backend_honours_retry_after_and_retries_5xx():
    with FakeOpenAI() as srv:
        srv.script = [("status", 429, {"Retry-After": "1"}), ("status", 500), ("status", 503)]
        gen = _openai(srv, concurrency=1)
        t0 = time.monotonic()
        out = gen.generate([_config_prompt()], seed=0, temperature=0.0, max_new_tokens=40)
    assert parse_json_answer(out[0])["Question_Type"] in QUESTION_TYPES
    assert len(srv.requests) == 4 and gen.requests == 4
    assert srv.times[1] - srv.times[0] >= 0.95  # waited for Retry-After, not the 0.01 s backoff
    assert time.monotonic() - t0 < 5


def test_openai_backend_gives_up_with_a_clear_error_and_never_shows_the_key(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI() as srv:
        srv.script = [("garbage",)] * 4
        with pytest.raises(GeneratorError, match=r"giving up after 4 attempts; last error: invalid response body"):
            _openai(srv).generate([_config_prompt()], seed=0, temperature=0.0, max_new_tokens=8)
        srv.script = [("echo_auth",)]
        with pytest.raises(GeneratorError, match="HTTP 401 .not retried.") as e:
            _openai(srv).generate([_config_prompt()], seed=0, temperature=0.0, max_new_tokens=8)
        assert KEY not in str(e.value) and "***" in str(e.value)
        gen = _openai(srv)
        assert KEY not in repr(gen) and KEY not in str(gen.__dict__.get("_key"))
    with pytest.raises(GeneratorError, match="connection error"):  # the server is gone
        _openai(srv, http_retries=1).generate([_config_prompt()], seed=0, temperature=0.0, max_new_tokens=8)
    captured = capfd.readouterr()
    assert KEY not in caplog.text and KEY not in captured.out + captured.err


def test_synthesize_through_an_openai_endpoint_all_task_kinds(ray_session, shared_data, personas_file, tmp_path,
                                                               monkeypatch, caplog, capfd):
    monkeypatch.setenv("Q3E_TEST_API_KEY", KEY)
    caplog.set_level(logging.INFO)
    with FakeOpenAI() as srv:
        cfg = synth_cfg(shared_data, personas_file, workers=1, shard_size=4, seed=3,  # seed 3: all four kinds
                        kinds={"retrieval": 1, "bitext": 1, "sts": 1, "classification": 1},
                        languages=["English", "German"],
                        generator={"backend": "openai", "model": "qwen3-32b", "base_url": srv.url,
                                   "api_key_env": "Q3E_TEST_API_KEY", "concurrency": 2, "backoff_s": 0.01})
        srv.script = [("status", 500), ("status", 429, {"Retry-After": "0"})]
        res = synthesize(cfg, tmp_path / "synth", progress=False)
    out = tmp_path / "synth"
    records = [json.loads(line) for s in res.shards for line in s.read_text().splitlines()]
    plans = {p.passage.id: p for p in (make_plan(x, cfg) for x in load_passages(cfg.passages, limit=8))}
    # every passage whose scripted answers are well-formed is accepted, whatever its task kind
    bad = {"p1", "p2", "p3", "p4"}
    assert sorted(r["meta"]["passage_id"] for r in records) == \
        sorted(i for i, p in plans.items() if p.kind != "retrieval" or i not in bad)
    assert {r["meta"]["task"] for r in records} == {"retrieval", "bitext", "sts", "classification"}
    assert res.stats["generator"] == "qwen3-32b"
    for r in records:
        m, plan = r["meta"], plans[r["meta"]["passage_id"]]
        assert m["task"] == plan.kind and r["instruction"] == INSTRUCTIONS[plan.kind]
        if plan.kind in ("bitext", "sts"):
            assert r.get("symmetric") is True and r["response"] in " ".join(plan.passage.text.split())
        if plan.kind == "bitext":
            assert m["language"] == plan.target_language and m["language"] != "English"
        if plan.kind == "classification":
            assert (r["query"], r["response"]) == (plan.passage.text, "arts and entertainment")
        if plan.kind == "retrieval":
            assert m["language"] == plan.language and r["response"] == plan.passage.text
    # the key went to the server (else 401s) but nowhere else
    assert all(path.read_bytes().find(KEY.encode()) < 0 for path in out.rglob("*") if path.is_file())
    captured = capfd.readouterr()
    assert KEY not in caplog.text and KEY not in captured.out + captured.err
