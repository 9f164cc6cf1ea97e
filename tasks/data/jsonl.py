"""Reading JSONL line by line, and the checks every data reader shares: an error names the file,
the line and the field (`DataError`), or, with `skip_bad_lines`, the line is skipped and counted
(`ReadReport`) and the count logged once the file is read."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` and names the field."""


@dataclass
class ReadReport:
    path: str
    lines: int = 0
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the error messages of the first skipped lines

    MAX_MESSAGES = 100  # a huge, dirty file must not fill memory with messages


def skip_or_raise(error: str, skip_bad_lines: bool, report: ReadReport) -> None:
    """Raise `error` as a DataError, or (skip_bad_lines) count it in `report`."""
    if not skip_bad_lines:
        raise DataError(error)
    report.n_skipped += 1
    if len(report.skipped) < report.MAX_MESSAGES:
        report.skipped.append(error)


def log_skipped(report: ReadReport) -> None:
    if report.n_skipped:
        log.warning("%s: skipped %d bad line(s) of %d (skip_bad_lines); first: %s", report.path,
                    report.n_skipped, report.lines, report.skipped[0])


def parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """The JSON object on one line of a JSONL file; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    text = text.lstrip("\ufeff")  # a byte-order mark left by some editors
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting too deep
        raise DataError(f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def jsonl_records(path: Path, skip_bad_lines: bool, report: ReadReport) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset of the line, object) for each non-blank line, streamed."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            report.lines = lineno
            try:
                obj = parse_line(raw, f"{path}:{lineno}")
            except DataError as e:
                skip_or_raise(str(e), skip_bad_lines, report)
                continue
            if obj is not None:
                yield lineno, start, obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; streams, never loads the whole file."""
    path = Path(path)
    for lineno, _, obj in jsonl_records(path, False, ReadReport(str(path))):
        yield lineno, obj


def check_str(value: Any, name: str, where: str) -> str:
    """`value`, checked to be non-empty text; `name` is the field as the message spells it."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can escape a lone surrogate (\\ud800), which is no text
        raise DataError(f"{where}: field {name} is not valid Unicode (lone surrogate)") from None
    return value


def str_field(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    """The text of field `key` of a record (None when absent and not `required`)."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    return check_str(obj[key], repr(key), where)


def str_list_field(obj: dict, key: str, where: str) -> list[str]:
    """The texts of field `key` of a record: a list of strings, one string, or absent ([])."""
    value = obj.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of strings, got {type(value).__name__}")
    return [check_str(v, f"{key!r}[{i}]", where) for i, v in enumerate(value)]


def read_json_object(path: Path, what: str, shape: str) -> dict[str, Any]:
    """A JSON file holding one object; errors name the file (and line): `what` not found,
    malformed JSON, or not an object (`shape` says what the object maps)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {shape}")
    return data
