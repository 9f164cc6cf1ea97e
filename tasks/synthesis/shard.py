"""One shard of synthesis, as a worker runs it: each passage's plan goes through the stages of its
task kind (prompt, answer, parse and check), a rejected answer is retried a bounded number of times,
and the result is the accepted pairs plus the rejected records with their reasons."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from tasks.config import SynthConfig
from tasks.data import Pair
from tasks.synthesis.generators import Generator, GeneratorError, Messages
from tasks.synthesis.parse import Reject, get_field, match_character, normalise_choice, parse_json_answer
from tasks.synthesis.plan import Plan
from tasks.synthesis.prompts import (
    CONFIGURATION_EXAMPLES, DIFFICULTIES, INSTRUCTIONS, PROMPT_VERSION, QUESTION_TYPES, SYMMETRIC, bitext_prompt,
    classification_prompt, configuration_prompt, query_prompt, sts_prompt,
)
from tasks.synthesis.schemas import (
    classification_schema, configuration_schema, query_schema, sts_schema, translation_schema,
)
from tasks.synthesis.text import check_text, lead_sentences, norm_text, truncate_words


@dataclass
class _Job:
    plan: Plan
    stage: int = 0
    attempt: int = 0
    calls: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    failure: tuple[str, str, str, str] | None = None  # stage, reason, detail, raw output
    done: bool = False


def _stages(kind: str) -> list[str]:
    return {"retrieval": ["configuration", "query"], "bitext": ["translation"], "sts": ["sts"],
            "classification": ["classification"]}[kind]


# Stages whose answer is written *about* the passage: with synth.generator.context_guidance > 1 they
# are decoded against the same prompt without it (the generator's `unconditional`).
GUIDED_STAGES = ("query",)


def _shuffled(p: Plan, cfg: SynthConfig, items: Sequence[Any]) -> list[Any]:
    """`items` in an order drawn from (seed, passage): the choices a prompt offers (the configuration
    examples, the labels) are shown in a different order for each passage. SmolLM2 answers with the
    last configuration example's Question_Type and Difficulty (yes_or_no for 79 % of the retrieval
    queries, high_school for 87 %, at a1-v3) and with the first label (54 of 58 classification pairs
    "arts and entertainment"): in a fixed order that position bias becomes the data's content."""
    out = list(items)
    random.Random(f"{cfg.seed}|{p.passage.source}|{p.passage.id}|order").shuffle(out)
    return out


def _prompt(job: _Job, stage: str, cfg: SynthConfig, prefill: bool, *, without_passage: bool = False) -> Messages:
    p = job.plan
    passage = "" if without_passage else truncate_words(p.passage.text, cfg.max_passage_words)
    if stage == "configuration":
        return configuration_prompt(passage, p.personas, p.passage.language, prefill=prefill,
                                    example_order=_shuffled(p, cfg, range(len(CONFIGURATION_EXAMPLES))))
    if stage == "query":
        f = job.fields
        return query_prompt(f["persona"], passage, f["question_type"], f["difficulty"], p.length,
                            corpus_language=p.passage.language, query_language=p.language, prefill=prefill)
    if stage == "translation":
        return bitext_prompt(lead_sentences(p.passage.text), p.passage.language, p.target_language or "",
                             prefill=prefill)
    if stage == "sts":
        return sts_prompt(lead_sentences(p.passage.text, max_words=30), p.similarity or 5.0, p.passage.language,
                          prefill=prefill)
    return classification_prompt(passage, _shuffled(p, cfg, cfg.labels), p.passage.language, prefill=prefill)


def _schema(job: _Job, stage: str, cfg: SynthConfig) -> dict[str, Any]:
    """The JSON schema of the answer `_prompt(job, stage, ...)` asks for."""
    p = job.plan
    if stage == "configuration":
        return configuration_schema(p.personas)
    if stage == "query":
        return query_schema(p.length, p.language)
    if stage == "translation":
        return translation_schema(p.target_language or "")
    if stage == "sts":
        return sts_schema(p.passage.language)
    return classification_schema(_shuffled(p, cfg, cfg.labels))


def _parse(job: _Job, stage: str, text: str, cfg: SynthConfig) -> dict[str, Any]:
    p = job.plan
    if stage == "configuration":
        obj = parse_json_answer(text, ("Character", "Question_Type", "Difficulty"))
        return {"persona": match_character(get_field(obj, "Character"), p.personas),
                "question_type": normalise_choice(get_field(obj, "Question_Type", "type", "questiontype"),
                                                  list(QUESTION_TYPES), "question_type"),
                "difficulty": normalise_choice(get_field(obj, "Difficulty"), list(DIFFICULTIES), "difficulty")}
    if stage == "query":
        obj = parse_json_answer(text, ("Query",))
        return {"query": check_text(get_field(obj, "Query", "question"), p.passage.text, language=p.language,
                                    length=p.length)}
    if stage == "translation":
        src = lead_sentences(p.passage.text)
        obj = parse_json_answer(text, ("Translation",))
        return {"query": check_text(get_field(obj, "Translation"), src, language=p.target_language or "",
                                    what="translation", min_ratio=0.3, max_ratio=3.0), "source": src}
    if stage == "sts":
        src = lead_sentences(p.passage.text, max_words=30)
        obj = parse_json_answer(text, ("Sentence",))
        return {"query": check_text(get_field(obj, "Sentence"), src, language=p.passage.language, what="sentence",
                                    min_ratio=0.3, max_ratio=3.0), "source": src}
    obj = parse_json_answer(text, ("Label", "Description"))
    label = get_field(obj, "Label", "category", "topic")
    if not isinstance(label, str):
        raise Reject("invalid_label", repr(label)[:60])
    return {"label": normalise_label(label, cfg.labels), "description": str(obj.get("Description") or "")[:300]}


