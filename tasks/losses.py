"""Losses of the Qwen3-Embedding recipe (arXiv 2506.05176), as plain functions of tensors.

- `improved_infonce`: the embedding loss, paper eq. 1 (InfoNCE with hard negatives, in-batch
  query-query / document-document / query-document terms and a false-negative mask).
- `mrl_infonce`: the same loss summed over Matryoshka prefixes.
- `reranker_sft_loss`: the reranker loss, paper eq. 2 (-log p("yes"/"no" | prompt)).
- `reranker_score`: the reranker's relevance score, exp(l_yes) / (exp(l_yes) + exp(l_no)).

No data loading, no training loop, no orchestration here: the trainer calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "improved_infonce",
    "mrl_infonce",
    "truncate_normalize",
    "reranker_sft_loss",
    "reranker_score",
]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the math runs in: the inputs' common float dtype, lifted to float32 for half types
    (exp/logsumexp over logits of magnitude 1/tau ~ 50 lose too much in 8 mantissa bits)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"expected floating point tensors, got dtype {dtype}")
    return torch.float32 if dtype in _HALF else dtype


def improved_infonce(
    q: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    temperature: float,
    margin: float = 0.1,
    same_pos: Tensor | None = None,
    neg_mask: Tensor | None = None,
    qq: bool = True,
    dd: bool = True,
    qd: bool = True,
    mask_false_negatives: bool = True,
) -> Tensor:
    """Improved InfoNCE of Qwen3-Embedding (paper eq. 1), mean over the batch.

        L   = -(1/N) sum_i log( exp(s(q_i, d_i+)/tau) / Z_i )
        Z_i = exp(s(q_i, d_i+)/tau)
            + sum_k    m_ik exp(s(q_i,  d_ik-)/tau)   hard negatives          (neg is not None)
            + sum_j!=i m_ij exp(s(q_i,  q_j)/tau)     other queries           (qq)
            + sum_j!=i m_ij exp(s(d_i+, d_j)/tau)     positive vs other docs  (dd)
            + sum_j!=i m_ij exp(s(q_i,  d_j)/tau)     query vs other docs     (qd)

    d_j are the other items' positives. s is the dot product, which is the cosine because all
    inputs must already be L2-normalised (this function does not normalise them).

    False-negative mask (only if `mask_false_negatives`): m = 0 when that term's cosine
    s > s(q_i, d_i+) + margin (raw cosine, before /tau, computed from detached values so the
    threshold carries no gradient), or, for the three in-batch terms, when same_pos[i, j]
    (d_j is the same text as d_i+); else m = 1. With `mask_false_negatives=False` only the
    j != i exclusion and the `neg_mask` padding apply (same_pos and margin are ignored).

    Implementation: one [N, 1 + K + 3N] logits matrix (positive in column 0, disabled blocks
    left out), masked entries set to -inf, loss = logsumexp(row) - row[0] (cross entropy with
    target column 0). Column 0 is never masked, so every row stays finite.

    Args:
        q: [N, D] query embeddings, L2-normalised.
        pos: [N, D] positive document embeddings, L2-normalised.
        neg: [N, K, D] hard negative embeddings, L2-normalised, or None (K may be 0).
        temperature: tau > 0.
        margin: cosine margin of the false-negative threshold (paper / reference code: 0.1).
        same_pos: [N, N] bool, True where item j's positive is the same text as item i's
            (the diagonal may be True; it is excluded anyway).
        neg_mask: [N, K] bool, True where a hard-negative slot is real; False slots (padding
            for items with fewer than K negatives) never enter Z. Requires `neg`.
        qq, dd, qd: switch the three in-batch terms on or off (ablations).
        mask_false_negatives: apply the false-negative mask m.

    Returns:
        Scalar loss, in the inputs' dtype (float32 if the inputs are float16/bfloat16).
    """
    if q.ndim != 2:
        raise ValueError(f"q must be [N, D], got shape {tuple(q.shape)}")
    n, d = q.shape
    if n == 0:
        raise ValueError("q is an empty batch (N = 0)")
    if pos.shape != q.shape:
        raise ValueError(f"pos must have the shape of q {tuple(q.shape)}, got {tuple(pos.shape)}")
    if neg is not None and (neg.ndim != 3 or neg.shape[0] != n or neg.shape[2] != d):
        raise ValueError(f"neg must be [N={n}, K, D={d}], got shape {tuple(neg.shape)}")
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if same_pos is not None and tuple(same_pos.shape) != (n, n):
        raise ValueError(f"same_pos must be [N, N] = [{n}, {n}], got shape {tuple(same_pos.shape)}")
    if neg_mask is not None:
        if neg is None:
            raise ValueError("neg_mask was given but neg is None")
        if tuple(neg_mask.shape) != tuple(neg.shape[:2]):
            raise ValueError(
                f"neg_mask must be [N, K] = {list(neg.shape[:2])}, got shape {tuple(neg_mask.shape)}"
            )

    dtype = _compute_dtype(q, pos) if neg is None else _compute_dtype(q, pos, neg)
    q, pos = q.to(dtype), pos.to(dtype)
    device = q.device

    s_pos = (q * pos).sum(-1)  # [N]
    # m = 0 above this cosine; detached so the mask is a constant for autograd.
    threshold = (s_pos.detach() + margin).unsqueeze(1)  # [N, 1]
    blocks: list[Tensor] = [s_pos.unsqueeze(1)]  # column 0: the positive
    masks: list[Tensor] = [torch.ones(n, 1, dtype=torch.bool, device=device)]  # True = keep

    if neg is not None:
        s_neg = torch.einsum("nd,nkd->nk", q, neg.to(dtype))  # [N, K]
        keep = torch.ones_like(s_neg, dtype=torch.bool)
        if neg_mask is not None:
            keep &= neg_mask.to(device=device, dtype=torch.bool)
        if mask_false_negatives:
            keep &= ~(s_neg.detach() > threshold)
        blocks.append(s_neg)
        masks.append(keep)

    if qq or dd or qd:
        keep_batch = ~torch.eye(n, dtype=torch.bool, device=device)  # j != i
        if mask_false_negatives and same_pos is not None:
            keep_batch &= ~same_pos.to(device=device, dtype=torch.bool)
        for enabled, s in ((qq, q @ q.T), (dd, pos @ pos.T), (qd, q @ pos.T)):
            if not enabled:
                continue
            keep = keep_batch
            if mask_false_negatives:
                keep = keep & ~(s.detach() > threshold)
            blocks.append(s)
            masks.append(keep)

    logits = torch.cat(blocks, dim=1) / temperature  # [N, 1 + K + 3N] at most
    logits = logits.masked_fill(~torch.cat(masks, dim=1), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def truncate_normalize(x: Tensor, dim: int) -> Tensor:
    """Matryoshka prefix: the first `dim` entries of the last axis, L2-normalised again.

    x: [..., D] -> [..., dim], 1 <= dim <= D.
    """
    if not 1 <= dim <= x.shape[-1]:
        raise ValueError(f"MRL dim must be in [1, {x.shape[-1]}], got {dim}")
    return F.normalize(x[..., :dim], p=2, dim=-1)


def mrl_infonce(
    q: Tensor, pos: Tensor, neg: Tensor | None = None, *, dims: Sequence[int], **kwargs
) -> Tensor:
    """Matryoshka (MRL) improved InfoNCE: sum_{k in dims} improved_infonce on the k-dim prefixes.

        L_MRL = sum_{k in dims} L( norm(q[:, :k]), norm(pos[:, :k]), norm(neg[..., :k]) )

    Unweighted sum. Only the listed dims enter: the full dimension D is NOT added implicitly;
    the caller puts D in `dims` when the full embedding should be trained too. Each k must be in
    [1, D] and appear once. `kwargs` are passed to `improved_infonce` (temperature, margin,
    same_pos, neg_mask, qq, dd, qd, mask_false_negatives); the false-negative mask is
    recomputed at each k from that prefix's cosines.

    Shapes as in `improved_infonce`; returns a scalar.
    """
    dims = list(dims)
    if not dims:
        raise ValueError("mrl_infonce needs at least one dim")
    if len(set(dims)) != len(dims):
        raise ValueError(f"mrl_infonce dims must be distinct, got {dims}")
    total = None
    for k in dims:
        loss = improved_infonce(
            truncate_normalize(q, k),
            truncate_normalize(pos, k),
            None if neg is None else truncate_normalize(neg, k),
            **kwargs,
        )
        total = loss if total is None else total + loss
    return total


def _check_reranker_inputs(logits_at_answer: Tensor, yes_id: int, no_id: int) -> None:
    if logits_at_answer.ndim != 2:
        raise ValueError(f"logits_at_answer must be [B, V], got shape {tuple(logits_at_answer.shape)}")
    vocab = logits_at_answer.shape[1]
    for name, idx in (("yes_id", yes_id), ("no_id", no_id)):
        if not 0 <= idx < vocab:
            raise ValueError(f"{name}={idx} is outside the vocabulary [0, {vocab})")
    if yes_id == no_id:
        raise ValueError(f"yes_id and no_id must differ, both are {yes_id}")


def reranker_sft_loss(
    logits_at_answer: Tensor, labels: Tensor, yes_id: int, no_id: int, two_token: bool = False
) -> Tensor:
    """Reranker SFT loss (paper eq. 2), mean over the batch.

        L = -(1/B) sum_b log p(l_b | P(q_b, d_b)),   l_b = "yes" if labels[b] else "no"

    Default: p is the softmax over the FULL vocabulary (the LM's next-token distribution, as in
    the paper). two_token=True: p is the softmax over just (l_no, l_yes), which is the quantity
    `reranker_score` reads at inference.

    Args:
        logits_at_answer: [B, V] next-token logits at the answer position.
        labels: [B] bool / int / float, nonzero = relevant (target token `yes`), 0 = `no`.
        yes_id, no_id: token ids of "yes" and "no".

    Returns:
        Scalar loss, float32 for half-precision logits, else the logits' dtype.
    """
    _check_reranker_inputs(logits_at_answer, yes_id, no_id)
    if labels.shape != logits_at_answer.shape[:1]:
        raise ValueError(
            f"labels must be [B={logits_at_answer.shape[0]}], got shape {tuple(labels.shape)}"
        )
    logits = logits_at_answer.to(_compute_dtype(logits_at_answer))
    relevant = labels.to(device=logits.device) != 0
    if two_token:
        pair = logits[:, [no_id, yes_id]]  # [B, 2]: column 1 is "yes"
        return F.cross_entropy(pair, relevant.long())
    target = torch.where(
        relevant, torch.tensor(yes_id, device=logits.device), torch.tensor(no_id, device=logits.device)
    )
    return F.cross_entropy(logits, target)


def reranker_score(logits_at_answer: Tensor, yes_id: int, no_id: int) -> Tensor:
    """Reranker relevance score, [B, V] -> [B], in (0, 1).

        score = exp(l_yes) / (exp(l_yes) + exp(l_no))

    computed as a softmax over the two logits (no overflow for large logits). float32 for
    half-precision logits, else the logits' dtype.
    """
    _check_reranker_inputs(logits_at_answer, yes_id, no_id)
    logits = logits_at_answer.to(_compute_dtype(logits_at_answer))
    return torch.softmax(logits[:, [no_id, yes_id]], dim=-1)[:, 1]
