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
from typing import Literal

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

# The two readings of eq. 1 that the paper leaves open (see `improved_infonce` and SPEC 2).
DdMaskOn = Literal["positive", "query"]
InBatchDocs = Literal["positives", "positives_and_negatives"]


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
    dd_mask_on: DdMaskOn = "positive",
    in_batch_docs: InBatchDocs = "positives",
    same_neg: Tensor | None = None,
) -> Tensor:
    """Improved InfoNCE of Qwen3-Embedding (paper eq. 1), mean over the batch.

        L   = -(1/N) sum_i log( exp(s(q_i, d_i+)/tau) / Z_i )
        Z_i = exp(s(q_i, d_i+)/tau)
            + sum_k    m_ik exp(s(q_i,  d_ik-)/tau)   hard negatives          (neg is not None)
            + sum_j!=i m_ij exp(s(q_i,  q_j)/tau)     other queries           (qq)
            + sum_j!=i m_ij exp(s(d_i+, d_j)/tau)     positive vs other docs  (dd)
            + sum_j!=i m_ij exp(s(q_i,  d_j)/tau)     query vs other docs     (qd)

    s is the dot product, which is the cosine because all inputs must already be L2-normalised
    (this function does not normalise them).

    The in-batch documents d_j (`in_batch_docs`), j != i:
      "positives"                the other items' positives d_j+ (the default);
      "positives_and_negatives"  also the other items' real hard negatives d_jk- (ms-swift's
                                 batch), in both the d-d and the q-d term. Item i's own hard
                                 negatives stay in the hard-negative term only (counted once).

    False-negative mask (only if `mask_false_negatives`): m = 0 when the term's mask score
    s > s(q_i, d_i+) + margin (raw cosine, before /tau, computed from detached values so the
    threshold carries no gradient), or, for the in-batch terms, when d_j (or q_j's item) has the
    same positive text as d_i+ (same_pos[i, j]; for other items' negatives, same_neg[i, j, k]);
    else m = 1. The mask score is the term's own score, except in the d-d term, where
    `dd_mask_on` chooses:
      "positive"  s(d_i+, d_j), the d-d term's own score (this function's default);
      "query"     s(q_i, d_j), the paper's wording: "s_ij is the corresponding score of
                  q_i, d_j or q_i, q_j", so the d-d and q-d terms of one d_j share one m_ij
                  (the pipeline's default: `loss.dd_mask_on` in conf/base.yaml).
    With `mask_false_negatives=False` only the j != i exclusion and the `neg_mask` padding apply
    (same_pos, same_neg and margin are ignored).

    Implementation: one [N, 1 + K + 3N (+ 2NK)] logits matrix (positive in column 0, disabled
    blocks left out, the other items' negatives last), masked entries set to -inf,
    loss = logsumexp(row) - row[0] (cross entropy with target column 0). Column 0 is never
    masked, so every row stays finite.

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
        dd_mask_on: "positive" | "query", the score the d-d term's mask compares (see above).
        in_batch_docs: "positives" | "positives_and_negatives", the in-batch documents d_j.
        same_neg: [N, N, K] bool, True where item j's k-th hard negative is the same text as
            item i's positive; used only with in_batch_docs="positives_and_negatives".

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

    if dd_mask_on not in ("positive", "query"):
        raise ValueError(f"dd_mask_on must be 'positive' or 'query', got {dd_mask_on!r}")
    if in_batch_docs not in ("positives", "positives_and_negatives"):
        raise ValueError(f"in_batch_docs must be 'positives' or 'positives_and_negatives', got {in_batch_docs!r}")
    if same_neg is not None and (neg is None or tuple(same_neg.shape) != (n, n, neg.shape[1])):
        want = f"[N, N, K] = [{n}, {n}, {neg.shape[1]}]" if neg is not None else "nothing: neg is None"
        raise ValueError(f"same_neg must be {want}, got shape {tuple(same_neg.shape)}")

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
        for enabled, s, term in ((qq, q @ q.T, "qq"), (dd, pos @ pos.T, "dd"), (qd, q @ pos.T, "qd")):
            if not enabled:
                continue
            keep = keep_batch
            if mask_false_negatives:
                # the d-d term read as the paper words it: masked on s(q_i, d_j), computed detached
                # (a graph node more would reorder the backward's gradient sums of the default)
                mask_on = q.detach() @ pos.detach().T if term == "dd" and dd_mask_on == "query" else s.detach()
                keep = keep & ~(mask_on > threshold)
            blocks.append(s)
            masks.append(keep)

    if in_batch_docs == "positives_and_negatives" and neg is not None and neg.shape[1] and (dd or qd):
        # the other items' hard negatives as in-batch documents d_jk, columns ordered (j, k)
        k = neg.shape[1]
        negs = neg.to(dtype)
        keep_docs = ~torch.eye(n, dtype=torch.bool, device=device).unsqueeze(2).expand(n, n, k)  # j != i
        if neg_mask is not None:
            keep_docs = keep_docs & neg_mask.to(device=device, dtype=torch.bool).unsqueeze(0)
        if mask_false_negatives and same_neg is not None:
            keep_docs = keep_docs & ~same_neg.to(device=device, dtype=torch.bool)
        keep_docs = keep_docs.reshape(n, n * k)
        s_qn = torch.einsum("id,jkd->ijk", q, negs).reshape(n, n * k)
        s_dn = torch.einsum("id,jkd->ijk", pos, negs).reshape(n, n * k)
        for enabled, s, mask_on in ((dd, s_dn, s_qn if dd_mask_on == "query" else s_dn), (qd, s_qn, s_qn)):
            if not enabled:
                continue
            keep = keep_docs
            if mask_false_negatives:
                keep = keep & ~(mask_on.detach() > threshold)
            blocks.append(s)
            masks.append(keep)

    logits = torch.cat(blocks, dim=1) / temperature  # [N, 1 + K + 3N + 2NK] at most
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
    same_pos, neg_mask, qq, dd, qd, mask_false_negatives, dd_mask_on, in_batch_docs, same_neg);
    the false-negative mask is recomputed at each k from that prefix's cosines.

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
