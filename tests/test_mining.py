"""BM25 hard-negative mining (tasks/mining.py): scores against a plain loop over the Okapi formula,
what is mined (never a relevant document, judged negatives first), and XQuAD as the default uses it."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from tasks.config import DataSource
from tasks.data import DataError, load_source
from tasks.mining import BM25, mine, tokens

DOCS = ["The Panthers defense gave up just 308 points and led the league in interceptions.",
        "Denver beat Carolina in Super Bowl 50; the Broncos defense was the best in the league.",
        "Chloroplasts are organelles that conduct photosynthesis in plants and algae.",
        "黑豹队的防守只丢了 308分，在联赛中排名第六。",
        "叶绿体是植物细胞中进行光合作用的细胞器。"]


def reference_bm25(query: str, docs: list[str], k1: float = 0.9, b: float = 0.4) -> list[float]:
    """Okapi BM25, term by term, as in Robertson & Zaragoza (Lucene's idf: log(1 + (N - df + .5) / (df + .5)))."""
    toks = [tokens(d) for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    out = []
    for t in toks:
        tf, score = Counter(t), 0.0
        for term in set(tokens(query)):
            df = sum(term in set(u) for u in toks)
            if tf[term]:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                score += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(t) / avg))
        out.append(score)
    return out


def test_bm25_scores_equal_the_formula_term_by_term():
    queries = ["How many points did the Panthers defense give up?", "光合作用在哪里进行", "Broncos league defense",
               "nothing matches zzz"]
    got = BM25(DOCS).scores(queries)
    want = np.array([reference_bm25(q, DOCS) for q in queries])
    assert got.shape == (4, 5) and np.allclose(got, want, atol=1e-12)
    assert got[0].argmax() == 0 and got[1].argmax() == 4 and not got[3].any()
    assert tokens("光合作用 in the Plants") == ["光", "合", "作", "用", "plants"]  # CJK by character, stop words out


def test_mining_returns_the_top_documents_that_are_not_relevant():
    found = mine(["Panthers defense points", "光合作用"], DOCS, [{0}, {4, 2}], k=2)
    ref = reference_bm25("Panthers defense points", DOCS)
    assert found[0] == [j for j in sorted(range(5), key=lambda j: -ref[j]) if j != 0][:2]  # ties: corpus order
    assert found[0][0] == 1  # the Broncos document shares "defense"
    assert 0 not in found[0] and not {4, 2} & set(found[1]) and len(found[1]) == 2
    assert mine(["x"], DOCS, [set()], k=0) == [[]] and len(mine(["x"], DOCS[:2], [{0}], k=5)[0]) == 1


def _beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"{q}\t{c}\t{s}\n" for q, c, s in qrels))
    return folder


def test_judged_negatives_come_first_and_mining_tops_them_up(tmp_path):
    folder = _beir(tmp_path / "b", {f"d{i}": t for i, t in enumerate(DOCS)},
                   {"q0": "Panthers defense points league", "q1": "photosynthesis organelles"},
                   [("q0", "d0", 1), ("q0", "d2", 0), ("q1", "d2", 1)])
    plain = load_source(DataSource(path=str(folder)))
    assert [p.negatives for p in plain] == [(DOCS[2],), ()]
    mined = load_source(DataSource(path=str(folder), mine_negatives=2))
    assert mined[0].negatives == (DOCS[2], DOCS[1])  # the judged one, then BM25's best other document
    assert len(mined[1].negatives) == 2 and DOCS[2] not in mined[1].negatives
    assert [p.positive for p in mined] == [p.positive for p in plain]


def test_mining_on_a_pairs_file_is_refused_naming_it(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"query": "q", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: mine_negatives needs a BEIR folder"):
        load_source(DataSource(path=str(f), mine_negatives=1))


def test_xquad_gets_hard_negatives_from_its_own_corpus(shared_data):
    pairs = load_source(DataSource(path=str(shared_data / "beir" / "xquad" / "en"), mine_negatives=3))
    assert len(pairs) == 1190 and all(len(p.negatives) == 3 and p.positive not in p.negatives for p in pairs)
    # many come from the positive's own Wikipedia article (the title starts each paragraph): topical negatives
    same = sum(n.split()[0] == p.positive.split()[0] for p in pairs for n in p.negatives)
    assert same / (3 * len(pairs)) > 0.25
    # and they rank above a random paragraph for their query
    index = BM25(sorted({p.positive for p in pairs}))
    assert np.mean([index.scores([p.query])[0].max() > 0 for p in pairs[:50]]) > 0.9
