"""What makes the default (smol) run's embedder good? Train one embedding stage with the project's
own trainer and score every checkpoint on two full dev sets, with the instruction on.

The experiment behind docs/smol-default.md (and conf/presets/smol.yaml). Every run is the real
`tasks.training.train` on the preset's config plus the `key=value` overrides given, so the only
variables are the ones on the command line. After training, each kept checkpoint (and the final
model) is encoded and scored:

- stsb-en-dev: STS Benchmark *dev* split as retrieval (sentence1 of pairs scored >= 4 against all
  1,467 sentence2 of the split; 264 queries), queries with the instruction "Retrieve semantically
  similar text." and, for diagnosis, without it;
- nq-msmarco-hardneg: 20 real queries against their positives and 1,226 mined hard negatives, and
  for diagnosis with no instruction and with XQuAD's question -> Wikipedia one (stage 2 trains it).

nDCG@10 is computed here with numpy (binary relevance, one relevant document per query); each
main score comes with its standard error over the set's queries (`<set>/stderr`: what one set of
this size can resolve). Results go to `--out/results.json` and one line per checkpoint on stdout.

Examples (each a few minutes on 2 CPU cores):

    python bench/smol_default.py --out /tmp/e1 stage2.steps=60 model.num_layers=10
    python bench/smol_default.py --out /tmp/e2 --stage stage1 --synthetic runs/datasets/... stage1.steps=40
    python bench/smol_default.py --out /tmp/e3 --merge 50,100,150 stage2.checkpoint_every=25 stage2.keep_checkpoints=6
    python bench/smol_default.py --out /tmp/r1 --stage reranker --no-train --init RERANKER --first-stage EMBEDDER \
        --depths 10,20,50

A finished training in --out is reused (the trainer resumes and finds it done), so a second
command with other --merge steps only merges and scores.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

STS_INSTRUCTION = "Retrieve semantically similar text."
NQ_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUESTION_INSTRUCTION = "Given a question, retrieve Wikipedia passages that answer the question"  # XQuAD's, in stage 2


def stsb_dev(tsv: Path, min_score: float = 4.0) -> tuple[list[str], list[str], list[int]]:
    """(queries, corpus, index of each query's relevant document) of STS-B dev as retrieval."""
    queries, rel, corpus, index = [], [], [], {}
    with open(tsv, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] != "dev":
                continue
            s2 = row["sentence2"]
            if s2 not in index:
                index[s2] = len(corpus)
                corpus.append(s2)
            if float(row["score"]) >= min_score:
                queries.append(row["sentence1"])
                rel.append(index[s2])
    return queries, corpus, rel


def beir(folder: Path) -> tuple[list[str], list[str], list[set[int]]]:
    corpus, cid = [], {}
    for line in open(folder / "corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        cid[d["_id"]] = len(corpus)
        corpus.append(((d.get("title") or "") + " " + d["text"]).strip())
    qtext = {json.loads(x)["_id"]: json.loads(x)["text"] for x in open(folder / "queries.jsonl", encoding="utf-8")}
    rels: dict[str, set[int]] = {}
    for row in list(csv.reader(open(folder / "qrels" / "test.tsv"), delimiter="\t"))[1:]:
        if float(row[2]) > 0:
            rels.setdefault(row[0], set()).add(cid[row[1]])
    qids = sorted(rels)
    return [qtext[q] for q in qids], corpus, [rels[q] for q in qids]


def ndcg10(q: np.ndarray, d: np.ndarray, rel: list[set[int]]) -> float:
    return ndcg10_ranked(np.argsort(-(q @ d.T), axis=1), rel)


def ndcg10_with_stderr(q: np.ndarray, d: np.ndarray, rel: list[set[int]]) -> tuple[float, float]:
    """ndcg10 and its standard error over the queries: what one set of this size can resolve (on
    nq-msmarco-hardneg's 20 queries 0.05 to 0.07, docs/smol-default.md section 32)."""
    per_query = ndcg10_per_query(np.argsort(-(q @ d.T), axis=1), rel)
    return float(per_query.mean()), float(per_query.std(ddof=1) / math.sqrt(len(per_query)))


def score(model_dir: Path, sets: dict, batch_size: int = 32, autocast: str | None = None) -> dict[str, float]:
    """nDCG@10 per set, encoding under `autocast` (the preset's eval.autocast, as the pipeline scores)."""
    import torch

    from tasks.evaluation.encoders import with_autocast
    from tasks.models import Embedder

    torch.set_grad_enabled(False)
    model = with_autocast(Embedder.load(str(model_dir)), autocast)
    out = {}
    for name, (queries, corpus, rel, instruction) in sets.items():
        d = model.encode(corpus, batch_size=batch_size)
        q = model.encode(queries, instruction=instruction, is_query=True, batch_size=batch_size)
        out[name], out[name + "/stderr"] = ndcg10_with_stderr(q, d, rel)
        if name == "stsb-en-dev":
            out[name + "/no-instruction"] = ndcg10(model.encode(queries, is_query=True, batch_size=batch_size),
                                                   d, rel)
            # a symmetric task (SPEC 1): the sentences of the corpus get the instruction too, as the
            # smol preset's evaluation does (eval.symmetric)
            ds = model.encode(corpus, instruction=instruction, is_query=True, batch_size=batch_size)
            out[name + "/symmetric"], out[name + "/symmetric/stderr"] = ndcg10_with_stderr(q, ds, rel)
        if name == "nq-msmarco-hardneg":  # does the web-search instruction read worse than others?
            out[name + "/no-instruction"] = ndcg10(model.encode(queries, is_query=True, batch_size=batch_size), d, rel)
            out[name + "/question-instruction"] = ndcg10(
                model.encode(queries, instruction=QUESTION_INSTRUCTION, is_query=True, batch_size=batch_size), d, rel)
    torch.set_grad_enabled(True)
    return out


def rerank_score(reranker_dir: Path, embedder_dir: Path, sets: dict, top_k: int,
                 depths: list[int] | None = None, autocast: str | None = None,
                 both_orders: bool = True) -> dict[str, float]:
    """nDCG@10 of the embedder's ranking and of the reranker's order of its top_k, per set; with
    `depths`, also of the reranker's order of the top k for each k listed (scored once, at the
    deepest). STS-B dev's pairs are scored in both orders (`both_orders`, eval.rerank_symmetric)."""
    import torch

    from tasks.evaluation.encoders import with_autocast
    from tasks.models import Embedder, Reranker

    torch.set_grad_enabled(False)
    emb = with_autocast(Embedder.load(str(embedder_dir)), autocast)
    rr, out = with_autocast(Reranker.load(str(reranker_dir)), autocast), {}
    deepest = max([top_k, *(depths or [])])
    for name, (queries, corpus, rel, instruction) in sets.items():
        # STS-B symmetric, as the pipeline's evaluation ranks it (eval.symmetric)
        docs = (emb.encode(corpus, instruction=instruction, is_query=True) if name == "stsb-en-dev"
                else emb.encode(corpus))
        sim = emb.encode(queries, instruction=instruction, is_query=True) @ docs.T
        top = np.argsort(-sim, axis=1)[:, :deepest]
        pairs = [queries[i] for i in range(len(queries)) for _ in range(deepest)], [corpus[j] for row in top for j in row]
        scores = rr.score(*pairs, instruction=instruction).reshape(len(queries), deepest)
        if both_orders and name == "stsb-en-dev":  # a symmetric task, as the pipeline reranks it
            out[name + "/reranked-one-order"] = ndcg10_ranked(
                np.take_along_axis(top[:, :top_k], np.argsort(-scores[:, :top_k], axis=1), axis=1), rel)
            scores = (scores + rr.score(pairs[1], pairs[0], instruction=instruction).reshape(len(queries), deepest)) / 2
        reordered = lambda k: np.take_along_axis(top[:, :k], np.argsort(-scores[:, :k], axis=1), axis=1)
        out[name + "/embedder"] = ndcg10_ranked(top, rel)
        out[name + "/reranked"] = ndcg10_ranked(reordered(top_k), rel)
        # where the reranker gains and loses: queries whose first relevant document is at rank 1, and
        # how many it moves up or down; and a diagnostic (not the pipeline's score): the z-scored
        # reranker and embedder scores summed, weight 0.7 on the reranker
        first = lambda ranked: np.array([next((i for i, j in enumerate(row) if j in r), len(row))
                                         for row, r in zip(ranked[:, :top_k], rel)])
        before, after = first(top), first(reordered(top_k))
        out[name + "/rank1-embedder"], out[name + "/rank1-reranked"] = int((before == 0).sum()), int((after == 0).sum())
        out[name + "/moved-up"], out[name + "/moved-down"] = int((after < before).sum()), int((after > before).sum())
        z = lambda x: (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-9)
        fused = 0.7 * z(scores[:, :top_k]) + 0.3 * z(np.take_along_axis(sim, top[:, :top_k], axis=1))
        out[name + "/fused-diagnostic"] = ndcg10_ranked(np.take_along_axis(top[:, :top_k], np.argsort(-fused, axis=1), axis=1), rel)
        for k in depths or []:
            out[f"{name}/reranked@{k}"] = ndcg10_ranked(reordered(k), rel)
    torch.set_grad_enabled(True)
    return out


def ndcg10_per_query(ranked: np.ndarray, rel: list[set[int]]) -> np.ndarray:
    out = []
    for row, r in zip(ranked[:, :10], rel):
        dcg = sum(1 / math.log2(i + 2) for i, j in enumerate(row) if j in r)
        out.append(dcg / sum(1 / math.log2(i + 2) for i in range(min(10, len(r)))))
    return np.array(out)


def ndcg10_ranked(ranked: np.ndarray, rel: list[set[int]]) -> float:
    return float(np.mean(ndcg10_per_query(ranked, rel)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value (as for q3e)")
    p.add_argument("--preset", default="smol")
    p.add_argument("--config", action="append", type=Path, default=[],
                   help="YAML file(s) merged over the preset, before the overrides (e.g. a reranker.data list)")
    p.add_argument("--stage", default="stage2", choices=["stage1", "stage2", "reranker"])
    p.add_argument("--first-stage", default=None, help="reranker: the embedding model whose top-k it reranks")
    p.add_argument("--top-k", type=int, default=10, help="reranker: documents reranked per query")
    p.add_argument("--depths", default="", help="reranker: also score the reranker's order of the top k for "
                   "each k of this comma list (e.g. 10,20,50); with --no-train, --init is the reranker")
    p.add_argument("--sets", default="", help="score only these dev sets (comma list of stsb-en-dev, "
                   "nq-msmarco-hardneg; default both)")
    p.add_argument("--merge", action="append", default=[], metavar="STEPS",
                   help="after training, slerp-merge the kept checkpoints of these steps (e.g. 50,100,150; "
                        "repeatable) as the merge stage does and score each merge")
    p.add_argument("--init", default=None, help="a saved model folder to start from (e.g. a stage-1 model)")
    p.add_argument("--synthetic", action="append", default=[], help="folders of synthetic shards to add")
    p.add_argument("--extra", action="append", default=[], help="more training data: PATH[::LIMIT[::INSTRUCTION]]")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-train", action="store_true", help="only score --init (or the backbone)")
    p.add_argument("--all-checkpoints", action="store_true", help="score every kept checkpoint, not only the final model")
    args = p.parse_args(argv)
    if args.depths and args.stage != "reranker":
        p.error("--depths scores a reranker: give --stage reranker")
    if args.merge and args.no_train:
        p.error("--merge merges the checkpoints of a training: drop --no-train")

    from tasks.config import DataSource, load_config
    from tasks.training import train

    cfg = load_config(args.preset, args.overrides, files=args.config)
    q, c, r = stsb_dev(args.data / "sts-en" / "stsbenchmark-train-dev.tsv")
    sets = {"stsb-en-dev": (q, c, [{i} for i in r], STS_INSTRUCTION),
            "nq-msmarco-hardneg": (*beir(args.data / "beir" / "nq-msmarco-hardneg"), NQ_INSTRUCTION)}
    if args.sets:
        unknown = set(args.sets.split(",")) - set(sets)
        if unknown:
            raise SystemExit(f"--sets: unknown {sorted(unknown)}; known: {sorted(sets)}")
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"overrides": args.overrides, "stage": args.stage, "init": args.init, "checkpoints": {}}
    depths = [int(k) for k in args.depths.split(",") if k]
    if args.no_train and args.stage == "reranker":
        t0 = time.perf_counter()
        results["checkpoints"]["init"] = rerank_score(Path(args.init), Path(args.first_stage), sets, args.top_k,
                                                      depths, cfg.eval.autocast, cfg.eval.rerank_symmetric)
        results["eval_s"] = time.perf_counter() - t0
        print("init", json.dumps(results["checkpoints"]["init"]), flush=True)
    elif args.no_train:
        from tasks.models import Embedder

        target = args.out / "model"
        if not (target / "config.json").is_file():
            Embedder.load(args.init or cfg.model).save(target)
        t0 = time.perf_counter()
        results["checkpoints"]["init"] = score(target, sets, autocast=cfg.eval.autocast)
        results["eval_s"] = time.perf_counter() - t0
        print("init", json.dumps(results["checkpoints"]["init"]), flush=True)
    else:
        tcfg = getattr(cfg, args.stage)
        extra = []
        for spec in args.extra:
            path, limit, instruction = (spec.split("::") + [None, None])[:3]
            extra.append(DataSource(path=path, limit=int(limit) if limit else None, instruction=instruction))
        tcfg = tcfg.model_copy(update={"data": list(tcfg.data) + extra + [DataSource(path=s) for s in args.synthetic]})
        t0 = time.perf_counter()
        model_cfg = cfg.reranker_backbone if args.stage == "reranker" else cfg.model
        res = train(tcfg, model_cfg, args.out / "train", init=args.init, data_root=".", progress=True)
        results["train_s"] = time.perf_counter() - t0
        results["seconds_per_step"] = res.seconds_per_step
        results["losses"] = [round(h["loss"], 4) for h in res.history]
        t0 = time.perf_counter()
        for ck in [*(res.checkpoints[:-1] if args.all_checkpoints else []), res.final]:
            name = ck.parent.name if ck.name == "model" else ck.name
            results["checkpoints"][name] = (
                rerank_score(ck, Path(args.first_stage), sets, args.top_k, depths, cfg.eval.autocast,
                             cfg.eval.rerank_symmetric)
                if args.stage == "reranker" else score(ck, sets, autocast=cfg.eval.autocast))
            print(name, json.dumps(results["checkpoints"][name]), flush=True)
        for steps in args.merge:
            from tasks.merge import slerp_merge

            by_step = {int(c.parent.name.split("-")[1]): c for c in res.checkpoints}
            wanted = [int(s) for s in steps.split(",")]
            missing = [s for s in wanted if s not in by_step]
            if missing:
                raise SystemExit(f"--merge {steps}: no kept checkpoint at step(s) {missing}; kept: {sorted(by_step)} "
                                 "(raise keep_checkpoints, or checkpoint_every to divide them)")
            name = "merge-" + "-".join(map(str, wanted))
            merged = slerp_merge([by_step[s] for s in wanted], args.out / name)
            results["checkpoints"][name] = (
                rerank_score(merged, Path(args.first_stage), sets, args.top_k, depths, cfg.eval.autocast,
                             cfg.eval.rerank_symmetric)
                if args.stage == "reranker" else score(merged, sets, autocast=cfg.eval.autocast))
            print(name, json.dumps(results["checkpoints"][name]), flush=True)
        results["eval_s"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
