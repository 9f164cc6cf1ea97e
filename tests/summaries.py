"""Pipeline run summaries as flows/pipeline.py `_summarise` writes them, for the report tests, and
a reader of the Markdown tables `q3e report` prints."""

from __future__ import annotations

from tasks import report

COMMIT = "c5420f1d2e3b4a5968778695a4b3c2d1e0f9a8b7"
NQ, STS = "nq-msmarco-hardneg", "stsb-en-traindev"


def make_summary(run_id: str = "a1b2c3d4e5f60718293a4b5c6d7e8f90", *, seed: int = 0, commit: str = COMMIT,
                 shift: float = 0.0) -> dict:
    """A summary as `_summarise` writes it (keys, nesting, the reranker's `/rerank` entries)."""
    scores = {
        "backbone": {NQ: 0.025, STS: 0.083},
        "stage1": {NQ: 0.085, STS: 0.078},       # below the backbone on STS: a FAIL
        "stage2": {NQ: 0.192, STS: 0.284},
        "merged": {NQ: 0.171 + shift, STS: 0.264 + shift},
        "reranker": {NQ: 0.171 + shift, f"{NQ}/rerank": 0.301 + shift, STS: 0.264 + shift},
    }
    names = ["synthesis", "stage1", "filter", "stage2", "merge", "reranker"]
    stages = [{"stage": s, "key": f"k{i}", "cached": i < 2, "wall_s": 10.0 * (i + 1),
               "compute_s": 0.0 if i < 2 else 9.0 * (i + 1)} for i, s in enumerate(names)]
    data = "9f8e7d6c5b4a39281706f5e4d3c2b1a0.dir"
    return {
        "run_id": run_id, "preset": "smol", "ablation": "full", "date": "2026-11-26T14:03:12+00:00",
        "git_commit": commit, "config_hash": f"cfg{seed:013d}", "dvc_data_md5": data,
        "config_hash_without_seeds": "0123456789abcdef",
        "seeds": {"seed": 0, "stage1.seed": 0, "stage2.seed": seed, "synth.seed": 0},
        "overrides": [f"stage2.seed={seed}", "reranker.enabled=true"], "config_files": [],
        "final_model": "merged", "final_model_path": "runs/artifacts/merge/k4/model", "reranker_path": "rr",
        "scores": scores, "checks": report.stage_checks(scores, "merged"),
        "results": {m: {t: {"main_score": v, "ndcg_at_10": v} for t, v in s.items()} for m, s in scores.items()},
        "synthesis": {"prompt_version": "2", "generator": "bundled:smollm2", "shards": 2, "passages": 16,
                      "accepted": 4, "rejected": 12, "acceptance_rate": 0.25, "llm_calls": 40,
                      "by_kind": {"bitext": {"accepted": 1, "rejected": 3},
                                  "retrieval": {"accepted": 3, "rejected": 9}},
                      "by_question_type": {"keywords": 2, "summary": 1}, "by_difficulty": {"university": 3},
                      "by_language": {"English": 3, "Chinese": 1}, "rejection_reasons": {"query/too_long": 12}},
        "train_pairs": {"stage1": 4, "stage2": 1004},
        "stages": stages, "wall_s": 300.0, "compute_s": 162.0, "overhead_s": 138.0,
        "data_md5": data, "tracking_uri": "sqlite:///runs/mlflow.db",
    }


def table_rows(md: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with `header_start`."""
    lines = md.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]
