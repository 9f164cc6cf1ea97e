"""LLM backends for data synthesis, behind one small protocol:

    generate(prompts: list[list[dict]], *, seed, temperature, max_new_tokens,
             schemas: list[dict | None] | None = None,
             unconditional: list[list[dict] | None] | None = None) -> list[str]

`prompts` are chat conversations (`[{"role": "system"|"user"|"assistant", "content": ...}, ...]`);
the result has one completion per conversation, in order. A conversation that ends with an
assistant message is a *prefill*: the model continues that message and the completion returned
includes it (`{"Query": "` + what the model wrote). A prefill that opens a JSON object also stops
generation once the object is closed.

`schemas[i]`, when given, is a JSON schema that completion i must follow (structured decoding: the
decoder only samples tokens that keep the text a prefix of a valid instance, then stops). It fixes
the format, not the content. A constrained conversation has no prefill: the grammar writes the
opening of the object itself and must see all of it.

`unconditional[i]`, when given, is conversation i without its context (the passage a query is
written for). A backend built with `context_guidance` g > 1 then decodes against it (context-aware
decoding): each token's log-probability becomes log p(t | prompt) + (g - 1) * (log p(t | prompt) -
log p(t | unconditional)), among the tokens at least a tenth as likely as the most likely one. A
small model that would write a generic query for its persona writes one about the passage (SmolLM2:
median all-MiniLM-L6-v2 cosine of English query and passage 0.130 -> 0.517 at g = 2, docs/synthesis.md).
Three backends:

- `TransformersGenerator`: a local causal LM (default: the bundled SmolLM2-135M-Instruct), chat
  template, batched left-padded sampling; the seed makes a call reproducible. Schemas are compiled
  to grammars by xgrammar and applied as a logits processor; context guidance is another one
  (`ContextGuidance`).
- `VLLMGenerator`: the same prompts through vLLM's offline engine on the worker's GPU(s); schemas
  go to vLLM's structured outputs.
- `OpenAIGenerator` (openai_server.py): any OpenAI-compatible server (`POST {base_url}/chat/completions`: vLLM, SGLang,
  llama.cpp server, OpenAI, ...) with bounded concurrency and retries; schemas are sent as
  `response_format` (`json_schema`, strict).

Both are built once per Ray worker by `build_generator`; they hold no orchestration.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Protocol, runtime_checkable

from tasks.config import GeneratorConfig

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Schemas = list[dict | None] | None


class GeneratorError(RuntimeError):
    """The LLM backend failed (not a bad completion: those are rejected samples, not errors)."""


@runtime_checkable
class Generator(Protocol):
    name: str  # recorded in every synthetic pair's provenance

    def generate(self, prompts: list[Messages], *, seed: int, temperature: float,
                 max_new_tokens: int, schemas: Schemas = None) -> list[str]: ...
    # A backend with context guidance (TransformersGenerator) also takes `unconditional=`.


class Secret:
    """A credential that never shows in reprs, logs or exception messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value or None

    def get(self) -> str | None:
        return self._value

    def __bool__(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    @classmethod
    def from_env(cls, name: str) -> "Secret":
        return cls(os.environ.get(name))


# ----------------------------------------------------------------------------- local model

class TransformersGenerator:
    """A local causal LM through transformers. Prompts are rendered with the tokenizer's chat
    template and generated in length-sorted batches with left padding. The seed is set once per
    call, so the same prompts + seed + batch size give the same completions on the same machine."""

    def __init__(self, model: str = "bundled:smollm2", *, batch_size: int = 8, top_p: float = 0.95,
                 dtype: str = "auto", device: str | None = None, max_input_tokens: int = 4096,
                 min_prefix_tokens: int = 32, chat_template_kwargs: dict | None = None,
                 context_guidance: float = 1.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.config import ModelConfig
        from tasks.models import ModelLoadError, default_device, resolve_backbone, torch_dtype

        self.name = model
        self.batch_size = batch_size
        self.top_p = top_p
        if context_guidance < 1:
            raise ValueError(f"context_guidance must be >= 1 (1 = plain sampling), got {context_guidance}")
        self.context_guidance = context_guidance
        self.max_input_tokens = max_input_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.min_prefix_tokens = min_prefix_tokens  # shorter shared prefixes are not worth caching
        self._prefixes: dict[tuple[int, ...], Any] = {}  # shared prompt prefix (token ids) -> its KV cache
        self.device = torch.device(device) if device else default_device()
        path = resolve_backbone(ModelConfig(backbone=model))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype, self.device), use_safetensors=True).to(self.device).eval()
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot load generator model: {e}") from e
        if self.tokenizer.chat_template is None:
            raise ModelLoadError(f"{path}: tokenizer has no chat template; the generator needs an instruct model")
        self.tokenizer.padding_side = "left"
        # Keep the end of a too-long prompt: it holds the passage's tail and the assistant turn marker.
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # transformers >= 5.24 renamed `past_key_values` to `cache`
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        stops = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = sorted(i for i in stops if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id)
        self._compiler = None  # xgrammar.GrammarCompiler, made on the first schema
        self._grammars: dict[str, Any] = {}  # schema JSON -> compiled grammar

    def __repr__(self) -> str:
        return f"TransformersGenerator({self.name!r}, device={self.device})"

    def generate(self, prompts: list[Messages], *, seed: int, temperature: float,
                 max_new_tokens: int, schemas: Schemas = None,
                 unconditional: list[Messages | None] | None = None) -> list[str]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from tasks.models import batch_by_length

        schemas = check_schemas(prompts, schemas)
        grammars = [self._grammar(s) if s is not None else None for s in schemas]
        prefills = [prefill_of(m) for m in prompts]
        if unconditional is not None and len(unconditional) != len(prompts):
            raise ValueError(f"{len(unconditional)} unconditional prompts for {len(prompts)} prompts")
        guided = [self.context_guidance > 1 and unconditional is not None and unconditional[i] is not None
                  for i in range(len(prompts))]
        ids = self._tokenize(prompts, max_new_tokens)
        uids = self._tokenize([u if g else [] for u, g in zip(unconditional or [None] * len(prompts), guided)],
                              max_new_tokens) if any(guided) else None
        sample = temperature > 0
        gen_cfg = GenerationConfig(
            do_sample=sample, temperature=temperature if sample else None, top_p=self.top_p if sample else None,
            max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids)
        # Batches hold prompts of one template (same system turn: a long shared prefix whose keys and
        # values `_batch` computes once), and constrained and free prompts apart (a grammar constrains
        # every row of its batch).
        groups: dict[tuple[str, bool, bool], list[int]] = {}
        for i, m in enumerate(prompts):
            groups.setdefault((m[0]["content"] if m else "", grammars[i] is not None, guided[i]), []).append(i)
        batches = [[group[j] for j in b] for group in groups.values()
                   for b in batch_by_length([len(ids[i]) for i in group], self.batch_size)]
        out: list[str] = [""] * len(prompts)
        torch.manual_seed(seed)
        with torch.inference_mode():
            for batch in batches:
                input_ids, mask, cache = self._batch([ids[i] for i in batch])
                start = input_ids.shape[1]
                stop = None
                if any(prefills[i].lstrip().startswith("{") for i in batch):
                    stop = StoppingCriteriaList([_json_stop(self.tokenizer, [prefills[i] for i in batch], start)])
                processors = LogitsProcessorList()
                if grammars[batch[0]] is not None:
                    import xgrammar

                    # One grammar per row; the processor keeps per-row matcher state, so it is new per call.
                    processors.append(xgrammar.contrib.hf.LogitsProcessor([grammars[i] for i in batch]))
                if guided[batch[0]]:  # after the grammar: the guidance weighs only the tokens it allows
                    processors.append(ContextGuidance(self.model, *self._batch([uids[i] for i in batch]),
                                                      scale=self.context_guidance, cache_kw=self._cache_kw))
                kw = {self._cache_kw: cache} if cache is not None else {}
                gen = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg,
                                          stopping_criteria=stop, logits_processor=processors, **kw)
                for i, row in zip(batch, self.tokenizer.batch_decode(gen[:, start:], skip_special_tokens=True)):
                    out[i] = (prefills[i] + row).strip()
        return out

    def _tokenize(self, prompts: list[Messages], max_new_tokens: int) -> list[list[int]]:
        """Token ids of each conversation through the chat template (a prefill is continued, not
        closed), cut from the left to leave room for the answer inside the model's context."""
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=not p,
                                                    continue_final_message=bool(p), **self.chat_template_kwargs)
                 if m else "" for m, p in ((m, prefill_of(m)) for m in prompts)]
        limit = self.max_input_tokens
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context:
            limit = max(16, min(limit, context - max_new_tokens))
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit,
                              return_attention_mask=False)["input_ids"]

    def _grammar(self, schema: dict):
        """The xgrammar grammar of `schema` for this tokenizer, compiled once per distinct schema."""
        key = json.dumps(schema, ensure_ascii=False)  # not sorted: the order of properties is the answer's
        if key not in self._grammars:
            try:
                import xgrammar
                import xgrammar.contrib.hf  # noqa: F401 - the logits processor used in generate
            except ImportError as e:
                raise GeneratorError(
                    "structured decoding with the transformers backend needs xgrammar (`make venv` installs "
                    "it; by hand: pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi), or set "
                    "synth.generator.structured=false") from e
            if self._compiler is None:
                # vocab_size is the logits' width (it may exceed the tokenizer's by padding rows); the
                # grammar ends on the same stop tokens as generation.
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.model.config.vocab_size, stop_token_ids=self.stop_ids)
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # cached here, bounded
            if len(self._grammars) >= 1024:  # configuration schemas differ per passage: bound the cache
                self._grammars.clear()
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _batch(self, rows: list[list[int]]):
        """(input_ids, attention_mask, past_key_values) of a batch. Prompts built from one template
        share a long token prefix (the instructions and examples): its keys/values are computed once,
        kept for later batches of that template (a few templates at a time), and reused; each row is
        laid out as prefix + padding + own suffix (positions come from the mask, so the padding is
        invisible). On a CPU this cuts the prompt cost several times."""
        import copy

        import torch

        pad = self.tokenizer.pad_token_id
        n = _common_prefix(rows)
        n = min(n, min(len(r) for r in rows) - 1)  # every row keeps a token of its own to feed
        head = rows[0][:n]
        known = [p for p in self._prefixes
                 if self.min_prefix_tokens <= len(p) <= n and tuple(head[:len(p)]) == p]
        if known:  # a template prefix seen before (also serves a batch of one)
            prefix = max(known, key=len)
            self._prefixes[prefix] = self._prefixes.pop(prefix)  # most recently used last
        elif len(rows) > 1 and n >= self.min_prefix_tokens:
            from transformers import DynamicCache

            prefix = tuple(head)
            kv = DynamicCache(config=self.model.config)
            self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                       **{self._cache_kw: kv})
            if len(self._prefixes) >= 8:  # a few templates in use at a time: drop the least recently used
                del self._prefixes[next(iter(self._prefixes))]
            self._prefixes[prefix] = kv
        else:
            width = max(len(r) for r in rows)
            ids = [[pad] * (width - len(r)) + r for r in rows]
            mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
            return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), None
        n = len(prefix)
        cache = copy.deepcopy(self._prefixes[prefix])
        cache.batch_repeat_interleave(len(rows))
        tails = [r[n:] for r in rows]
        width = max(len(t) for t in tails)
        ids = [list(prefix) + [pad] * (width - len(t)) + t for t in tails]
        mask = [[1] * n + [0] * (width - len(t)) + [1] * len(t) for t in tails]
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device), cache


