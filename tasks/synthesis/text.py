"""Text measures for synthesis: script and language detection, word counting and cutting (lead
sentences, truncation), and `check_text`, the validation every generated text passes."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from typing import Any, Sequence

from tasks.synthesis.parse import Reject
from tasks.synthesis.prompts import example_outputs

SCRIPTS = [  # (name, regex of its letters)
    ("han", r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"), ("kana", r"[\u3040-\u30ff]"),
    ("hangul", r"[\uac00-\ud7af\u1100-\u11ff]"), ("cyrillic", r"[\u0400-\u04ff]"),
    ("arabic", r"[\u0600-\u06ff\u0750-\u077f]"), ("greek", r"[\u0370-\u03ff]"), ("thai", r"[\u0e00-\u0e7f]"),
    ("devanagari", r"[\u0900-\u097f]"), ("hebrew", r"[\u0590-\u05ff]"), ("latin", r"[A-Za-z\u00c0-\u024f]"),
]
LANGUAGE_SCRIPT = {
    "chinese": {"han"}, "japanese": {"han", "kana"}, "korean": {"hangul", "han"}, "russian": {"cyrillic"},
    "ukrainian": {"cyrillic"}, "bulgarian": {"cyrillic"}, "arabic": {"arabic"}, "persian": {"arabic"},
    "urdu": {"arabic"}, "greek": {"greek"}, "thai": {"thai"}, "hindi": {"devanagari"}, "marathi": {"devanagari"},
    "hebrew": {"hebrew"},
}
LANGUAGE_NAMES = {  # ISO 639-1 codes found in passage files (xquad: "lang": "de")
    "ar": "Arabic", "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "fr": "French",
    "hi": "Hindi", "it": "Italian", "ja": "Japanese", "ko": "Korean", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese", "zh": "Chinese", "nl": "Dutch",
    "pl": "Polish", "he": "Hebrew", "fa": "Persian", "id": "Indonesian", "sv": "Swedish", "uk": "Ukrainian",
}
_SCRIPT_LANGUAGE = {"han": "Chinese", "kana": "Japanese", "hangul": "Korean", "cyrillic": "Russian",
                    "arabic": "Arabic", "greek": "Greek", "thai": "Thai", "devanagari": "Hindi", "hebrew": "Hebrew",
                    "latin": "English"}


def script_counts(text: str) -> Counter:
    return Counter({name: len(re.findall(rx, text)) for name, rx in SCRIPTS})


def dominant_script(text: str) -> str | None:
    counts = script_counts(text)
    if counts.get("kana"):  # Japanese mixes kanji (han) with kana
        return "kana"
    name, n = counts.most_common(1)[0]
    return name if n else None


def guess_language(text: str) -> str:
    """Language name from the dominant script; Latin script is taken as English (pass a `lang`
    field in the passage file for other Latin-script languages)."""
    return _SCRIPT_LANGUAGE.get(dominant_script(text) or "latin", "English")


def expected_scripts(language: str) -> set[str]:
    return LANGUAGE_SCRIPT.get(language.lower(), {"latin"})


_DENSE = "[\u3400-\u9fff\u3040-\u30ff\u0e00-\u0e7f\uf900-\ufaff]"  # scripts written without spaces


def count_words(text: str) -> int:
    """Words; Chinese/Japanese/Thai count ~2 characters per word (they use no spaces)."""
    dense = len(re.findall(_DENSE, text))
    return len(re.findall(r"\w+", re.sub(_DENSE, " ", text))) + math.ceil(dense / 2)


def norm_text(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def copied_characters(norm: str, src: str, *, min_run: int = 10, share: float = 0.6) -> bool:
    """A query in a script written without spaces (Chinese, Japanese, Thai) that is mostly one run
    of its passage's characters: at least `min_run` characters and `share` of the query's. Words
    cannot tell there, where a "word" is a whole clause between two punctuation marks."""
    dense = "".join(re.findall(_DENSE, norm))
    if len(dense) < min_run:
        return False
    a, b = norm.replace(" ", ""), src.replace(" ", "")
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size >= max(min_run, share * len(a))


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive words shared by `a` and `b`."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def _example_texts() -> set[str]:
    """Normalised texts of the templates' example outputs: an answer that repeats one is a copy."""
    return {norm_text(t) for t in example_outputs()}


def check_text(text: Any, source: str, *, language: str, what: str = "query", length: int | None = None,
               min_ratio: float | None = None, max_ratio: float | None = None) -> str:
    """A generated text is usable: non-empty, not a placeholder or an echo of the prompt, not a
    (substring-)copy of its source, in the right script, and of a sane length."""
    if not isinstance(text, str):
        raise Reject(f"invalid_{what}", f"{type(text).__name__}")
    text = " ".join(text.split())
    norm = norm_text(text)
    if not norm:
        raise Reject(f"empty_{what}")
    if norm in {"query", "your query", "translation", "sentence", "label", "text"} or "**" in text \
            or re.search(r"\{(query|passage|character|type)\}", text, re.I):
        raise Reject("template_echo", text[:60])
    if any(f" {ex} " in f" {norm} " for ex in _example_texts()):  # the example, alone or with more text
        raise Reject("copied_example", text[:60])
    src = norm_text(source)
    words = count_words(text)
    run = longest_common_run(norm.split(), src.split())
    if norm == src or (src and src in norm) or run >= max(6, 0.6 * len(norm.split())):
        raise Reject("copied_passage", text[:60])
    if what == "query" and copied_characters(norm, src):
        raise Reject("copied_passage", text[:60])
    tri = [tuple(norm.split()[i:i + 3]) for i in range(len(norm.split()) - 2)]
    if len(tri) >= 10 and len(set(tri)) < 0.7 * len(tri):  # a small model looping on itself
        raise Reject(f"repetitive_{what}", text[:60])
    script = dominant_script(text)
    if script is not None and script not in expected_scripts(language):
        raise Reject("wrong_language", f"{script} script, expected {language}")
    if length is not None:
        if words > max(3 * length, length + 10):
            raise Reject(f"{what}_too_long", f"{words} words, asked for {length}")
        if words < max(1, length // 4):
            raise Reject(f"{what}_too_short", f"{words} words, asked for {length}")
    if min_ratio is not None and max_ratio is not None:
        ratio = words / max(1, count_words(source))
        if not min_ratio <= ratio <= max_ratio:
            raise Reject("length_mismatch", f"{words} words for a {count_words(source)}-word source")
    return text


def lead_sentences(text: str, *, min_words: int = 8, max_words: int = 40) -> str:
    """The first sentence(s) of a passage: at least `min_words` words when possible, at most `max_words`."""
    parts = re.split(r"(?<=[.!?。！？])\s+|(?<=[。！？])", text.strip())
    out = ""
    for s in parts:
        if not s.strip():
            continue
        cand = f"{out} {s}".strip() if out else s.strip()
        if out and count_words(cand) > max_words:
            break
        out = cand
        if count_words(out) >= min_words:
            break
    return truncate_words(out, max_words)


def truncate_words(text: str, n: int) -> str:
    """The first `n` words of `text` (as counted by `count_words`), whitespace kept."""
    if count_words(text) <= n:
        return text
    out, used = [], 0.0
    for m in re.finditer(_DENSE + r"|[^\s" + _DENSE[1:-1] + r"]+|\s+", text):
        tok = m.group()
        if not tok.isspace():
            used += 0.5 if re.fullmatch(_DENSE, tok) else len(re.findall(r"\w+", tok))
            if used > n:
                break
        out.append(tok)
    return "".join(out).strip()
