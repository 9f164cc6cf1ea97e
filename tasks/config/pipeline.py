"""The schema of the pipeline around training: synthesis, filtering, evaluation, data, infrastructure,
retraining, ablations, and `PipelineConfig`, the whole resolved configuration."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Strict, flatten
from tasks.config.training import MergeConfig, ModelConfig, Resources, Stage2Balance, TrainConfig


# ----------------------------------------------------------------------------- synthesis / filtering / eval

class GeneratorConfig(Strict):
    backend: Literal["transformers", "openai", "vllm"]
    model: str
    base_url: str | None
    api_key_env: str
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    max_retries: int = Field(ge=0)
    concurrency: int = Field(gt=0)
    timeout_s: float = Field(gt=0)
    http_retries: int = Field(ge=0, description="openai backend: retries of a request on connection errors, 429, 5xx")
    backoff_s: float = Field(ge=0, description="openai backend: first retry delay, doubled each retry")
    max_backoff_s: float = Field(ge=0)
    structured: bool = Field(description="structured decoding: every answer is constrained to its stage's JSON schema "
                          "(enums of the offered personas, question types, difficulties, labels; string "
                          "lengths and scripts): xgrammar for transformers, structured outputs for vllm, "
                          "response_format for openai. It replaces the JSON prefill")
    context_guidance: float = Field(ge=1, description="transformers backend: context-aware decoding of retrieval queries. Each "
                                    "token's log-probability is log p(t | prompt) + (g - 1) * (log p(t | prompt) - "
                                    "log p(t | prompt without its passage)), among the tokens within 10x of the most "
                                    "likely one: the query leans on what the passage says. 1 = plain sampling")
    json_prefill: bool | None = Field(description="start each answer with the JSON's first key (helps small models keep the format); "
                          "null = on for transformers and vllm when structured is off, off for openai (needs "
                          "a server that continues a final assistant message, e.g. vLLM)")
    chat_template_kwargs: dict[str, Any] = Field(description="variables of the model's chat template, e.g. {enable_thinking: false} for Qwen3 "
                        "(else its thinking fills max_new_tokens before the JSON); openai: sent as "
                        "chat_template_kwargs (vLLM, SGLang)")
    vllm_args: dict[str, Any] = Field(description="vllm backend: keyword arguments of vllm.LLM (tensor_parallel_size, "
                        "gpu_memory_utilization, max_model_len, ...); not in a synthesis folder's manifest")


class HubPassages(Strict):
    """A passage corpus on the hub, an entry of `synth.passages` beside passage files (the paper
    synthesises from Qwen3's multilingual pre-training corpus, which is not public). Its rows are
    streamed (`datasets.load_dataset(hub, config, split=..., streaming=True)`: never all in memory),
    through a seeded shuffle buffer when synth.passage_order is `sample`, until synth.num_passages
    (tasks/synthesis/plan.py)."""

    hub: str
    config: str | None = None
    split: str = "train"
    revision: str = "main"
    text_field: str = "text"
    title_field: str | None = Field(None, description="a column put before the text, as BEIR does")
    id_field: str = "id"
    language: str | None = Field(None, description="the language of every row (a name: English, Chinese); "
                                 "null = a row's own lang/language field, else guessed from its script")
    min_words: int = Field(0, ge=0, description="rows with fewer words are skipped (stubs, list pages)")
    max_words: int | None = Field(None, gt=0, description="a row's text is cut to its first N words "
                                  "(a Wikipedia row is a whole article); null = the whole row")
    shuffle_buffer: int = Field(1000, gt=0, description="rows held by the shuffle buffer (passage_order: sample)")
    local: str | None = Field(None, description="the offline stand-in: a passages JSONL (relative to the "
                              "project, like the passage files), read through the same streaming code; its "
                              "rows whose lang/language names another language than `language` are skipped")
    offline: bool = Field(False, description="read `local` instead of the hub (set on every entry by "
                          "data.catalog_offline; an entry without `local` then gives no passages)")

    @property
    def name(self) -> str:
        """`hub:config`, the passages' `source`."""
        return f"{self.hub}:{self.config}" if self.config else self.hub


class SynthConfig(Strict):
    enabled: bool
    passages: list[str | HubPassages] = Field(description="passage files (JSONL), or hub corpora "
                                               "({hub: NAME, config: ..., language: ...}, streamed)")
    personas: str
    persona_retriever: str
    top_personas: int = Field(gt=0)
    num_passages: int | None = Field(gt=0)
    passage_order: Literal["sample", "file"] = Field(description="sample: a seeded random sample of each "
                                                     "passages file; file: its first passages in file order")
    exclude_relevant: list[str] = Field(description="BEIR folders whose relevant documents (qrels) are never "
                                                        "used as passages: dev positives stay out of training")
    reuse: str | None = Field(description="a folder of shards made by `q3e synth` with these same settings "
                                                "(e.g. committed to git): the run copies it instead of generating; "
                                                "null = generate in the run")
    kinds: dict[str, float]
    languages: list[str] = Field(description="languages of the generated queries, drawn per "
                                                          "passage; 'passage' = the passage's own language")
    query_lengths: list[int]
    bitext_languages: list[str] = Field(description="bitext: target languages of the translations")
    sts_similarity: list[float] = Field(description="STS: target similarities (0-5) to ask for")
    labels: list[str] = Field(description="classification: the label set")
    max_passage_words: int = Field(gt=0, description="passages are cut to this many words in prompts")
    shard_size: int = Field(gt=0)
    engine: Literal["actors", "ray_data"] = Field(description="actors: a pool of Ray actors pulls shard after shard; ray_data: the plans are "
                              "a Ray Data dataset streamed through map_batches (same shards, same records)")
    workers: int = Field(gt=0)
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)
    seed: int
    generator: GeneratorConfig