class ContextGuidance:
    """A logits processor for context-aware decoding (Shi et al. 2023, "Trusting Your Evidence"):
    it runs the model on the *unconditional* prompts (the same conversations without their passage)
    one token behind the conditional generation, on its own KV cache, and returns

        log p(t | prompt) + (scale - 1) * (log p(t | prompt) - log p(t | unconditional))

    for the tokens whose conditional probability is at least `plausibility` times the most likely
    one's (-inf for the rest, so that boosting never picks a token the prompt itself finds
    implausible). `input_ids`, `attention_mask` and `cache` are the unconditional batch as
    `TransformersGenerator._batch` lays it out (left padding; `cache` may already hold a shared
    prefix). Placed after a grammar's processor, it weighs only the tokens the grammar allows."""

    def __init__(self, model, input_ids, attention_mask, cache, *, scale: float, cache_kw: str,
                 plausibility: float = 0.1):
        self.model, self.scale, self.cache_kw, self.plausibility = model, scale, cache_kw, plausibility
        self.pending = input_ids[:, cache.get_seq_length():] if cache is not None else input_ids
        self.mask = attention_mask
        self.cache = cache

    def unconditional_logprobs(self, input_ids):
        """log p(next | unconditional prompt + the tokens generated so far), one row per sequence."""
        import torch
        from transformers import DynamicCache

        if self.pending is None:  # one new token since the last call
            ids = input_ids[:, -1:]
            self.mask = torch.cat([self.mask, self.mask.new_ones(ids.shape[0], 1)], dim=1)
        else:  # the first call: the whole prompt (past its cached prefix)
            ids, self.pending = self.pending, None
            if self.cache is None:
                self.cache = DynamicCache(config=self.model.config)
        # positions count real tokens only, as generate's are for the conditional rows
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: self.cache})
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def __call__(self, input_ids, scores):
        import math

        import torch

        uncond = self.unconditional_logprobs(input_ids)
        cond = torch.log_softmax(scores.float(), dim=-1)
        guided = cond + (self.scale - 1.0) * (cond - uncond)
        plausible = cond >= cond.max(dim=-1, keepdim=True).values + math.log(self.plausibility)
        return torch.where(plausible, guided, torch.full_like(guided, -math.inf)).to(scores.dtype)


