"""GPU benchmark: the training core and the encoder on a Qwen3-0.6B-shaped model (random init, bf16).

Measures, on whatever CUDA device is present:
- the bf16 matmul peak of this device (8192^3 products), the denominator of MFU;
- training throughput (pairs/s, tokens/s), peak memory and MFU of the project's trainer step
  (full improved InfoNCE, 1 hard negative) at batch 16/64/256, end to end and with GradCache;
- encoding throughput of `Embedder.encode` vs `SentenceTransformer.encode` on the same exported
  model and texts.

    python bench/gpu.py --tokenizer DIR --out results.json

FLOPs per trained token follow the usual convention (PaLM appendix B): 6 N + 12 L d_attn T,
N = non-embedding parameters, T = sequence length; GradCache adds one forward (8 N): the MFU
column counts model FLOPs (6 N) only, so the extra forward shows up as lower MFU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time

import torch


def sync():
    torch.cuda.synchronize()


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build(tokenizer_dir: str, q_len: int, d_len: int):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from tasks.config import ModelConfig
    from tasks.models import Embedder

    cfg = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen3Model(cfg).to("cuda", torch.bfloat16)
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    mcfg = ModelConfig(backbone="qwen3-0.6b-shaped", max_query_length=q_len, max_doc_length=d_len, dtype="bfloat16")
    return Embedder(model, tok, cfg=mcfg, source="random"), cfg


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ("model data train query document search vector cosine layer token batch paper river city music "
             "science history energy market health language system network garden winter summer").split()
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def train_bench(emb, arch, batch: int, mini: int | None, q_len: int, d_len: int, steps: int = 4) -> dict:
    from tasks.config import TrainConfig
    from tasks.data import Pair
    from tasks.training import embedding_batch, embedding_step

    pairs = [Pair(q, p, (n,), "Given a web search query, retrieve relevant passages")
             for q, p, n in zip(texts(batch, q_len, 1), texts(batch, d_len, 2), texts(batch, d_len, 3))]
    cfg = TrainConfig(batch_size=batch, hard_negatives=1, mini_batch_size=mini)
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5, fused=True)
    emb.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for step in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            embedding_step(emb, embedding_batch(pairs, 1, 0, step), cfg, 1.0)
            opt.step()
            sync()
            if step:  # the first step is warm-up
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"batch": batch, "gradcache_chunk": mini, "oom": True}
    dt = statistics.median(times)
    tokens = batch * (q_len + 2 * d_len)
    n_params = sum(p.numel() for n, p in emb.backbone.named_parameters() if "embed_tokens" not in n)
    d_attn = arch.num_attention_heads * arch.head_dim
    flops_per_token = 6 * n_params + 12 * arch.num_hidden_layers * d_attn * ((q_len + 2 * d_len) / 3)
    flops = flops_per_token * tokens
    opt.zero_grad(set_to_none=True)
    del opt
    torch.cuda.empty_cache()
    return {"batch": batch, "gradcache_chunk": mini, "step_s": dt, "pairs_per_s": batch / dt,
            "tokens_per_s": tokens / dt, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "model_tflops": flops / dt / 1e12, "oom": False}


def encode_bench(emb, n: int, d_len: int, batch: int) -> dict:
    from sentence_transformers import SentenceTransformer

    docs = texts(n, d_len, 9)
    emb.eval()
    with tempfile.TemporaryDirectory() as tmp:
        emb.save(tmp)
        st = SentenceTransformer(tmp, device="cuda")
        st.to(torch.bfloat16)
        st.max_seq_length = d_len
        ours, theirs = [], []
        emb.encode(docs[:batch], batch_size=batch)
        st.encode(docs[:batch], batch_size=batch)
        for _ in range(3):  # alternate, median of 3
            sync(); t0 = time.perf_counter(); a = emb.encode(docs, batch_size=batch); sync()
            ours.append(time.perf_counter() - t0)
            sync(); t0 = time.perf_counter(); b = st.encode(docs, batch_size=batch, convert_to_numpy=True); sync()
            theirs.append(time.perf_counter() - t0)
        import numpy as np

        agree = float(np.mean(np.sum(a * b, axis=1)))
    return {"texts": n, "tokens_per_text": d_len, "batch": batch, "ours_texts_per_s": n / statistics.median(ours),
            "st_texts_per_s": n / statistics.median(theirs),
            "speedup": statistics.median(theirs) / statistics.median(ours), "mean_cosine_ours_vs_st": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder with <|endoftext|>")
    ap.add_argument("--out", required=True)
    ap.add_argument("--q-len", type=int, default=64)
    ap.add_argument("--d-len", type=int, default=256)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_properties(0)
    peak = matmul_peak()
    print(f"device {dev.name}, {dev.total_memory / 2**30:.0f} GiB; bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    emb, arch = build(args.tokenizer, args.q_len, args.d_len)
    rows = []
    for batch, mini in ((16, None), (64, None), (64, 32), (256, None), (256, 32)):
        r = train_bench(emb, arch, batch, mini, args.q_len, args.d_len)
        if not r["oom"]:
            r["mfu"] = r["model_tflops"] / peak
        rows.append(r)
        print(json.dumps(r), flush=True)
    enc = encode_bench(emb, 4096, args.d_len, 128)
    print(json.dumps(enc), flush=True)
    print(f"\n{'batch':>6} {'gradcache':>9} {'pairs/s':>9} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6}")
    for r in rows:
        if r["oom"]:
            print(f"{r['batch']:>6} {str(r['gradcache_chunk']):>9} {'OOM':>9}")
        else:
            print(f"{r['batch']:>6} {str(r['gradcache_chunk']):>9} {r['pairs_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_mem_gib']:>9.1f} {r['mfu']:>6.1%}")
    print(f"\nencode {enc['texts']} x {enc['tokens_per_text']} tokens: ours {enc['ours_texts_per_s']:.0f} texts/s, "
          f"SentenceTransformer {enc['st_texts_per_s']:.0f} texts/s, ratio {enc['speedup']:.2f}x")
    result = {"device": dev.name, "torch": torch.__version__, "python": platform.python_version(),
              "matmul_peak_tflops": peak, "model": "Qwen3-0.6B-shaped (random init, bf16, sdpa)",
              "q_len": args.q_len, "d_len": args.d_len, "hard_negatives": 1, "train": rows, "encode": enc}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
