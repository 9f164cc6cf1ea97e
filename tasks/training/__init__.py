"""Training: one step loop for every stage of the recipe and every engine.

    steps.py       the batch of step b; the forward + backward of the embedding loss (eq. 1, with
                   GradCache and length buckets) and of the reranker loss (eq. 2), for any world size
    loop.py        the step loop (`fit`), the model a stage trains, `final/` and its summary
    sampling.py    which pairs make up batch b: mixed (permutations of all pairs) or task_balanced
    engines.py     one process / DDP / DeepSpeed: passes, gradient all-gather, backward, optimizer step
    checkpoint.py  the checkpoint format: write (atomic, fsynced), list, read, resume
    history.py     metrics.jsonl and the loss plot
    ray_train.py   the Ray Train launch (`train_distributed`) and its per-worker function

`train` is the entry point: the engine is configuration (`distributed.engine`).
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import ModelConfig, TrainConfig
from tasks.data import Pair
from tasks.training.checkpoint import CheckpointError, list_checkpoints
from tasks.training.engines import lr_lambda
from tasks.training.loop import TrainingInterrupted, TrainResult, train_local
from tasks.training.ray_train import train_distributed
from tasks.training.steps import (
    EmbeddingBatch, batch_indices, embed_by_length, embedding_batch, embedding_step, reranker_step,
)

__all__ = [
    "CheckpointError", "EmbeddingBatch", "TrainResult", "TrainingInterrupted", "batch_indices",
    "embed_by_length", "embedding_batch", "embedding_step", "list_checkpoints", "lr_lambda", "reranker_step",
    "train", "train_distributed",
]


def train(cfg: TrainConfig, model_cfg: ModelConfig | str, out_dir: str | Path, *,
          init: str | Path | None = None, pairs: list[Pair] | None = None, data_root: str | Path | None = None,
          progress: bool = True, device=None,
          stop_after: int | None = None) -> TrainResult:
    """Train one stage. `init` = a saved model folder to start from (e.g. the stage-1 model);
    otherwise `model_cfg`'s backbone. `pairs` overrides `cfg.data`. Resumes from the newest
    checkpoint in `out_dir`; returns at once if `out_dir/final` is complete. `stop_after`
    stops (as if interrupted) after that many steps: for tests of resumption.
    `cfg.distributed.engine: ray_train` runs the same loop on Ray Train workers instead."""
    if cfg.distributed.engine == "ray_train":
        return train_distributed(cfg, model_cfg, out_dir, init=init, pairs=pairs, data_root=data_root,
                                 stop_after=stop_after)
    return train_local(cfg, model_cfg, out_dir, init=init, pairs=pairs, data_root=data_root, progress=progress,
                       device=device, stop_after=stop_after)
