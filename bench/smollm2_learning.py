"""Does an embedding model learn from this backbone, with this loss and learning rate?

The experiment behind docs/smollm2-training.md (and the smol preset's learning rate and
`loss.plain_warmup_steps`). A plain training loop over the project's own `Embedder` and
`improved_infonce`, so the only variables are the ones on the command line:

- train: SNLI dev triplets (premise -> entailed hypothesis), shuffled with seed 0, batch `--batch`;
- held-out check: the first `--eval-n` SNLI test triplets, encoded with the same model; reports the
  in-batch top-1 (the premise's own hypothesis ranked first among all `--eval-n`: chance is
  1/eval-n), the triplet accuracy (entailed hypothesis above the contradiction), and the mean cosine
  between queries (qq), between documents (dd), of the pairs (diag) and of all query-document
  pairs (off). qq, dd and off near 1.0 = every text has the same embedding (collapse).

Examples (each ~3-7 minutes on 2 CPU cores):

    python bench/smollm2_learning.py --lr 2e-5 --loss plain --steps 80 --eval-every 20
    python bench/smollm2_learning.py --lr 1e-4 --loss full --steps 40 --plain-warmup 20

all-MiniLM-L6-v2 reaches top-1 0.83 / triplet 0.95 on the same 64 test triplets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tasks.config import LoraConfig, load_config  # noqa: E402
from tasks.losses import improved_infonce  # noqa: E402
from tasks.models import Embedder, format_query  # noqa: E402

INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"
LOSSES = {
    "plain": dict(qq=False, dd=False, mask_false_negatives=False),  # q-d InfoNCE
    "nomask": dict(mask_false_negatives=False),                     # eq. 1 without the mask
    "full": {},                                                     # eq. 1
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--preset", default="smol", help="model preset (conf/presets)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=3, help="linear lr warm-up steps, then constant")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd = momentum 0.9")
    p.add_argument("--loss", choices=sorted(LOSSES), default="full", help="plain q-d InfoNCE, eq. 1 "
                   "without the false-negative mask, or eq. 1")
    p.add_argument("--plain-warmup", type=int, default=0, help="first N steps with the plain loss")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--hard-negatives", type=int, default=0, choices=[0, 1])
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--no-instruction", action="store_true", help="queries without the instruction")
    p.add_argument("--end-token", default=None, help="override model.end_token")
    p.add_argument("--query-length", type=int, default=40)
    p.add_argument("--doc-length", type=int, default=48)
    p.add_argument("--eval-n", type=int, default=64, help="held-out triplets")
    p.add_argument("--eval-every", type=int, default=0, help="also check every N steps")
    p.add_argument("--threads", type=int, default=int(os.environ.get("NT", "2")))
    p.add_argument("--out", type=Path, default=None, help="write the log as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.preset, [f"model.end_token={a.end_token}"] if a.end_token else [])
    model = Embedder.load(cfg.model, lora=LoraConfig(enabled=True, r=a.lora, alpha=2 * a.lora) if a.lora else None)
    read = lambda name: [json.loads(line) for line in open(a.data / "triplets-en" / name)]  # noqa: E731
    train_rows, test = read("snli_dev_triplets.jsonl"), read("snli_test_triplets.jsonl")[: a.eval_n]
    random.Random(0).shuffle(train_rows)
    instruction = None if a.no_instruction else INSTRUCTION
    fq = lambda text: format_query(text, instruction)  # noqa: E731

    @torch.no_grad()
    def check() -> dict:
        model.eval()
        q = model.embed([fq(r["anchor"]) for r in test], a.query_length)
        p = model.embed([r["positive"] for r in test], a.doc_length)
        n = model.embed([r["negative"] for r in test], a.doc_length)
        model.train()
        s = q @ p.T
        return {"top1": (s.argmax(1) == torch.arange(len(test))).float().mean().item(),
                "triplet": ((q * p).sum(1) > (q * n).sum(1)).float().mean().item(),
                "qq": (q @ q.T).mean().item(), "dd": (p @ p.T).mean().item(),
                "diag": s.diag().mean().item(), "off": s.mean().item()}

    log = {"args": {k: str(v) for k, v in vars(a).items()}, "checks": {0: check()}, "steps": []}
    print("step 0", log["checks"][0], flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0) if a.optimizer == "adamw"
           else torch.optim.SGD(params, lr=a.lr, momentum=0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.warmup)))
    model.train()
    t0 = time.time()
    for step in range(a.steps):
        rows = train_rows[step * a.batch:(step + 1) * a.batch]
        q = model.embed([fq(r["anchor"]) for r in rows], a.query_length)
        p = model.embed([r["positive"] for r in rows], a.doc_length)
        neg = model.embed([r["negative"] for r in rows], a.doc_length).unsqueeze(1) if a.hard_negatives else None
        switches = LOSSES["plain" if step < a.plain_warmup else a.loss]
        loss = improved_infonce(q, p, neg, temperature=a.temperature, **switches)
        opt.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        sched.step()
        rec = {"step": step + 1, "loss": round(loss.item(), 4), "grad_norm": round(grad_norm, 3),
               "s_per_step": round((time.time() - t0) / (step + 1), 2)}
        log["steps"].append(rec)
        print(rec, flush=True)
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            log["checks"][step + 1] = check()
            print("step", step + 1, log["checks"][step + 1], flush=True)
    log["checks"][a.steps] = check()
    print("step", a.steps, log["checks"][a.steps], flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