def normalise_label(value: str, labels: Sequence[str]) -> str:
    key = norm_text(value)
    for lab in labels:
        if key == norm_text(lab):
            return lab
    hits = [lab for lab in labels if norm_text(lab) and norm_text(lab) in key]
    if len(hits) == 1:
        return hits[0]
    raise Reject("invalid_label", value[:60])


def _meta(job: _Job, cfg: SynthConfig, generator_name: str, shard: int) -> dict[str, Any]:
    p, f = job.plan, job.fields
    return {
        "task": p.kind, "persona": f.get("persona"), "question_type": f.get("question_type"),
        "difficulty": f.get("difficulty"), "language": p.target_language if p.kind == "bitext" else p.language,
        "passage_language": p.passage.language, "length": p.length if p.kind == "retrieval" else None,
        "similarity": p.similarity if p.kind == "sts" else None, "label": f.get("label"),
        "generator": generator_name, "prompt_version": PROMPT_VERSION, "seed": cfg.seed,
        "passage_id": p.passage.id, "source": p.passage.source, "shard": shard, "llm_calls": job.calls,
    }


def _record(job: _Job, cfg: SynthConfig, generator_name: str, shard: int) -> dict[str, Any]:
    kind, f, text = job.plan.kind, job.fields, job.plan.passage.text
    query, positive = {
        "retrieval": (f.get("query"), text),
        "bitext": (f.get("query"), f.get("source")),
        "sts": (f.get("query"), f.get("source")),
        "classification": (text, f.get("label")),
    }[kind]
    return Pair(query, positive, (), INSTRUCTIONS[kind], kind in SYMMETRIC,
                _meta(job, cfg, generator_name, shard)).to_record()


def _round_seed(seed: int, shard: int, rnd: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{shard}|{rnd}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def synthesize_shard(generator: Generator, plans: Sequence[Plan], cfg: SynthConfig, shard: int, *,
                     prefill: bool = False) -> tuple[list[dict], list[dict]]:
    """(accepted records, rejected records) for one shard. All pending prompts of a round go to the
    generator in one call (it batches them); a rejected answer is retried next round with that
    round's seed, at most `generator.max_retries` times per stage."""
    jobs = [_Job(p) for p in plans]
    gcfg = cfg.generator
    for rnd in range(10_000):
        active = [j for j in jobs if not j.done]
        if not active:
            break
        prompts = [_prompt(j, _stages(j.plan.kind)[j.stage], cfg, prefill) for j in active]
        schemas = ([_schema(j, _stages(j.plan.kind)[j.stage], cfg) for j in active]
                   if gcfg.structured else None)
        guide = {}
        if gcfg.context_guidance > 1:
            guide["unconditional"] = [
                _prompt(j, stage, cfg, prefill, without_passage=True) if stage in GUIDED_STAGES else None
                for j, stage in ((j, _stages(j.plan.kind)[j.stage]) for j in active)]
        texts = generator.generate(prompts, seed=_round_seed(cfg.seed, shard, rnd), temperature=gcfg.temperature,
                                   max_new_tokens=gcfg.max_new_tokens, schemas=schemas, **guide)
        if len(texts) != len(prompts):
            raise GeneratorError(f"generator {generator.name!r} returned {len(texts)} answers for {len(prompts)} prompts")
        for job, text in zip(active, texts):
            stage = _stages(job.plan.kind)[job.stage]
            job.calls += 1
            try:
                job.fields.update(_parse(job, stage, text, cfg))
            except Reject as r:
                job.attempt += 1
                job.failure = (stage, r.code, r.detail, text if isinstance(text, str) else repr(text))
                if job.attempt > gcfg.max_retries:
                    job.done = True
                continue
            job.stage, job.attempt, job.failure = job.stage + 1, 0, None
            job.done = job.stage == len(_stages(job.plan.kind))
    accepted, rejected = [], []
    name = getattr(generator, "name", type(generator).__name__)
    for job in jobs:
        if job.failure is None:
            accepted.append(_record(job, cfg, name, shard))
        else:
            stage, code, detail, raw = job.failure
            rejected.append({"passage_id": job.plan.passage.id, "task": job.plan.kind, "stage": stage,
                             "reason": f"{stage}/{code}", "detail": detail, "output": raw[:1000],
                             "meta": _meta(job, cfg, name, shard)})
    return accepted, rejected
