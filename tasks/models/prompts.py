"""The text formats of the two models (SPEC 1): the embedding query format and the reranker's chat
template, plus the pair the exported CrossEncoder scores."""

from __future__ import annotations

RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
RERANK_PREFIX = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_query(query: str, instruction: str | None) -> str:
    """SPEC 1: `Instruct: {task}\\nQuery:{query}` (no space after `Query:`); no instruction = raw text."""
    return f"Instruct: {instruction}\nQuery:{query}" if instruction else query


def format_rerank_body(query: str, document: str, instruction: str | None) -> str:
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def cross_encoder_pair(query: str, document: str, instruction: str | None = None) -> tuple[str, str]:
    """The (a, b) texts to give `CrossEncoder.predict` for the exported reranker."""
    return (f"{RERANK_PREFIX}<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n",
            f"<Document>: {document}{RERANK_SUFFIX}")