class FilterConfig(Strict):
    enabled: bool
    threshold: float = Field(ge=-1, le=1)
    embedder: str | None = Field(description="model used to score pairs; null = the stage-1 model")
    round_trip_k: int | None = Field(ge=1, description="also keep a pair only if its document is in the "
                                     "scorer's top k for its query (tasks/filter.py); null = off")
    round_trip_pool: int = Field(gt=1, description="at most this many candidate documents for the round trip")
    batch_size: int = Field(gt=0)
    workers: int = Field(gt=0)
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)


class EvalConfig(Strict):
    """What to evaluate on: mteb task names / benchmarks (need the hub) and local sets (offline)."""

    tasks: list[str]
    task_dirs: list[str]
    sts: list[str]
    pairclf: list[str]
    max_pairs: int | None = Field(gt=0)
    benchmark: str | list[str] | None = Field(description="one mteb benchmark or a list of them; each "
                                              "gets its Mean(Task) and Mean(Type)")
    batch_size: int = Field(gt=0)
    rerank_top_k: int = Field(gt=0)
    rerank_types: list[Literal["Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"]] = Field(
        description="mteb task types the reranker reranks (every one is an mteb retrieval task)")
    first_stage: str | None = Field(description="a first-stage file (tasks/evaluation/first_stage.py): the "
                                    "reranker reranks its top-k instead of the embedder's")
    save_first_stage: bool = Field(description="write the embedder's top rerank_top_k per query next to "
                                   "the results (<results>.first_stage.json)")
    dims: list[int]
    symmetric: list[str]
    rerank_symmetric: bool = Field(description="the reranker scores a symmetric set's pair as the mean of "
                                   "its two orders")
    max_queries: int | None = Field(gt=0)
    max_corpus: int | None = Field(gt=0)
    max_query_length: int | None = Field(gt=1, description="tokens kept of a query; null = model.max_query_length")
    max_doc_length: int | None = Field(gt=1, description="tokens kept of a document; null = model.max_doc_length")
    max_rerank_length: int | None = Field(gt=16, description="tokens of a reranker input; null = "
                                          "model.max_rerank_length")
    autocast: Literal["auto", "bfloat16", "float16"] | None = Field(
        description="mixed precision of the evaluated embedder and reranker (torch.autocast around the "
                    "decoder, as model.autocast), whatever they were trained with; auto = bfloat16 where "
                    "the device has bf16 matrix instructions, else their own; null = their own model.autocast")
    resources: Resources

    KEY_NEUTRAL = {"autocast": None}

    @property
    def benchmarks(self) -> list[str]:
        """`benchmark` as a list (a single name, a list of names, or none)."""
        if self.benchmark is None:
            return []
        return [self.benchmark] if isinstance(self.benchmark, str) else list(self.benchmark)

    @field_validator("benchmark")
    @classmethod
    def _benchmark_names(cls, v: str | list[str] | None) -> str | list[str] | None:
        names = [v] if isinstance(v, str) else v or []
        if any(not n.strip() for n in names):
            raise ValueError("a benchmark name is empty")
        if len(set(names)) < len(names):
            raise ValueError(f"a benchmark is listed twice: {names}")
        return v

    @field_validator("dims")
    @classmethod
    def _positive_unique_dims(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):  # a negative d would keep emb[:, :d], all but the last |d| dims
            raise ValueError(f"MRL dims must be positive, got {v}")
        if len(set(v)) < len(v):
            raise ValueError(f"an MRL dim is listed twice: {v}")
        return v


