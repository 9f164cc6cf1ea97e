"""Plain reference implementations the tests compare the project's code against: loops that read
like the formulas in ../shared/SPEC.md, in float64."""

from __future__ import annotations

import torch


def reference_loss(
    q,
    pos,
    neg=None,
    *,
    temperature,
    margin=0.1,
    same_pos=None,
    neg_mask=None,
    qq=True,
    dd=True,
    qd=True,
    mask_false_negatives=True,
):
    """Paper eq. 1, one term at a time, in float64 (differentiable through the dot products)."""
    q, pos = q.double(), pos.double()
    neg = None if neg is None else neg.double()
    n = q.shape[0]

    def s(a, b):
        return sum(a[t] * b[t] for t in range(a.shape[0]))

    total = 0.0
    for i in range(n):
        s_pos = s(q[i], pos[i])
        threshold = s_pos.item() + margin  # a Python float: no gradient through the mask

        def m(score, j=None):
            if not mask_false_negatives:
                return 1
            if j is not None and same_pos is not None and bool(same_pos[i][j]):
                return 0
            return 0 if score.item() > threshold else 1

        z = torch.exp(s_pos / temperature)
        if neg is not None:
            for k in range(neg.shape[1]):
                if neg_mask is not None and not bool(neg_mask[i][k]):
                    continue
                score = s(q[i], neg[i, k])
                z = z + m(score) * torch.exp(score / temperature)
        for j in range(n):
            if j == i:
                continue
            if qq:
                score = s(q[i], q[j])
                z = z + m(score, j) * torch.exp(score / temperature)
            if dd:
                score = s(pos[i], pos[j])
                z = z + m(score, j) * torch.exp(score / temperature)
            if qd:
                score = s(q[i], pos[j])
                z = z + m(score, j) * torch.exp(score / temperature)
        total = total - torch.log(torch.exp(s_pos / temperature) / z)
    return total / n