def _common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def prefill_of(messages: Messages) -> str:
    """The content of a final assistant message (a prefill to continue), else ""."""
    return messages[-1]["content"] if messages and messages[-1].get("role") == "assistant" else ""


def check_schemas(prompts: list[Messages], schemas: Schemas) -> list[dict | None]:
    """One schema (or None) per prompt. A constrained prompt cannot have a prefill: the grammar
    starts at the answer's first character, so it would reject the continuation of one."""
    if schemas is None:
        return [None] * len(prompts)
    if len(schemas) != len(prompts):
        raise ValueError(f"{len(schemas)} schemas for {len(prompts)} prompts")
    for i, (m, s) in enumerate(zip(prompts, schemas)):
        if s is not None and prefill_of(m):
            raise ValueError(f"prompt {i} has both a schema and a prefill ({prefill_of(m)[:20]!r}); "
                             "structured decoding writes the whole answer")
    return list(schemas)


def json_object_closed(text: str) -> bool:
    """True once the first `{` of `text` has its matching `}` (braces counted, strings ignored:
    small models leave quotes unescaped, and braces inside the values are rare)."""
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                return True
    return False


def _json_stop(tokenizer, prefills: list[str], start: int):
    """A stopping criterion (built lazily: transformers is imported only by the local backend)
    that stops each row once its prefill + generated text has closed its JSON object."""
    import torch
    from transformers import StoppingCriteria

    class JsonClosed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            done = [p.lstrip().startswith("{") and json_object_closed(p + t) for p, t in zip(prefills, texts)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return JsonClosed()


# ----------------------------------------------------------------------------- vLLM on the worker's GPU

class VLLMGenerator:
    """Offline generation with vLLM (`pip install .[gpu]`), for GPU workers.

    Prompts are rendered with the tokenizer's chat template as in TransformersGenerator, cut from
    the left to fit the context, and handed to vLLM in one call: its scheduler batches them
    continuously. Every request carries the call's seed, so a completion depends on its prompt and
    the seed, not on the other prompts of the call. `engine_args` go to `vllm.LLM`
    (tensor_parallel_size, gpu_memory_utilization, max_model_len, ...)."""

    def __init__(self, model: str = "bundled:smollm2", *, top_p: float = 0.95, max_input_tokens: int = 4096,
                 chat_template_kwargs: dict | None = None, **engine_args):
        try:
            import vllm
        except ImportError as e:
            raise GeneratorError("synth.generator.backend 'vllm' needs the vllm package, which is not "
                                 "installed here: pip install '.[gpu]' on the GPU workers (or use the "
                                 "'openai' backend against a served model)") from e
        from tasks.config import ModelConfig
        from tasks.models import resolve_backbone

        self.name = model
        self.top_p = top_p
        self.max_input_tokens = max_input_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.llm = vllm.LLM(model=resolve_backbone(ModelConfig(backbone=model)), **engine_args)
        self.tokenizer = self.llm.get_tokenizer()

    def __repr__(self) -> str:
        return f"VLLMGenerator({self.name!r})"

    def generate(self, prompts: list[Messages], *, seed: int, temperature: float,
                 max_new_tokens: int, schemas: Schemas = None) -> list[str]:
        from vllm import SamplingParams

        schemas = check_schemas(prompts, schemas)
        context = self.llm.llm_engine.model_config.max_model_len
        limit = max(16, min(self.max_input_tokens, context - max_new_tokens))  # room for the answer
        prefills = [prefill_of(m) for m in prompts]
        requests, params = [], []
        for m, prefill, schema in zip(prompts, prefills, schemas):
            text = self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=not prefill,
                                                      continue_final_message=bool(prefill),
                                                      **self.chat_template_kwargs)
            # Keep the end of a too-long prompt: it holds the passage's tail and the assistant turn marker.
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            requests.append({"prompt_token_ids": ids[-limit:]})
            # A prefill opens a flat JSON object: its first `}` closes it (vLLM has no stopping callback).
            stop = ["}"] if prefill.lstrip().startswith("{") else None
            constraint = vllm_json_constraint(schema) if schema is not None else {}
            params.append(SamplingParams(temperature=temperature, top_p=self.top_p, max_tokens=max_new_tokens,
                                         seed=seed, stop=stop, include_stop_str_in_output=True, **constraint))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [(prefill + out.outputs[0].text).strip() for prefill, out in zip(prefills, outs)]


