"""The embedding model (SPEC 1): decoder LM -> L2-normalised last-token embedding, MRL-truncatable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import LoraConfig, ModelConfig
from tasks.data import honour_umask
from tasks.diskspace import ensure_free_space
from tasks.losses import truncate_normalize
from tasks.models.backbone import ModelLoadError, autocast, load_wrapped, merged_backbone, single_token_id
from tasks.models.batching import TruncationLog, batch_by_length, pad_left, position_ids_from_mask
from tasks.models.prompts import format_query
from tasks.models.saved_model import MODEL_CARD, weights_bytes, write_sentence_transformers_files


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
        self.end_id = single_token_id(tokenizer, cfg.end_token, source)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.truncation = TruncationLog("model.max_query_length / model.max_doc_length")
        if cfg.embedding_dim is not None and cfg.embedding_dim > self.hidden_size:
            raise ModelLoadError(f"{source}: model.embedding_dim {cfg.embedding_dim} is larger than the "
                                 f"model's hidden size {self.hidden_size}")

    @classmethod
    def load(cls, cfg: ModelConfig | str, *, device=None, lora: LoraConfig | None = None) -> "Embedder":
        """Load from a `ModelConfig` or from a path saved by `save` (its q3e.json restores the settings)."""
        return load_wrapped(cls, "AutoModel", cfg, device, lora)

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
        ids, mask = pad_left(self.token_ids(texts, max_length), self.pad_id, self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, input_ids.device):  # the final norm's output stays in the weights' dtype
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
            input_ids, mask = pad_left([ids[i] for i in batch], self.pad_id, self.device)
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
        ensure_free_space(path, weights_bytes(self.backbone), "saving the model")
        path.mkdir(parents=True, exist_ok=True)
        merged_backbone(self.backbone).save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        card = {"kind": "embedding", "model": self.cfg.model_dump(mode="json") | {"backbone": str(path),
                                                                                "gguf_file": None}}
        (path / MODEL_CARD).write_text(json.dumps(card | (extra or {}), indent=2))
        if sentence_transformers:
            write_sentence_transformers_files(path, self.cfg, self.hidden_size)
        honour_umask(path)
        return path
