"""Baseline figures for the evaluation stage (run once, several minutes on 2 CPU cores):

1. nDCG@10 through mteb (tasks.evaluation) of the untrained SmolLM2-135M backbone (last-token pooling,
   task instructions on queries) and of all-MiniLM-L6-v2 (SentenceTransformer) on
   - beir/nq-msmarco-hardneg (all 20 queries, 1246 documents),
   - beir/stsb-en-traindev, 200 queries (fixed seed) with every judged document plus a fixed random
     sample of the others, 1000 documents in all.
2. Encoding throughput (texts/s) of `Embedder.encode` vs `SentenceTransformer.encode` on the SAME
   SmolLM2 weights (exported with `Embedder.save`, loaded back by sentence-transformers), same 256
   documents, same batch size and max length: one warm-up each, then 3 alternating runs, median.

Usage: nice python bench/eval_baselines.py [--data ../shared/data] [--out bench/results/eval_baselines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.config import EvalConfig, ModelConfig  # noqa: E402
from tasks.data import atomic_write_text, doc_text, load_beir  # noqa: E402
from tasks.evaluation.cache import EmbeddingCache  # noqa: E402
from tasks.evaluation.local_tasks import beir_task  # noqa: E402
from tasks.evaluation.run import evaluate_model  # noqa: E402
from tasks.models import Embedder  # noqa: E402

MODELS = {"smollm2-135m (untrained, last token)": "bundled:smollm2",
          "all-MiniLM-L6-v2 (sentence-transformers)": "bundled:all-minilm-l6-v2"}


def quality(data: Path, work: Path) -> dict:
    out: dict = {}
    for label, spec in MODELS.items():
        tasks = [beir_task(data / "beir/nq-msmarco-hardneg"),
                 beir_task(data / "beir/stsb-en-traindev", name="stsb-en-traindev-200q",
                           max_queries=200, max_corpus=1000, seed=0)]
        t0 = time.perf_counter()
        # two differently subsampled folders: ready task objects, and no task set from the config
        res = evaluate_model(spec, EvalConfig(task_dirs=[]), extra_tasks=tasks, out=work / f"{spec}.json",
                             show=False, embedding_cache=EmbeddingCache(work / "emb"),
                             prompts={"stsb-en-traindev-200q": "Retrieve semantically similar text."})
        seconds = time.perf_counter() - t0
        record = json.loads((work / f"{spec}.json").read_text())
        out[label] = {"model": spec, "seconds": round(seconds, 1), "instructions": record["instructions"],
                      "tasks": record["task_descriptions"]}
        for t in tasks:
            name = t.metadata.name
            out[label][name] = {k: res[name][k] for k in ("ndcg_at_10", "mrr_at_10", "recall_at_100")}
        print(f"{label}: nq nDCG@10 {res['nq-msmarco-hardneg']['ndcg_at_10']:.4f}, stsb-200q nDCG@10 "
              f"{res['stsb-en-traindev-200q']['ndcg_at_10']:.4f} ({seconds:.0f} s)", flush=True)
    return out


def throughput(data: Path, work: Path, n_texts: int = 256, batch_size: int = 32, repeats: int = 3) -> dict:
    from sentence_transformers import SentenceTransformer

    beir = load_beir(data / "beir/nq-msmarco-hardneg")
    texts = [doc_text(*beir.corpus[c]) for c in list(beir.corpus)[:n_texts]]
    emb = Embedder.load(ModelConfig(backbone="bundled:smollm2", dtype="float32"), device="cpu")
    folder = emb.save(work / "smollm2-st")
    st = SentenceTransformer(str(folder), device="cpu")
    max_len = emb.cfg.max_doc_length
    assert st.max_seq_length == max_len, (st.max_seq_length, max_len)

    def ours() -> np.ndarray:
        return emb.encode(texts, batch_size=batch_size, max_length=max_len)

    def theirs() -> np.ndarray:
        return st.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)

    a, b = ours(), theirs()  # warm-up, and the two must agree
    agree = float(np.min(np.sum(a * b, axis=1)))
    times: dict[str, list[float]] = {"Embedder.encode": [], "SentenceTransformer.encode": []}
    for _ in range(repeats):  # alternate so background load hits both alike
        for name, fn in (("Embedder.encode", ours), ("SentenceTransformer.encode", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens = sum(len(x) for x in emb.token_ids(texts, max_len))
    return {
        "texts": n_texts, "batch_size": batch_size, "max_length": max_len, "tokens": tokens,
        "threads": torch.get_num_threads(), "min_cosine_between_the_two": round(agree, 6),
        "runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "texts_per_s": {k: round(n_texts / statistics.median(v), 1) for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_baselines.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        q = quality(args.data, work)
        t = throughput(args.data, work)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "ndcg": q, "throughput": t}

    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="nDCG@10 through mteb (untrained baselines)")
    for col in ("model", "nq-msmarco-hardneg (20 q / 1246 d)", "stsb-en-traindev (200 q / 1000 d)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, r in q.items():
        table.add_row(label, f"{r['nq-msmarco-hardneg']['ndcg_at_10']:.4f}",
                      f"{r['stsb-en-traindev-200q']['ndcg_at_10']:.4f}")
    console.print(table)
    tt = Table(title=f"encoding throughput, SmolLM2-135M, {t['texts']} docs, batch {t['batch_size']}, "
                     f"max {t['max_length']} tokens, {t['threads']} threads (median of 3)")
    tt.add_column("encoder")
    tt.add_column("texts/s", justify="right")
    tt.add_column("runs (s)", justify="right")
    for name, v in t["texts_per_s"].items():
        tt.add_row(name, f"{v:.1f}", " ".join(f"{x:.2f}" for x in t["runs_s"][name]))
    console.print(tt)
    console.print(f"embeddings agree: min cosine {t['min_cosine_between_the_two']}")

    atomic_write_text(args.out, json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
