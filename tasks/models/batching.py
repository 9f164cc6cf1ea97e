"""Length bucketing shared by the embedder, the reranker and the trainers: length-sorted batches,
left padding with its position ids, and the count of texts cut to a maximum length."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)


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


def batch_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut into batches: least padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, W] ids, [B, W] attention mask) with each sequence right-aligned: the last real token of
    every row sits at position -1, where the models read it."""
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