class DerivedSet(Strict):
    """A data set built inside `data/` from a file already there (so it is versioned with it).
    - `sts_retrieval`: an STS TSV (columns split, score, sentence1, sentence2) as a BEIR folder:
      sentence1 of the pairs of `split` scored >= `min_score` as queries, all sentence2 of the
      split as the corpus;
    - `sts_pairs`: an STS TSV as training pairs (JSONL): pairs scored >= `min_score`, with the
      query's documents scored <= `max_negative_score` as hard negatives (fields named by
      `query_field`, `positive_field`, `score_field`; `split` null = every row)."""

    kind: Literal["sts_retrieval", "sts_pairs"] = "sts_retrieval"
    source: str
    out: str
    split: str | None = "dev"
    min_score: float = 4.0
    max_negative_score: float = 2.0
    query_field: str = "sentence1"
    positive_field: str = "sentence2"
    score_field: str = "score"


class DataConfig(Strict):
    """The versioned inputs: `dir` is tracked by `<dir>.dvc`; a fresh clone restores it with
    `dvc pull`, or copies `include` from the bundled `source` when no remote has it, then builds
    `derived` from what it copied."""

    dir: str
    source: str | None
    include: list[str]
    derived: list[DerivedSet]
    catalog_offline: bool = Field(description="every catalog source of the stages reads its entry's local "
                                  "stand-in (conf/catalog.yaml `local`) instead of the hub, and so does every "
                                  "hub corpus of synth.passages (its `local`)")


class InfraConfig(Strict):
    """Where the services live. Empty = embedded defaults (ephemeral Prefect, local Ray, local MLflow/DVC)."""

    ray_address: str | None
    ray_num_cpus: int | None = Field(gt=0)
    mlflow_tracking_uri: str | None
    mlflow_experiment: str
    prefect_api_url: str | None
    dvc_remote: str | None


class RetrainConfig(Strict):
    """Scheduled retraining: promote a new model only if it is not worse than the champion."""

    registered_model: str
    alias: str
    metric: str = Field(description="'mean' of the final main scores, or one task name")
    tolerance: float = Field(ge=0, description="promote if new >= champion - tolerance")


class AblationConfig(Strict):
    settings: list[str]


class PipelineConfig(Strict):
    preset: str
    ablation: str
    seed: int
    run_dir: str
    data: DataConfig
    model: ModelConfig
    reranker_model: ModelConfig | None = Field(description="backbone of the reranker; null = same as model")
    synth: SynthConfig
    stage1: TrainConfig
    filter: FilterConfig
    stage2: TrainConfig
    merge: MergeConfig
    stage2_balances: list[Stage2Balance] = Field(description="train stage 2 once per balance and merge "
                                                 "their finals; empty = one stage 2 with stage2.sampling")
    reranker: TrainConfig
    reranker_merge: MergeConfig
    eval: EvalConfig
    ablations: AblationConfig
    retrain: RetrainConfig
    infra: InfraConfig

    @field_validator("stage2_balances")
    @classmethod
    def _distinct_balances_one_merge_weight_each(cls, v: list[Stage2Balance], info) -> list[Stage2Balance]:
        weights = [b.weights for b in v]
        twice = next((w for i, w in enumerate(weights) if w in weights[:i]), None)
        if twice is not None:  # one stage key, one folder: two runs would train into it at once
            raise ValueError(f"a balance is listed twice: {twice}")
        merge = info.data.get("merge")  # validated before this field (absent if it was invalid)
        if v and merge is not None and merge.weights is not None and len(merge.weights) != len(v):
            raise ValueError(f"merge.weights has {len(merge.weights)} entries, stage2_balances has {len(v)}: "
                             f"with stage2_balances the merge takes one final per balance")
        return v

    @model_validator(mode="after")
    def _catalog_offline(self) -> "PipelineConfig":
        if self.data.catalog_offline:
            for stage in (self.stage1, self.stage2, self.reranker):
                for src in stage.data:
                    if src.catalog is not None:
                        src.offline = True
            for passages in self.synth.passages:
                if isinstance(passages, HubPassages):
                    passages.offline = True
        return self

    @property
    def reranker_backbone(self) -> ModelConfig:
        return self.reranker_model or self.model

    def flat(self) -> dict[str, Any]:
        """`{"stage2.loss.temperature": 0.05, ...}`: the resolved config as MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
