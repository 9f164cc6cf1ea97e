"""Task instructions: task name -> the instruction prefixed to its queries (conf/task_prompts.json
plus user overrides)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Mapping

from tasks.config import CONF_DIR
from tasks.data import DataError
from tasks.data.jsonl import read_json_object
from tasks.models import DEFAULT_INSTRUCTION

PROMPTS_FILE = CONF_DIR / "task_prompts.json"  # Q3E_CONF_DIR moves it with the rest of conf/


class TaskPrompts:
    """Task name -> instruction. Lookup: exact task name, glob key (`CQADupstack*`), the task's own
    mteb prompt, its task type (`Retrieval`, `STS`, ...), then `default`."""

    def __init__(self, table: Mapping[str, str]):
        self.table = {k: v for k, v in table.items() if not k.startswith("_")}
        self.globs = [k for k in self.table if any(c in k for c in "*?[")]

    @classmethod
    def load(cls, overrides: Mapping[str, str] | str | Path | None = None,
             base: str | Path | None = PROMPTS_FILE) -> "TaskPrompts":
        """The bundled table (conf/task_prompts.json) updated with `overrides` (a dict or a JSON file)."""
        table = _read_prompts(Path(base)) if base else {}
        if isinstance(overrides, (str, Path)):
            overrides = _read_prompts(Path(overrides))
        return cls({**table, **(overrides or {})})

    def instruction(self, task_name: str, task_type: str | None = None, task_prompt: Any = None) -> str:
        if task_name in self.table:
            return self.table[task_name]
        for key in self.globs:
            if fnmatch.fnmatchcase(task_name, key):
                return self.table[key]
        if isinstance(task_prompt, dict):
            task_prompt = task_prompt.get("query")
        if isinstance(task_prompt, str) and task_prompt:
            return task_prompt
        if task_type and task_type in self.table:
            return self.table[task_type]
        return self.table.get("default", DEFAULT_INSTRUCTION)

    def for_task(self, metadata) -> str:
        """The instruction for an mteb `TaskMetadata`."""
        return self.instruction(metadata.name, metadata.type, metadata.prompt)


def _read_prompts(path: Path) -> dict[str, str]:
    data = read_json_object(path, "task prompts file", "of task name -> instruction")
    for k, v in data.items():
        if not k.startswith("_") and not isinstance(v, str):
            raise DataError(f"{path}: field {k!r} must be a string instruction, got {type(v).__name__}")
    return data
