"""What one optimizer step computes: the batch of step b, and the forward + backward of the
embedding loss (paper eq. 1) and of the reranker loss (paper eq. 2) on it.

Written once for every engine. One process is the case world = 1; on N workers (DDP, DeepSpeed)
every worker builds the same global batch and encodes its contiguous slice r of it:

- cross-device in-batch negatives (`distributed.gather_negatives`, default on): the query,
  positive and hard-negative embeddings of all workers are all-gathered (`Engine.gather`, whose
  own rows are the worker's local tensors, so the gradient flows through them) and the improved
  InfoNCE is computed on the GLOBAL batch (false-negative and same-positive masks on global
  indices). Every worker computes the same loss and back-propagates it into its own slice: the
  sum of the workers' gradients is the full gradient, hence the loss is scaled by world, because
  DDP (and ZeRO) average gradients across workers. Off = each worker's slice is its own batch;
- every worker runs the same number of forward/backward passes (ZeRO's collectives need it): the
  hard negatives are padded with empty texts to the largest worker's count, the reranker's
  examples with weight-0 fillers;
- `sync` = the optimizer step's last micro-batch: gradients are all-reduced in its last pass.

Speed: texts are encoded in forward passes of `length_bucket` texts of similar token count, and
the positives and hard negatives in one pass group (same max length, as MNRL does); GradCache
(`mini_batch_size`) bounds memory to one chunk with the same loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tasks.config import TrainConfig
from tasks.data import Pair
from tasks.losses import improved_infonce, mrl_infonce, reranker_sft_loss
from tasks.models import Embedder, Reranker, format_query, pad_left
from tasks.training.engines import Engine, LocalEngine


# ----------------------------------------------------------------------------- data order

def batch_indices(n: int, batch: int, size: int, seed: int) -> list[int]:
    """Indices of batch `batch` (of `size` items) in an endless stream of per-epoch permutations:
    batch b is a pure function of (seed, b), so a resumed run sees the batches of an uninterrupted one."""
    out = []
    for k in range(batch * size, (batch + 1) * size):
        epoch, pos = divmod(k, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perm[pos]))
    return out


def sample_negatives(pair: Pair, k: int, seed: int, batch: int, slot: int) -> list[str]:
    if k == 0 or not pair.negatives:
        return []
    if len(pair.negatives) <= k:
        return list(pair.negatives)
    rng = np.random.default_rng([seed, batch, slot, 7])
    return [pair.negatives[i] for i in sorted(rng.choice(len(pair.negatives), size=k, replace=False))]


def config_at_step(cfg: TrainConfig, step: int) -> TrainConfig:
    """The training config for optimizer step `step` (0-based): during `loss.plain_warmup_steps`
    the loss is plain q-d InfoNCE (no q-q / d-d terms, no false-negative mask)."""
    if step >= cfg.loss.plain_warmup_steps:
        return cfg
    plain = cfg.loss.model_copy(update={"qq": False, "dd": False, "qd": True, "mask_false_negatives": False})
    return cfg.model_copy(update={"loss": plain})


# ----------------------------------------------------------------------------- embedding (eq. 1)

@dataclass
class EmbeddingBatch:
    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    same_pos: torch.Tensor  # [N, N] bool: item j's positive is item i's positive text
    same_neg: torch.Tensor | None = None  # [N, N, K] bool: item j's k-th negative is item i's positive text

    @property
    def num_texts(self) -> int:
        return len(self.queries) + len(self.positives) + sum(len(n) for n in self.negatives)

    def slice(self, lo: int, hi: int) -> "EmbeddingBatch":
        return EmbeddingBatch(self.queries[lo:hi], self.positives[lo:hi], self.negatives[lo:hi],
                              self.same_pos[lo:hi, lo:hi],
                              None if self.same_neg is None else self.same_neg[lo:hi, lo:hi])


def embedding_batch(pairs: Sequence[Pair], k: int, seed: int, batch: int) -> EmbeddingBatch:
    queries = [format_query(p.query, p.instruction) for p in pairs]
    positives = [format_query(p.positive, p.instruction) if p.symmetric else p.positive for p in pairs]
    # symmetric pairs (STS, bitext): the instruction goes on every document of the pair, hard
    # negatives included; an instruction on the positive only would let the model score the
    # instruction's presence instead of the content
    negatives = [[format_query(n, p.instruction) for n in sample_negatives(p, k, seed, batch, i)] if p.symmetric
                 else sample_negatives(p, k, seed, batch, i) for i, p in enumerate(pairs)]
    ids = {t: i for i, t in enumerate(dict.fromkeys(positives))}
    pid = torch.tensor([ids[t] for t in positives])
    # the positive id of each negative slot, in the padded [N, k] layout of `assemble_negatives`
    # (-1: padding, or a text that is nobody's positive): with loss.in_batch_docs
    # positives_and_negatives another item's hard negative that is item i's positive is masked
    nid = torch.full((len(pairs), k), -1)
    for j, negs in enumerate(negatives):
        for slot, t in enumerate(negs):
            nid[j, slot] = ids.get(t, -1)
    same_neg = pid[:, None, None] == nid[None, :, :]
    return EmbeddingBatch(queries, positives, negatives, pid[:, None] == pid[None, :], same_neg)


def as_engine(target: Engine | torch.nn.Module) -> Engine:
    """A bare model (tests, benchmarks) runs its passes as one process does."""
    return target if isinstance(target, Engine) else LocalEngine(target)


def embed_by_length(target: Engine | Embedder, texts: list[str], max_length: int, bucket: int) -> Tensor:
    """`model.embed(texts)` with gradient, in forward passes of `bucket` (0 = one pass) texts of
    similar token count (`TrainConfig.length_bucket`), returned in the input order. Same embeddings and
    gradients up to float rounding, but short texts are not padded to the batch's longest one
    (the smol preset's stage-2 step: 1.6x faster, 8.4 -> 4.9 GB peak)."""
    engine = as_engine(target)
    model = engine.model
    ids = model.token_ids(texts, max_length)
    if not bucket or len(texts) <= bucket:
        return engine.forward(*pad_left(ids, model.pad_id, model.device))
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    parts = [engine.forward(*pad_left([ids[i] for i in order[s: s + bucket]], model.pad_id, model.device))
             for s in range(0, len(order), bucket)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def encode_chunks(model: Embedder, texts: list[str], max_length: int, chunk: int | None) -> Tensor:
    """[len(texts), D] embeddings in forward passes of `chunk` texts (GradCache's no-grad pass)."""
    if not texts:
        return torch.zeros(0, model.hidden_size, device=model.device)
    chunk = chunk or len(texts)
    return torch.cat([model.embed(texts[i: i + chunk], max_length) for i in range(0, len(texts), chunk)])


def assemble_negatives(flat: Tensor, negatives: list[list[str]], k: int):
    """[sum K_i, D] -> ([N, k, D], [N, k] mask) with zero-filled padding slots."""
    n = len(negatives)
    if k == 0 or sum(len(x) for x in negatives) == 0:
        return None, None
    out = flat.new_zeros(n, k, flat.shape[-1])
    mask = torch.zeros(n, k, dtype=torch.bool, device=flat.device)
    pos = 0
    for i, negs in enumerate(negatives):
        m = len(negs)
        if m:
            out[i, :m] = flat[pos: pos + m]
            mask[i, :m] = True
            pos += m
    return out, mask


def embedding_loss_from_embeddings(q, p, nflat, batch: EmbeddingBatch, cfg: TrainConfig) -> Tensor:
    neg, neg_mask = assemble_negatives(nflat, batch.negatives, cfg.hard_negatives)
    lc = cfg.loss
    kwargs = dict(temperature=lc.temperature, margin=lc.margin, same_pos=batch.same_pos.to(q.device),
                  neg_mask=neg_mask, qq=lc.qq, dd=lc.dd, qd=lc.qd, mask_false_negatives=lc.mask_false_negatives,
                  dd_mask_on=lc.dd_mask_on, in_batch_docs=lc.in_batch_docs)
    if lc.in_batch_docs == "positives_and_negatives" and neg is not None and batch.same_neg is not None:
        kwargs["same_neg"] = batch.same_neg.to(q.device)
    if lc.mrl_dims:
        return mrl_infonce(q, p, neg, dims=lc.mrl_dims, **kwargs)
    return improved_infonce(q, p, neg, **kwargs)


def embedding_step(target: Engine | Embedder, batch: EmbeddingBatch, cfg: TrainConfig, scale: float, *,
                   sync: bool = True) -> float:
    """This worker's forward + backward of the (global) batch `batch`, gradients scaled by `scale`;
    returns the loss (the global batch's with gathered negatives, else the mean of the workers'
    own-slice losses). GradCache when `cfg.mini_batch_size` is set, plain end-to-end backprop otherwise."""
    engine = as_engine(target)
    model, rank, world = engine.model, engine.rank, engine.world
    mc = model.cfg
    per = len(batch.queries) // world
    lo, hi = rank * per, (rank + 1) * per
    neg_counts = [sum(len(x) for x in batch.negatives[r * per:(r + 1) * per]) for r in range(world)]
    negs = [t for slot in batch.negatives[lo:hi] for t in slot]
    negs += [""] * (max(neg_counts) - len(negs))
    queries, positives = batch.queries[lo:hi], batch.positives[lo:hi]
    sizes = [[per] * world, [per] * world, neg_counts]
    gather = world > 1 and cfg.distributed.gather_negatives
    # DDP/ZeRO average the workers' gradients: with gathering each worker holds only its share of
    # the one global loss, so undo the average; without, the average of the own-slice losses is the loss.
    factor = world if gather else 1

    def loss_of(embs: list[Tensor]) -> Tensor:
        if world == 1:
            return embedding_loss_from_embeddings(*embs, batch, cfg)
        if gather:
            return embedding_loss_from_embeddings(*map(engine.gather, embs, sizes), batch, cfg)
        return embedding_loss_from_embeddings(*[e[: s[rank]] for e, s in zip(embs, sizes)], batch.slice(lo, hi), cfg)

    chunk = cfg.mini_batch_size
    if chunk is None:
        with engine.synced(sync):
            # positives and hard negatives are encoded together (same max length, as MNRL does): one
            # weight-gradient contribution fewer per step, which lowers the backward's peak memory
            q = embed_by_length(engine, queries, mc.max_query_length, cfg.length_bucket)
            docs = embed_by_length(engine, positives + negs, mc.max_doc_length, cfg.length_bucket)
            loss = loss_of([q, docs[:per], docs[per:]])
            engine.backward(loss * (scale * factor))
        return engine.mean_over_workers(loss.detach(), same_everywhere=gather)
    # GradCache: 1) embeddings without graph, 2) loss + grads w.r.t. embeddings, 3) re-encode with graph.
    groups = [(queries, mc.max_query_length), (positives, mc.max_doc_length), (negs, mc.max_doc_length)]
    with torch.no_grad():
        cached = [encode_chunks(model, texts, ml, chunk) for texts, ml in groups]
    leaves = [c.detach().requires_grad_(True) for c in cached]
    loss = loss_of(leaves)
    grads = torch.autograd.grad(loss * (scale * factor), leaves, allow_unused=True)
    jobs = []  # (texts, max length, their gradient); every worker has the same number (padded negatives)
    for (texts, ml), leaf, g in zip(groups, leaves, grads):
        g = torch.zeros_like(leaf) if g is None else g  # a padded worker's unused term: zero gradient
        jobs += [(texts[i: i + chunk], ml, g[i: i + chunk]) for i in range(0, len(texts), chunk)]
    for j, (texts, ml, g) in enumerate(jobs):
        with engine.synced(sync and j == len(jobs) - 1):
            engine.backward(engine.forward(*pad_left(model.token_ids(texts, ml), model.pad_id, model.device)), g)
    return engine.mean_over_workers(loss.detach(), same_everywhere=gather)


# ----------------------------------------------------------------------------- reranker (eq. 2)

def reranker_examples(pairs: Sequence[Pair], k: int, seed: int, batch: int, symmetric_order: str = "as_given"
                      ) -> tuple[list[tuple[str, str, str | None]], list[int]]:
    """Each query gives its positive ("yes") and up to k negatives ("no"): its own hard negatives,
    topped up with other queries' positives from the batch when it has too few. With
    `symmetric_order` drawn, each example of a symmetric pair (STS, bitext: either text may come
    first) has its two texts swapped with probability 1/2, drawn per example from (seed, batch)."""
    examples, labels = [], []
    others = [p.positive for p in pairs]
    for i, p in enumerate(pairs):
        negs = sample_negatives(p, k, seed, batch, i)
        j = 1
        while len(negs) < k and j < len(pairs):
            cand = others[(i + j) % len(pairs)]
            if cand != p.positive and cand not in negs:
                negs.append(cand)
            j += 1
        docs = [p.positive, *negs]
        swap = (np.random.default_rng([seed, batch, i, 11]).random(len(docs)) < 0.5
                if p.symmetric and symmetric_order == "drawn" else np.zeros(len(docs), bool))
        for slot, d in enumerate(docs):
            examples.append((d, p.query, p.instruction) if swap[slot] else (p.query, d, p.instruction))
            labels.append(int(slot == 0))
    return examples, labels


def reranker_step(target: Engine | Reranker, pairs: Sequence[Pair], cfg: TrainConfig, seed: int, batch: int,
                  scale: float, *, sync: bool = True) -> tuple[float, int]:
    """Backward of this worker's share of the yes/no SFT loss (the mean over the global batch's
    examples); returns (the global loss, its real tokens).

    The examples are sorted by token count; worker r takes every `world`-th from the r-th on (the
    workers get alike lengths, so none waits for another), padded with weight-0 fillers to an equal
    share, and runs them in forward passes of `mini_batch_size` (default `length_bucket`) examples:
    the same loss and gradients up to float rounding as one padded pass, but a short NLI pair is
    not padded to the longest passage. Each real example weighs 1 / len(examples): the workers'
    shares add up to the mean."""
    engine = as_engine(target)
    model, rank, world = engine.model, engine.rank, engine.world
    examples, labels = reranker_examples(pairs, cfg.hard_negatives, seed, batch, cfg.symmetric_order)
    ids = [model.token_ids([q], [d], instr)[0] for q, d, instr in examples]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    total = len(examples)
    share = -(-total // world)
    mine = order[rank::world]
    real = len(mine)
    mine += order[:1] * (share - real)  # fillers: forward/backward with weight 0
    chunk = cfg.mini_batch_size or cfg.length_bucket
    loss_sum, tokens = 0.0, 0
    starts = list(range(0, share, chunk))
    for j, s in enumerate(starts):
        part = mine[s: s + chunk]
        m = max(0, min(len(part), real - s))  # real examples in this pass (fillers come last)
        input_ids, mask = pad_left([ids[i] for i in part], model.pad_id, model.device)
        tokens += int(mask[:m].sum())
        with engine.synced(sync and j == len(starts) - 1):
            logits = engine.forward(input_ids, mask)
            if m:
                y = torch.tensor([labels[i] for i in part[:m]], device=logits.device)
                loss = reranker_sft_loss(logits[:m], y, model.yes_id, model.no_id, two_token=cfg.two_token)
                engine.backward(loss * scale * m / total * world)
                loss_sum += float(loss.detach()) * m / total
            else:
                engine.backward(logits.sum() * 0.0)
    return engine.sum_over_workers(loss_sum, tokens)
