"""The reranker (SPEC 1): pointwise yes/no scores from a causal LM's next-token logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tasks.config import LoraConfig, ModelConfig
from tasks.data import honour_umask
from tasks.diskspace import ensure_free_space
from tasks.losses import reranker_score
from tasks.models.backbone import autocast, load_wrapped, merged_backbone, single_token_id
from tasks.models.batching import TruncationLog, batch_by_length, pad_left, position_ids_from_mask
from tasks.models.prompts import RERANK_PREFIX, RERANK_SUFFIX, format_rerank_body
from tasks.models.saved_model import MODEL_CARD, export_cross_encoder, weights_bytes


class Reranker(nn.Module):
    """Pointwise yes/no reranker (SPEC 1): score = softmax(l_yes, l_no)[yes] at the last position."""

    def __init__(self, backbone: nn.Module, tokenizer, *, cfg: ModelConfig, source: str = ""):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.source = source
        self.yes_id = single_token_id(tokenizer, "yes", source)
        self.no_id = single_token_id(tokenizer, "no", source)
        end_id = tokenizer.convert_tokens_to_ids(cfg.end_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        self.prefix_ids = tokenizer.encode(RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(RERANK_SUFFIX, add_special_tokens=False)
        self.truncation = TruncationLog("model.max_rerank_length")

    @classmethod
    def load(cls, cfg: ModelConfig | str, *, device=None, lora: LoraConfig | None = None) -> "Reranker":
        """Load from a `ModelConfig` or a saved reranker folder (the causal LM keeps its LM head)."""
        return load_wrapped(cls, "AutoModelForCausalLM", cfg, device, lora)

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
        model = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        shared = self.cfg.share_rerank_prefix and self._split_prefix(input_ids, attention_mask)
        if self.cfg.autocast is None and not shared:
            position_ids = position_ids_from_mask(attention_mask)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                logits_to_keep=1)
            return out.logits[:, -1].float()
        # Mixed precision: the decoder under autocast, the LM head outside it. bf16 logits of ~10 are
        # 1/16 apart, and yes/no scores that coarse would tie documents the float32 head tells apart.
        with autocast(self.cfg, input_ids.device):
            if shared:
                hidden = self._hidden_after_shared_prefix(model.get_decoder(), *shared)
            else:
                hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        head = model.get_output_embeddings()
        return head(hidden[:, -1].to(head.weight.dtype)).float()

    def _split_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """(body ids, body mask) of a left-padded batch whose every row starts with the template's
        prefix, the prefix cut out of each row (the rows stay right-aligned); None for any other batch."""
        p = len(self.prefix_ids)
        width = input_ids.shape[1]
        real = mask.sum(1, keepdim=True)
        if width <= p or bool((real <= p).any()):
            return None
        start = width - real  # first real column of each row
        cols = torch.arange(p, device=input_ids.device)[None] + start
        prefix = torch.tensor(self.prefix_ids, device=input_ids.device)[None].expand(len(input_ids), p)
        if not (torch.equal(input_ids.gather(1, cols), prefix) and bool(mask.gather(1, cols).all())):
            return None
        j = torch.arange(width - p, device=input_ids.device)[None]
        src = j + p * (j >= start)  # skip each row's p prefix columns
        return input_ids.gather(1, src), mask.gather(1, src)

    def _hidden_after_shared_prefix(self, decoder, body: torch.Tensor, body_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states of prefix + body, the prefix run once (one row) and its keys
        and values repeated over the batch: every row attends to the same prefix at positions 0..p-1,
        then to its own tokens at p.., as in the full left-padded pass (the same logits to float
        rounding). The system prompt is 39 of the ~96 tokens of an STS-B pair on SmolLM2."""
        p = len(self.prefix_ids)
        prefix = torch.tensor([self.prefix_ids], device=body.device)
        out = decoder(input_ids=prefix, use_cache=True)
        cache_arg = "cache" if "cache" in type(out).__dataclass_fields__ else "past_key_values"  # transformers 5 / 4
        cache = getattr(out, cache_arg)
        cache.batch_repeat_interleave(len(body))
        mask = torch.cat([body_mask.new_ones(len(body), p), body_mask], 1)
        return decoder(input_ids=body, attention_mask=mask, position_ids=p + position_ids_from_mask(body_mask),
                       use_cache=True, **{cache_arg: cache}).last_hidden_state

    @torch.inference_mode()
    def score(self, queries: Sequence[str], documents: Sequence[str], *, instruction: str | None = None,
              batch_size: int = 16, show_progress: bool = False, max_length: int | None = None) -> np.ndarray:
        """Relevance in (0, 1) of each (query, document); inputs cut to max_length tokens (None =
        model.max_rerank_length)."""
        from tqdm.auto import tqdm

        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        was_training = self.training
        self.eval()
        ids = self.token_ids(queries, documents, instruction, max_length)
        out = np.zeros(len(ids), dtype=np.float32)
        for batch in tqdm(batch_by_length([len(x) for x in ids], batch_size), disable=not show_progress,
                          desc="rerank", unit="batch"):
            input_ids, mask = pad_left([ids[i] for i in batch], self.pad_id, self.device)
            out[batch] = reranker_score(self(input_ids, mask), self.yes_id, self.no_id).cpu().numpy()
        self.train(was_training)
        return out

    def save(self, path: str | Path, *, cross_encoder: bool = True, extra: dict | None = None) -> Path:
        """Safetensors causal-LM folder + q3e.json; plus `cross-encoder/`, a 1-logit sequence
        classifier (weight = W_yes - W_no, so sigmoid(logit) = the yes/no softmax) that
        `sentence_transformers.CrossEncoder` loads and that gives the same scores."""
        path = Path(path)
        ensure_free_space(path, weights_bytes(self.backbone) * (2 if cross_encoder else 1), "saving the reranker")
        path.mkdir(parents=True, exist_ok=True)
        merged = merged_backbone(self.backbone)
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
