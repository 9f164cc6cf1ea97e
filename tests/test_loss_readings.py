"""The two readings of eq. 1 that the paper leaves open (tasks/losses.py, `loss.dd_mask_on` and
`loss.in_batch_docs`), against a float64 loop written from the formula in SPEC.md section 2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tasks.data import Pair
from tasks.losses import improved_infonce, mrl_infonce
from tasks.training.steps import embedding_batch
from tests.references import reference_loss as eq1_reference

TAU = 0.05
READINGS = list(itertools.product(["positive", "query"], ["positives", "positives_and_negatives"]))


def reference_loss(q, pos, neg=None, *, temperature, margin=0.1, same_pos=None, same_neg=None, neg_mask=None,
                   qq=True, dd=True, qd=True, mask_false_negatives=True, dd_mask_on="positive",
                   in_batch_docs="positives"):
    """Paper eq. 1 one term at a time. The in-batch documents d_j (j != i) are the other items'
    positives, with in_batch_docs="positives_and_negatives" also their real hard negatives; the
    d-d term's mask compares s(d_i+, d_j) ("positive") or s(q_i, d_j) ("query")."""
    q, pos = q.double(), pos.double()
    neg = None if neg is None else neg.double()
    n = q.shape[0]
    k_slots = 0 if neg is None else neg.shape[1]

    def s(a, b):
        return sum(a[t] * b[t] for t in range(a.shape[0]))

    def real(j, k):
        return neg_mask is None or bool(neg_mask[j][k])

    total = 0.0
    for i in range(n):
        s_pos = s(q[i], pos[i])
        threshold = s_pos.item() + margin

        def m(mask_score, same_text=False):
            if not mask_false_negatives:
                return 1
            return 0 if same_text or mask_score.item() > threshold else 1

        # (document, is it d_i+'s text) for every in-batch document d_j, j != i
        docs = []
        for j in range(n):
            if j == i:
                continue
            docs.append((pos[j], same_pos is not None and bool(same_pos[i][j])))
            if in_batch_docs == "positives_and_negatives":
                docs += [(neg[j, k], same_neg is not None and bool(same_neg[i][j][k]))
                         for k in range(k_slots) if real(j, k)]

        z = torch.exp(s_pos / temperature)
        for k in range(k_slots):
            if real(i, k):
                score = s(q[i], neg[i, k])
                z = z + m(score) * torch.exp(score / temperature)
        for j in range(n):
            if qq and j != i:
                score = s(q[i], q[j])
                z = z + m(score, same_pos is not None and bool(same_pos[i][j])) * torch.exp(score / temperature)
        for d, same_text in docs:
            if dd:
                score = s(pos[i], d)
                mask_score = score if dd_mask_on == "positive" else s(q[i], d)
                z = z + m(mask_score, same_text) * torch.exp(score / temperature)
            if qd:
                score = s(q[i], d)
                z = z + m(score, same_text) * torch.exp(score / temperature)
        total = total - torch.log(torch.exp(s_pos / temperature) / z)
    return total / n


