"""tasks/losses.py against loop references that read like the formulas in SPEC.md section 2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.references import reference_loss
from tasks.losses import (
    improved_infonce,
    mrl_infonce,
    reranker_score,
    reranker_sft_loss,
    truncate_normalize,
)

TAU = 0.05


def unit(*shape: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def batch(n: int, k: int, d: int, seed: int = 0):
    """Random unit q, pos, neg; positives correlated with queries so that s(q_i, d_i+) varies."""
    torch.manual_seed(seed)
    q = unit(n, d)
    pos = F.normalize(q + 0.8 * torch.randn(n, d, dtype=torch.float64), dim=-1)
    neg = unit(n, k, d)
    return q, pos, neg


SIZES = [(1, 0, 4), (1, 2, 4), (2, 1, 3), (3, 0, 5), (4, 3, 8), (5, 2, 6)]


@pytest.mark.parametrize("n,k,d", SIZES)
@pytest.mark.parametrize("mask", [True, False])
def test_matches_reference(n, k, d, mask):
    q, pos, neg = batch(n, k, d, seed=n * 100 + k * 10 + d)
    got = improved_infonce(q, pos, neg, temperature=TAU, mask_false_negatives=mask)
    want = reference_loss(q, pos, neg, temperature=TAU, mask_false_negatives=mask)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,d", [(1, 4), (3, 5)])
def test_no_negatives_and_zero_k_agree(n, d):
    q, pos, neg = batch(n, 0, d)
    none = improved_infonce(q, pos, None, temperature=TAU)
    empty = improved_infonce(q, pos, neg, temperature=TAU)
    torch.testing.assert_close(none, empty)
    torch.testing.assert_close(none, reference_loss(q, pos, None, temperature=TAU))


def test_single_item_without_negatives_is_zero():
    q, pos, _ = batch(1, 0, 4)
    assert improved_infonce(q, pos, temperature=TAU).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("qq,dd,qd", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("mask", [True, False])
def test_each_term_switch(qq, dd, qd, mask):
    q, pos, neg = batch(4, 2, 5, seed=7)
    flags = dict(qq=qq, dd=dd, qd=qd, mask_false_negatives=mask)
    got = improved_infonce(q, pos, neg, temperature=TAU, **flags)
    want = reference_loss(q, pos, neg, temperature=TAU, **flags)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_switches_change_the_loss():
    q, pos, neg = batch(4, 2, 5, seed=3)
    full = improved_infonce(q, pos, neg, temperature=TAU, mask_false_negatives=False)
    for off in ("qq", "dd", "qd"):
        partial = improved_infonce(q, pos, neg, temperature=TAU, mask_false_negatives=False, **{off: False})
        assert partial < full  # removing positive terms from Z lowers the loss


def same_pos_from_ids(ids):
    t = torch.tensor(ids)
    return t[:, None] == t[None, :]


@pytest.mark.parametrize("mask", [True, False])
def test_duplicate_positives_use_same_pos(mask):
    q, pos, neg = batch(5, 2, 6, seed=11)
    ids = [0, 1, 0, 2, 1]  # items 0/2 and 1/4 share a positive text
    pos = pos.clone()
    pos[2], pos[4] = pos[0], pos[1]
    same = same_pos_from_ids(ids)
    got = improved_infonce(q, pos, neg, temperature=TAU, same_pos=same, mask_false_negatives=mask)
    want = reference_loss(q, pos, neg, temperature=TAU, same_pos=same, mask_false_negatives=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    without = improved_infonce(q, pos, neg, temperature=TAU, mask_false_negatives=mask)
    if mask:
        # s(q_0, d_2) == s(q_0, d_0+) is not above the margin: only same_pos can remove it.
        assert got < without
    else:
        torch.testing.assert_close(got, without)  # same_pos is ignored without the mask


def test_same_pos_diagonal_only_changes_nothing():
    q, pos, neg = batch(3, 1, 4, seed=5)
    eye = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(
        improved_infonce(q, pos, neg, temperature=TAU, same_pos=eye),
        improved_infonce(q, pos, neg, temperature=TAU),
    )


def test_neg_mask_padding():
    q, pos, neg = batch(3, 3, 5, seed=13)
    neg_mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    for mask in (True, False):
        got = improved_infonce(q, pos, neg, temperature=TAU, neg_mask=neg_mask, mask_false_negatives=mask)
        want = reference_loss(q, pos, neg, temperature=TAU, neg_mask=neg_mask, mask_false_negatives=mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # padded slots are not read at all: garbage in them changes nothing
    garbage = neg.clone()
    garbage[1, 1:] = q[1]
    garbage[2] = q[2]
    torch.testing.assert_close(
        improved_infonce(q, pos, garbage, temperature=TAU, neg_mask=neg_mask, mask_false_negatives=False),
        improved_infonce(q, pos, neg, temperature=TAU, neg_mask=neg_mask, mask_false_negatives=False),
    )


def margin_case(requires_grad=False):
    """One item: s(q, d+) = 0.5, negative 0 at cosine 0.9 (> 0.5 + 0.1), negative 1 at 0.2."""
    def at(c):
        return torch.tensor([c, math.sqrt(1 - c * c), 0.0], dtype=torch.float64)

    q = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=requires_grad)
    pos = at(0.5)[None].requires_grad_(requires_grad)
    neg = torch.stack([at(0.9), at(0.2)])[None].requires_grad_(requires_grad)
    return q, pos, neg


def test_margin_masks_too_similar_negative():
    q, pos, neg = margin_case()
    masked = improved_infonce(q, pos, neg, temperature=TAU)
    only_second = improved_infonce(
        q, pos, neg, temperature=TAU, neg_mask=torch.tensor([[False, True]]), mask_false_negatives=False
    )
    unmasked = improved_infonce(q, pos, neg, temperature=TAU, mask_false_negatives=False)
    torch.testing.assert_close(masked, only_second)
    expected = -math.log(math.exp(0.5 / TAU) / (math.exp(0.5 / TAU) + math.exp(0.2 / TAU)))
    assert masked.item() == pytest.approx(expected, rel=1e-9)
    assert unmasked > masked + 1.0
    # a wider margin keeps the 0.9 negative
    torch.testing.assert_close(improved_infonce(q, pos, neg, temperature=TAU, margin=0.5), unmasked)


def test_threshold_is_raw_cosine_not_scaled_by_tau():
    q, pos, neg = margin_case()
    # 0.9 > 0.5 + 0.1 at any tau; were the margin applied to s/tau, tau=1 vs 0.05 would disagree
    for tau in (1.0, 0.05):
        got = improved_infonce(q, pos, neg, temperature=tau)
        want = reference_loss(q, pos, neg, temperature=tau)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mask", [True, False])
def test_gradients_match_reference(mask):
    q, pos, neg = batch(4, 2, 5, seed=17)
    ids = [0, 1, 0, 2]
    pos = pos.clone()
    pos[2] = pos[0]
    same = same_pos_from_ids(ids)
    neg_mask = torch.tensor([[True, True], [True, False], [True, True], [False, False]])
    inputs = [t.clone().requires_grad_(True) for t in (q, pos, neg)]
    kw = dict(temperature=TAU, same_pos=same, neg_mask=neg_mask, mask_false_negatives=mask)
    got = torch.autograd.grad(improved_infonce(*inputs, **kw), inputs)
    want = torch.autograd.grad(reference_loss(*inputs, **kw), inputs)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_no_gradient_through_mask_threshold():
    # With the mask on, the gradient must equal that of the same loss with the masked slot
    # removed as a constant: nothing flows through s(q, d+) + margin, nothing from the -inf entry.
    q, pos, neg = margin_case(requires_grad=True)
    g_masked = torch.autograd.grad(improved_infonce(q, pos, neg, temperature=TAU), (q, pos, neg))
    g_fixed = torch.autograd.grad(
        improved_infonce(
            q, pos, neg, temperature=TAU, neg_mask=torch.tensor([[False, True]]), mask_false_negatives=False
        ),
        (q, pos, neg),
    )
    for a, b in zip(g_masked, g_fixed):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert g_masked[2][0, 0].abs().sum() == 0  # the masked negative gets no gradient


def test_validation_errors():
    q, pos, neg = batch(3, 2, 4)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            improved_infonce(q, pos, neg, temperature=bad)
    with pytest.raises(ValueError, match="pos"):
        improved_infonce(q, pos[:2], neg, temperature=TAU)
    with pytest.raises(ValueError, match="neg"):
        improved_infonce(q, pos, neg[:, :, :3], temperature=TAU)
    with pytest.raises(ValueError, match="neg"):
        improved_infonce(q, pos, neg[0], temperature=TAU)
    with pytest.raises(ValueError, match="q must be"):
        improved_infonce(q[0], pos[0], temperature=TAU)
    with pytest.raises(ValueError, match="same_pos"):
        improved_infonce(q, pos, neg, temperature=TAU, same_pos=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="neg_mask"):
        improved_infonce(q, pos, neg, temperature=TAU, neg_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="neg_mask"):
        improved_infonce(q, pos, None, temperature=TAU, neg_mask=torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    q, pos, neg = batch(4, 2, 8, seed=19)
    q, pos, neg = (t.to(dtype).requires_grad_(True) for t in (q, pos, neg))
    loss = improved_infonce(q, pos, neg, temperature=TAU)
    assert loss.dtype == torch.float32
    # same (rounded) inputs in float64 through the loop: only the float32 math differs
    want = reference_loss(q.detach(), pos.detach(), neg.detach(), temperature=TAU)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    grads = torch.autograd.grad(loss, (q, pos, neg))
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in grads)


def test_float32_stays_float32():
    q, pos, neg = (t.float() for t in batch(3, 1, 4))
    assert improved_infonce(q, pos, neg, temperature=TAU).dtype == torch.float32


def test_truncate_normalize():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    y = truncate_normalize(x, 4)
    assert y.shape == (3, 2, 4)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3, 2, dtype=torch.float64))
    torch.testing.assert_close(y * x[..., :4].norm(dim=-1, keepdim=True), x[..., :4])
    for bad in (0, 7):
        with pytest.raises(ValueError):
            truncate_normalize(x, bad)


def test_mrl_is_sum_of_prefix_losses():
    q, pos, neg = batch(4, 2, 8, seed=23)
    same = same_pos_from_ids([0, 1, 2, 1])
    kw = dict(temperature=TAU, same_pos=same, qq=False)
    got = mrl_infonce(q, pos, neg, dims=[2, 4, 8], **kw)
    want = sum(
        reference_loss(truncate_normalize(q, k), truncate_normalize(pos, k), truncate_normalize(neg, k), **kw)
        for k in (2, 4, 8)
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the full dim is not added implicitly
    torch.testing.assert_close(
        mrl_infonce(q, pos, None, dims=[4], temperature=TAU),
        improved_infonce(truncate_normalize(q, 4), truncate_normalize(pos, 4), temperature=TAU),
    )
    for bad in ([], [0], [9], [4, 4]):
        with pytest.raises(ValueError):
            mrl_infonce(q, pos, neg, dims=bad, temperature=TAU)


YES, NO = 5, 2


def reranker_logits(b=4, v=9, seed=29, dtype=torch.float64):
    torch.manual_seed(seed)
    return (3 * torch.randn(b, v, dtype=torch.float64)).to(dtype)


def test_reranker_sft_full_vocab():
    logits = reranker_logits()
    labels = torch.tensor([1, 0, 0, 1])
    got = reranker_sft_loss(logits, labels, YES, NO)
    want = 0.0
    for b in range(4):
        row = logits[b].tolist()
        target = YES if labels[b] else NO
        want += -(row[target] - math.log(sum(math.exp(x) for x in row)))
    assert got.item() == pytest.approx(want / 4, rel=1e-12)
    # bool and float labels mean the same
    torch.testing.assert_close(reranker_sft_loss(logits, labels.bool(), YES, NO), got)
    torch.testing.assert_close(reranker_sft_loss(logits, labels.double(), YES, NO), got)


def test_reranker_sft_two_token():
    logits = reranker_logits()
    labels = torch.tensor([True, False, True, False])
    got = reranker_sft_loss(logits, labels, YES, NO, two_token=True)
    want = 0.0
    for b in range(4):
        ly, ln = logits[b, YES].item(), logits[b, NO].item()
        p_yes = math.exp(ly) / (math.exp(ly) + math.exp(ln))
        want += -math.log(p_yes if labels[b] else 1 - p_yes)
    assert got.item() == pytest.approx(want / 4, rel=1e-10)
    assert got < reranker_sft_loss(logits, labels, YES, NO)  # the 2-way softmax gives more mass
    # two-token loss on relevant items is -log of the score
    score = reranker_score(logits, YES, NO)
    ones = torch.ones(4, dtype=torch.bool)
    assert reranker_sft_loss(logits, ones, YES, NO, two_token=True).item() == pytest.approx(
        -score.log().mean().item(), rel=1e-12
    )


def test_reranker_score():
    logits = reranker_logits()
    got = reranker_score(logits, YES, NO)
    assert got.shape == (4,)
    for b in range(4):
        ly, ln = logits[b, YES].item(), logits[b, NO].item()
        assert got[b].item() == pytest.approx(math.exp(ly) / (math.exp(ly) + math.exp(ln)), rel=1e-12)
    big = torch.zeros(2, 9, dtype=torch.float64)
    big[0, YES], big[1, NO] = 1000.0, 1000.0  # exp overflows without the softmax
    torch.testing.assert_close(reranker_score(big, YES, NO), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_reranker_half_and_validation():
    logits = reranker_logits(dtype=torch.bfloat16)
    assert reranker_score(logits, YES, NO).dtype == torch.float32
    loss = reranker_sft_loss(logits, torch.tensor([1, 0, 1, 0]), YES, NO)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError):
        reranker_score(logits, 9, NO)
    with pytest.raises(ValueError):
        reranker_score(logits, YES, YES)
    with pytest.raises(ValueError):
        reranker_sft_loss(logits, torch.tensor([1, 0]), YES, NO)
    with pytest.raises(ValueError):
        reranker_sft_loss(logits[0], torch.tensor([1]), YES, NO)
