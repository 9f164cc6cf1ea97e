"""Lenient parsing of the LLM's JSON answers: `Reject` (an unusable answer and its short reason),
recovery of the JSON object from chatty or broken output, field lookup by aliases, and the matching
of a chosen option or character to what the prompt offered."""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Sequence


class Reject(ValueError):
    """An LLM answer that cannot be used; `code` is the short reason counted in stats.json."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.S)


def _first_object(text: str) -> str | None:
    """The first balanced {...} block (braces counted, strings ignored); an unclosed one is closed."""
    start = text.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start: i + 1]
    tail = text[start:].rstrip().rstrip(",")
    return tail + ('"}' if tail.count('"') % 2 else "}")


def _loads(block: str) -> dict | None:
    for attempt in (block, re.sub(r",\s*([}\]])", r"\1", block)):
        try:
            obj = json.loads(attempt)
        except json.JSONDecodeError:
            try:  # single quotes, True/None: a Python literal
                obj = ast.literal_eval(attempt)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        if isinstance(obj, dict):
            return obj
    return None


def _key_scan(text: str, keys: Sequence[str]) -> dict | None:
    """Last resort for `{"Character": "a fan of "Lost" who...", ...}` (unescaped quotes): each
    expected key's value runs to the next expected key or to the closing brace."""
    found = []
    for key in keys:
        m = re.search(r"[\"']?" + re.escape(key).replace("_", "[_ ]?") + r"[\"']?\s*:\s*", text, re.I)
        if m:
            found.append((m.start(), m.end(), key))
    if not found:
        return None
    found.sort()
    out = {}
    for n, (_, end, key) in enumerate(found):
        stop = found[n + 1][0] if n + 1 < len(found) else len(text)
        value = text[end:stop]
        if n + 1 == len(found):
            value = re.split(r"\}|\n", value, maxsplit=1)[0]
        value = value.strip().rstrip(",").strip()
        if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
            value = value[1:-1]
        out[key] = value.strip()
    return out


def parse_json_answer(text: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A dict from an LLM answer: tolerates code fences, text before/after the object, single
    quotes, trailing commas, a missing closing brace and (given `keys`) unescaped quotes in values."""
    if not isinstance(text, str) or not text.strip():
        raise Reject("empty_output")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        block = _first_object(cand)
        if block is not None:
            obj = _loads(block)
            if obj is not None:
                return obj
    if keys and "{" in text:
        obj = _key_scan(text[text.index("{"):], keys)
        if obj:
            return obj
    raise Reject("no_json", text[:80])


def _norm_key(k: Any) -> str:
    return re.sub(r"[^a-z]", "", str(k).lower())


def get_field(obj: dict, name: str, *aliases: str) -> Any:
    """obj[name] matching keys case- and punctuation-insensitively (`question type` == `Question_Type`)."""
    wanted = {_norm_key(name), *(_norm_key(a) for a in aliases)}
    for k, v in obj.items():
        if _norm_key(k) in wanted:
            return v
    raise Reject(f"missing_{name.lower()}", f"keys: {sorted(map(str, obj))[:6]}")


_ALIASES = {
    "yesno": "yes_or_no", "yesorno": "yes_or_no", "boolean": "yes_or_no", "keyword": "keywords",
    "acquireknowledge": "acquire_knowledge", "knowledge": "acquire_knowledge", "summarization": "summary",
    "summarize": "summary", "highschool": "high_school", "college": "university", "undergraduate": "university",
    "doctoral": "phd", "doctorate": "phd", "expert": "phd",
}


def normalise_choice(value: Any, allowed: Sequence[str], what: str) -> str:
    """`"Yes or No"` -> `yes_or_no`, `"PhD"` -> `phd`, `"High School"` -> `high_school`; else Reject."""
    if not isinstance(value, str) or not value.strip():
        raise Reject(f"invalid_{what}", repr(value)[:60])
    key = re.sub(r"[^a-z]", "", value.lower())
    for a in allowed:
        if key == re.sub(r"[^a-z]", "", a.lower()):
            return a
    if _ALIASES.get(key) in allowed:
        return _ALIASES[key]
    raise Reject(f"invalid_{what}", value[:60])


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def match_character(value: Any, candidates: Sequence[str]) -> str:
    """The candidate persona the LLM picked: by number, exact text, containment or word overlap."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().rstrip(".").isdigit()):
        i = int(str(value).strip().rstrip("."))
        if 1 <= i <= len(candidates):
            return candidates[i - 1]
        raise Reject("unknown_character", str(value))
    if not isinstance(value, str) or not value.strip():
        raise Reject("invalid_character", repr(value)[:60])
    v = re.sub(r"^\s*\d+[.)]\s*", "", value).strip().lower()
    for c in candidates:
        if v == c.lower().strip():
            return c
    for c in candidates:
        cl = c.lower()
        if len(v) >= 12 and (v in cl or cl in v):
            return c
    vt = _tokens(v)
    best, score = None, 0.0
    for c in candidates:
        ct = _tokens(c)
        jac = len(vt & ct) / max(1, len(vt | ct))
        if jac > score:
            best, score = c, jac
    if best is not None and score >= 0.5:
        return best
    raise Reject("unknown_character", value[:60])
