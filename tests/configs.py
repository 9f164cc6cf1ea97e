"""The micro configurations several test modules run: the pipeline's overrides for a whole run on
the real data with a scripted LLM endpoint, a synthesis config on real passages, and the empty DVC
project a flow runs in."""

from __future__ import annotations

from pathlib import Path

from tasks.config import SynthConfig, load_config

PASSAGES = "passages/en-nq-msmarco.jsonl"


def pipeline_overrides(shared_data: Path, llm_url: str, *extra: str) -> list[str]:
    """`key=value` overrides of the micro preset: the data the flow needs and nothing more, synthesis
    through the OpenAI-compatible endpoint at `llm_url`, small training sets; `extra` goes last."""
    return [
        f"data.source={shared_data}",
        "data.include=[passages/en-nq-msmarco.jsonl, personas/personahub-5k.txt, triplets-en, beir/nq-msmarco-hardneg]",
        "data.derived=[]",
        "synth.generator.backend=openai", f"synth.generator.base_url={llm_url}", "synth.generator.model=scripted",
        "synth.num_passages=12", "synth.shard_size=6",
        "stage2.data=[{path: data/triplets-en/snli_dev_triplets.jsonl, limit: 200}]",
        "reranker.data=[{path: data/triplets-en/snli_dev_triplets.jsonl, limit: 100}]",
        "filter.threshold=0.2",
        *extra,
    ]


def synth_cfg(shared_data: Path, personas: Path, **update) -> SynthConfig:
    """The micro preset's synthesis settings on the first 8 real passages (shards of 2), with
    `update` applied; `generator={...}` updates the generator's settings key by key."""
    base = load_config("micro").synth.model_dump()
    base.update(passages=[str(shared_data / PASSAGES)], personas=str(personas), num_passages=8, shard_size=2,
                passage_order="file")
    gen = base["generator"] | update.pop("generator", {})
    return SynthConfig.model_validate(base | update | {"generator": gen})


def dvc_project(root: Path) -> Path:
    """`root`, an empty folder, initialised as a DVC project (no git), where a flow keeps data/, runs/,
    datasets/."""
    from dvc.repo import Repo

    Repo.init(str(root), no_scm=True)
    return root
