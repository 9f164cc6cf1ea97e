"""JSON schemas of the LLM's answers, one per synthesis stage, for structured decoding
(synth.generator.structured): the keys, the enums of the choices the prompt offers, and string
lengths. That fixes the format, not the content: the shard's answer parsing (shard.py) and
`check_text` still judge every answer. docs/synthesis.md explains the choices."""

from __future__ import annotations

from typing import Any, Sequence

from tasks.synthesis.prompts import DIFFICULTIES, QUESTION_TYPES
from tasks.synthesis.text import SCRIPTS, expected_scripts


def _answer_schema(title: str, **properties: dict) -> dict[str, Any]:
    """A flat object with exactly `properties`, in that order (the grammar writes them in order)."""
    return {"title": title, "type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _text(max_chars: int | None = None) -> dict[str, Any]:
    return {"type": "string", "minLength": 1} | ({"maxLength": max_chars} if max_chars else {})


def _text_in(language: str, max_chars: int | None = None, *, sentence: bool = False) -> dict[str, Any]:
    """A string written in `language`'s script, of 1 to `max_chars` characters; a `sentence` ends
    with a full stop, question or exclamation mark. The length is in the pattern, not in
    minLength/maxLength, which xgrammar ignores (with a warning) next to a pattern."""
    end = _SENTENCE_END if sentence else ""
    return {"type": "string", "pattern": script_pattern(language, max_chars, end=end)}


# A sentence's last character. Required of the STS sentence: small models do not escape a quote
# inside a JSON string ("the series "Grimm" ..."), so without it the grammar ends the string at the
# quote ("the series ") and the sentence is lost; with it the model has to write the title otherwise.
_SENTENCE_END = "[.!?\u3002\uff01\uff1f]"
_JSON_UNSAFE = r'"\\\u0000-\u001f'  # `"`, `\` and control characters: the pattern's text has no escapes


def script_pattern(language: str, max_chars: int | None = None, *, end: str = "") -> str:
    """A regex of texts in `language`'s script (the rule `check_text` applies, as a constraint):
    no letter of another script, except Latin inside a non-Latin language (names, brands, units),
    where the first letter must be the language's own. Digits, punctuation and spaces are free.
    `end`, a character class, is the last character; `max_chars` bounds the length."""
    ranges = {name: rx[1:-1] for name, rx in SCRIPTS}
    own = expected_scripts(language)
    # a negated class would also admit `"`, `\` and control characters, raw, into the JSON string
    foreign = "".join(r for name, r in ranges.items() if name not in own | {"latin"}) + _JSON_UNSAFE
    n = max_chars - (1 if end else 0) if max_chars else None  # characters before `end`
    if own == {"latin"}:
        return f"^[^{foreign}]{{1,{n}}}{end}$" if n else f"^[^{foreign}]+{end}$"
    lead = min(4, n - 1) if n else 4  # digits/punctuation before the first letter ("2021年")
    rest = f"{{0,{n - 1 - lead}}}" if n else "*"
    letters, mine = "".join(ranges.values()) + _JSON_UNSAFE, "".join(ranges[name] for name in own)
    return f"^[^{letters}]{{0,{lead}}}[{mine}][^{foreign}]{rest}{end}$"


def configuration_schema(candidates: Sequence[str]) -> dict[str, Any]:
    """The Character is one of the candidates, written out as the prompt lists them (and as its
    examples answer); Question_Type and Difficulty are the template's options."""
    return _answer_schema("configuration", Character={"type": "string", "enum": list(candidates)},
                          Question_Type={"type": "string", "enum": list(QUESTION_TYPES)},
                          Difficulty={"type": "string", "enum": list(DIFFICULTIES)})


def max_chars(words: int, language: str) -> int:
    """Characters that `words` words of `language` take at most, about: scripts written without
    spaces count 2 characters a word (as `count_words` does), others 8 (long words and the space)."""
    dense = expected_scripts(language) & {"han", "kana", "thai"}
    return words * (2 if dense else 8)


def query_schema(length: int, language: str) -> dict[str, Any]:
    """A query of about `length` words in `language`: up to twice that (`check_text` accepts three
    times), so a query that runs on is closed well inside max_new_tokens (40 Chinese words, 80
    characters, cost SmolLM2 ~135 tokens)."""
    return _answer_schema("query", Query=_text_in(language, max_chars(max(2 * length, length + 5), language)))


def translation_schema(language: str) -> dict[str, Any]:
    return _answer_schema("translation", Translation=_text_in(language))


def sts_schema(language: str) -> dict[str, Any]:
    return _answer_schema("sts", Sentence=_text_in(language, sentence=True))


CLASSIFICATION_DESCRIPTION_CHARS = 100  # "a short Description": unused in the pair, so kept cheap


def classification_schema(labels: Sequence[str]) -> dict[str, Any]:
    return _answer_schema("classification", Label={"type": "string", "enum": list(labels)},
                          Description=_text(CLASSIFICATION_DESCRIPTION_CHARS))