def batch(n, k, d, seed):
    """Unit q, pos, neg with positives near their queries and negatives near the other items'
    positives, so that the false-negative mask fires on some in-batch terms of each kind."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(q + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(pos.roll(1, 0)[:, None] + 0.9 * torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)
    return q, pos, neg


def duplicates(n, k):
    """same_neg for item 1's slot 0 being item 0's positive text, with n > 2 same_pos for items 0
    and n-1 sharing a positive (so item 1's slot 0 is n-1's too), and one padded slot (item n-1's last)."""
    same_pos = torch.eye(n, dtype=torch.bool)
    same_neg = torch.zeros(n, n, k, dtype=torch.bool)
    same_neg[0, 1, 0] = True
    if n > 2:
        same_pos[0, n - 1] = same_pos[n - 1, 0] = True
        same_neg[n - 1, 1, 0] = True
    neg_mask = torch.ones(n, k, dtype=torch.bool)
    neg_mask[n - 1, k - 1] = False
    return same_pos, same_neg, neg_mask


@pytest.mark.parametrize("dd_mask_on,in_batch_docs", READINGS)
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("n,k,d,seed", [(2, 1, 3, 0), (4, 2, 5, 1), (5, 3, 4, 2)])
def test_each_reading_matches_the_loop_reference(dd_mask_on, in_batch_docs, mask, n, k, d, seed):
    q, pos, neg = batch(n, k, d, seed)
    same_pos, same_neg, neg_mask = duplicates(n, k)
    kw = dict(temperature=TAU, same_pos=same_pos, same_neg=same_neg, neg_mask=neg_mask,
              mask_false_negatives=mask, dd_mask_on=dd_mask_on, in_batch_docs=in_batch_docs)
    got = improved_infonce(q, pos, neg, **kw)
    torch.testing.assert_close(got, reference_loss(q, pos, neg, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dd_mask_on,in_batch_docs", READINGS)
@pytest.mark.parametrize("qq,dd,qd", [(True, False, True), (False, True, False), (False, False, False)])
def test_each_reading_with_terms_switched_off(dd_mask_on, in_batch_docs, qq, dd, qd):
    q, pos, neg = batch(4, 2, 5, 3)
    same_pos, same_neg, neg_mask = duplicates(4, 2)
    kw = dict(temperature=TAU, same_pos=same_pos, same_neg=same_neg, neg_mask=neg_mask, qq=qq, dd=dd, qd=qd,
              dd_mask_on=dd_mask_on, in_batch_docs=in_batch_docs)
    torch.testing.assert_close(improved_infonce(q, pos, neg, **kw), reference_loss(q, pos, neg, **kw),
                               rtol=1e-10, atol=1e-10)


def test_gradients_match_the_reference():
    q, pos, neg = batch(4, 2, 5, 4)
    same_pos, same_neg, neg_mask = duplicates(4, 2)
    kw = dict(temperature=TAU, same_pos=same_pos, same_neg=same_neg, neg_mask=neg_mask, dd_mask_on="query",
              in_batch_docs="positives_and_negatives")
    leaves = [t.clone().requires_grad_(True) for t in (q, pos, neg)]
    refs = [t.clone().requires_grad_(True) for t in (q, pos, neg)]
    got = torch.autograd.grad(improved_infonce(*leaves, **kw), leaves)
    want = torch.autograd.grad(reference_loss(*refs, **kw), refs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_the_defaults_are_the_first_reading_and_the_original_reference():
    """dd_mask_on=positive, in_batch_docs=positives is eq. 1 as tests/test_losses.py reads it."""
    q, pos, neg = batch(5, 3, 4, 5)
    same_pos, same_neg, neg_mask = duplicates(5, 3)
    kw = dict(temperature=TAU, same_pos=same_pos, neg_mask=neg_mask)
    default = improved_infonce(q, pos, neg, **kw)
    assert torch.equal(default, improved_infonce(q, pos, neg, **kw, same_neg=same_neg, dd_mask_on="positive",
                                                 in_batch_docs="positives"))
    torch.testing.assert_close(default, eq1_reference(q, pos, neg, **kw), rtol=1e-10, atol=1e-10)


def test_the_dd_mask_readings_differ_where_docs_are_close_but_the_query_is_far():
    """s(d_0+, d_1+) = cos 10 deg is above s(q_0, d_0+) + 0.1 = 0.6, s(q_0, d_1+) = cos 70 deg is not:
    `positive` drops the d-d term of (0, 1), `query` keeps it (and the same for item 1)."""
    def at(deg, z=0.0):
        r = math.radians(deg)
        return F.normalize(torch.tensor([math.cos(r), math.sin(r), z], dtype=torch.float64), dim=0)

    q = torch.stack([at(0), at(70, 3.0)])
    pos = torch.stack([at(60), at(70)])
    losses = {}
    for reading in ("positive", "query"):
        kw = dict(temperature=TAU, dd_mask_on=reading)
        losses[reading] = improved_infonce(q, pos, **kw)
        torch.testing.assert_close(losses[reading], reference_loss(q, pos, **kw), rtol=1e-10, atol=1e-10)
    assert losses["query"] > losses["positive"] + 1.0  # cos 10 deg / tau: a term of e^19.7 kept in Z
    unmasked = [improved_infonce(q, pos, temperature=TAU, dd_mask_on=r, mask_false_negatives=False)
                for r in ("positive", "query")]
    assert torch.equal(*unmasked)  # the readings differ only in the mask


def test_other_items_hard_negatives_enter_only_with_positives_and_negatives():
    q, pos, neg = batch(4, 2, 5, 6)
    kw = dict(temperature=TAU, mask_false_negatives=False)
    only_pos = improved_infonce(q, pos, neg, **kw, in_batch_docs="positives")
    with_negs = improved_infonce(q, pos, neg, **kw, in_batch_docs="positives_and_negatives")
    assert with_negs > only_pos
    # no hard negatives, or none real: nothing to add
    for n_, m_ in ((None, None), (neg, torch.zeros(4, 2, dtype=torch.bool))):
        a = improved_infonce(q, pos, n_, neg_mask=m_, **kw, in_batch_docs="positives")
        b = improved_infonce(q, pos, n_, neg_mask=m_, **kw, in_batch_docs="positives_and_negatives")
        assert torch.equal(a, b)


def test_an_other_items_negative_with_my_positives_text_is_masked():
    """same_neg[i, j, k]: d_jk- is d_i+'s text (a false negative whatever its score), so row i drops it."""
    q, pos, neg = batch(3, 2, 4, 7)
    neg = neg.clone()
    neg[1, 0] = pos[0]
    same_neg = torch.zeros(3, 3, 2, dtype=torch.bool)
    same_neg[0, 1, 0] = True
    kw = dict(temperature=TAU, margin=10.0, in_batch_docs="positives_and_negatives")  # margin: only same_neg masks
    got = improved_infonce(q, pos, neg, same_neg=same_neg, **kw)
    torch.testing.assert_close(got, reference_loss(q, pos, neg, same_neg=same_neg, **kw), rtol=1e-10, atol=1e-10)
    # without same_neg, row 0 keeps a copy of its own positive in Z twice (d-d: s = 1, q-d: s = s(q_0, d_0+))
    assert got < improved_infonce(q, pos, neg, **kw)
    # and without the mask at all, same_neg is ignored
    off = dict(kw, mask_false_negatives=False)
    assert torch.equal(improved_infonce(q, pos, neg, same_neg=same_neg, **off), improved_infonce(q, pos, neg, **off))


def test_mrl_passes_the_readings_through():
    q, pos, neg = batch(4, 2, 8, 8)
    same_pos, same_neg, neg_mask = duplicates(4, 2)
    kw = dict(temperature=TAU, same_pos=same_pos, same_neg=same_neg, neg_mask=neg_mask, dd_mask_on="query",
              in_batch_docs="positives_and_negatives")
    want = sum(reference_loss(F.normalize(q[:, :k], dim=-1), F.normalize(pos[:, :k], dim=-1),
                              F.normalize(neg[..., :k], dim=-1), **kw) for k in (4, 8))
    torch.testing.assert_close(mrl_infonce(q, pos, neg, dims=[4, 8], **kw), want, rtol=1e-10, atol=1e-10)


def test_validation_names_the_option():
    q, pos, neg = batch(2, 1, 3, 9)
    with pytest.raises(ValueError, match="dd_mask_on"):
        improved_infonce(q, pos, neg, temperature=TAU, dd_mask_on="document")
    with pytest.raises(ValueError, match="in_batch_docs"):
        improved_infonce(q, pos, neg, temperature=TAU, in_batch_docs="negatives")
    with pytest.raises(ValueError, match="same_neg"):
        improved_infonce(q, pos, neg, temperature=TAU, same_neg=torch.zeros(2, 2, 3, dtype=torch.bool))


def test_embedding_batch_marks_other_items_negatives_that_are_my_positive():
    pairs = [Pair("q0", "shared", ("n0",)), Pair("q1", "p1", ("shared", "n1")), Pair("q2", "p2", ())]
    b = embedding_batch(pairs, 2, seed=0, batch=0)
    assert b.negatives == [["n0"], ["shared", "n1"], []]
    want = torch.zeros(3, 3, 2, dtype=torch.bool)
    want[0, 1, 0] = True  # item 1's slot 0 is item 0's positive
    assert torch.equal(b.same_neg, want)
    assert torch.equal(b.slice(0, 2).same_neg, want[:2, :2])