def vllm_json_constraint(schema: dict) -> dict[str, Any]:
    """The SamplingParams keyword that constrains a request to `schema`: `structured_outputs` in
    current vLLM, `guided_decoding` in the versions before it (that field was removed in 0.12)."""
    import importlib

    params = importlib.import_module("vllm.sampling_params")
    if hasattr(params, "StructuredOutputsParams"):
        return {"structured_outputs": params.StructuredOutputsParams(json=schema)}
    return {"guided_decoding": params.GuidedDecodingParams(json=schema)}


# ----------------------------------------------------------------------------- factory

def build_generator(cfg: GeneratorConfig, *, api_key: Secret | None = None) -> Generator:
    """The backend `cfg` names. Called once per Ray worker."""
    template = cfg.chat_template_kwargs
    if cfg.backend == "transformers":
        return TransformersGenerator(cfg.model, batch_size=cfg.batch_size, top_p=cfg.top_p,
                                     chat_template_kwargs=template, context_guidance=cfg.context_guidance)
    if cfg.backend == "vllm":
        return VLLMGenerator(cfg.model, top_p=cfg.top_p, chat_template_kwargs=template, **cfg.vllm_args)
    from tasks.synthesis.openai_server import OpenAIGenerator

    return OpenAIGenerator(cfg.base_url or "", cfg.model, api_key=api_key, api_key_env=cfg.api_key_env,
                           top_p=cfg.top_p, concurrency=cfg.concurrency, http_retries=cfg.http_retries,
                           backoff_s=cfg.backoff_s, max_backoff_s=cfg.max_backoff_s, timeout_s=cfg.timeout_s,
                           chat_template_kwargs=template)
