"""Hard negatives mined with BM25 for training data that has none (a BEIR folder with only
positive judgements, such as XQuAD: question -> the paragraph that answers it).

The paper's labelled data comes with mined hard negatives; a retrieval set without them trains
the model only against in-batch documents, which are easy (another topic). For each query, the
documents of the same corpus that BM25 ranks highest and that are not judged relevant to it are
its hard negatives: same topic, same words, not the answer. BM25 needs no model, so mining is
deterministic and costs milliseconds per query; `DataSource.mine_negatives: k` switches it on.

Tokens are lower-cased word characters, with every CJK character a token of its own (Chinese has
no spaces), less Lucene's English stop words. k1 = 0.9, b = 0.4 (Pyserini's defaults for passage
retrieval).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")


# Lucene's EnglishAnalyzer stop set (what Pyserini's BM25 drops)
STOP = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then "
                 "there these they this to was will with".split())


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOP]


class BM25:
    """Okapi BM25 over a fixed list of documents, as a sparse document x term weight matrix."""

    def __init__(self, docs: Sequence[str], k1: float = 0.9, b: float = 0.4):
        from scipy.sparse import csr_matrix

        counts = [Counter(tokens(d)) for d in docs]
        self.vocab: dict[str, int] = {}
        for c in counts:
            for t in c:
                self.vocab.setdefault(t, len(self.vocab))
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        avg = lengths.mean() if len(lengths) and lengths.mean() > 0 else 1.0
        df = np.zeros(len(self.vocab))
        rows, cols, tf = [], [], []
        for i, c in enumerate(counts):
            for t, n in c.items():
                j = self.vocab[t]
                rows.append(i)
                cols.append(j)
                tf.append(n)
                df[j] += 1
        n_docs = len(docs)
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        tf_arr = np.asarray(tf, dtype=np.float64)
        norm = k1 * (1 - b + b * lengths[np.asarray(rows, dtype=np.int64)] / avg) if rows else np.zeros(0)
        weights = idf[np.asarray(cols, dtype=np.int64)] * tf_arr * (k1 + 1) / (tf_arr + norm) if rows else tf_arr
        self.matrix = csr_matrix((weights, (rows, cols)), shape=(n_docs, max(1, len(self.vocab))))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(queries x documents) BM25 scores."""
        from scipy.sparse import csr_matrix

        rows, cols = [], []
        for i, q in enumerate(queries):
            for t in set(tokens(q)):
                if t in self.vocab:
                    rows.append(i)
                    cols.append(self.vocab[t])
        q = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(queries), self.matrix.shape[1]))
        return np.asarray((q @ self.matrix.T).todense())


def mine(queries: Sequence[str], docs: Sequence[str], relevant: Sequence[set[int]], k: int,
         *, batch: int = 1024) -> list[list[int]]:
    """For each query, the indices of the `k` documents BM25 ranks highest among those not in its
    `relevant` set (ties broken by document order). Fewer when the corpus has fewer."""
    if k <= 0:
        return [[] for _ in queries]
    index = BM25(docs)
    out: list[list[int]] = []
    for start in range(0, len(queries), batch):
        s = index.scores(queries[start:start + batch])
        for row, rel in zip(s, relevant[start:start + batch]):
            top = np.argsort(-row, kind="stable")[: k + len(rel)]
            out.append([int(j) for j in top if int(j) not in rel][:k])
    return out

