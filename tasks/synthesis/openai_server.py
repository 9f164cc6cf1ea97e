"""The OpenAI-compatible backend of synthesis: `POST {base_url}/chat/completions` on any server
that speaks it (vLLM, SGLang, llama.cpp server, OpenAI, ...), with bounded concurrency, retries that
honour Retry-After, and an API key that never reaches a repr, a log line or an error message. The
protocol it implements is in generators.py."""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tasks.synthesis.generators import GeneratorError, Messages, Schemas, Secret, check_schemas, prefill_of

log = logging.getLogger(__name__)


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible endpoint.

    One request per conversation, `concurrency` in flight. Connection errors, timeouts, 429 (after
    its Retry-After) and 5xx are retried up to `http_retries` times with exponential backoff; other
    4xx fail at once. A transient failure is never turned into a rejected sample: that would make
    the synthetic data depend on the network, and a rerun resumes from the finished shards anyway.
    The API key is read from the environment variable named by `api_key_env` (or given as a
    `Secret`) and never appears in reprs, logs or error messages.
    """

    def __init__(self, base_url: str, model: str, *, api_key: Secret | None = None,
                 api_key_env: str = "OPENAI_API_KEY", top_p: float = 0.95, concurrency: int = 4,
                 http_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 timeout_s: float = 60.0, chat_template_kwargs: dict | None = None, transport=None):
        import httpx

        if not base_url:
            raise ValueError("the openai generator backend needs synth.generator.base_url "
                             "(e.g. http://localhost:8000/v1)")
        self.name = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.top_p = top_p
        self.concurrency = concurrency
        self.http_retries = http_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.api_key_env = api_key_env
        self._key = api_key if api_key is not None else Secret.from_env(api_key_env)
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key.get()}"
        self._client = httpx.Client(headers=headers, timeout=timeout_s, transport=transport)
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included

    def __repr__(self) -> str:
        return f"OpenAIGenerator({self.url!r}, model={self.name!r}, api_key={self._key!r})"

    def close(self) -> None:
        self._client.close()

    def generate(self, prompts: list[Messages], *, seed: int, temperature: float,
                 max_new_tokens: int, schemas: Schemas = None) -> list[str]:
        bodies = []
        for m, schema in zip(prompts, check_schemas(prompts, schemas)):
            body = {"model": self.name, "messages": m, "temperature": temperature, "top_p": self.top_p,
                    "max_tokens": max_new_tokens, "seed": seed}
            if prefill_of(m):  # vLLM/SGLang extension: continue the final assistant message
                body |= {"continue_final_message": True, "add_generation_prompt": False}
            if schema is not None:  # structured outputs (OpenAI, vLLM, SGLang, llama.cpp server)
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": schema.get("title", "answer"), "schema": schema, "strict": True}}
            if self.chat_template_kwargs:  # vLLM/SGLang extension, e.g. {"enable_thinking": false}
                body["chat_template_kwargs"] = self.chat_template_kwargs
            bodies.append(body)
        if len(bodies) <= 1 or self.concurrency == 1:
            outs = [self._complete(b) for b in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(bodies))) as pool:
                outs = list(pool.map(self._complete, bodies))
        # The server returns only the continuation of a prefill; the protocol returns the whole message.
        return [(o if o.startswith(prefill_of(m)) else prefill_of(m) + o).strip() for m, o in zip(prompts, outs)]

    def _complete(self, body: dict) -> str:
        import httpx

        last = ""
        for attempt in range(self.http_retries + 1):
            wait = min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (1 + 0.1 * random.random())
            with self._lock:
                self.requests += 1
            try:
                r = self._client.post(self.url, json=body)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                last = f"connection error ({type(e).__name__})"
            else:
                if r.status_code == 429:
                    last = "HTTP 429 (rate limited)"
                    after = retry_after_seconds(r.headers.get("Retry-After"))
                    if after is not None:
                        wait = after  # the server knows when it will take us back
                elif r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                elif r.status_code >= 400:
                    hint = f" (no API key: ${self.api_key_env} is not set)" if r.status_code in (401, 403) \
                        and not self._key else ""
                    raise GeneratorError(self._redact(
                        f"{self.url}: HTTP {r.status_code} (not retried){hint}: {r.text[:300]}"))
                else:
                    try:
                        content = r.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"invalid response body: {r.text[:120]!r}"
                    else:
                        return content or ""
            if attempt < self.http_retries:
                log.warning("%s: %s; retry %d/%d in %.2f s", self.url, self._redact(last), attempt + 1,
                            self.http_retries, wait)
                time.sleep(wait)
        raise GeneratorError(self._redact(
            f"{self.url}: giving up after {self.http_retries + 1} attempts; last error: {last}"))

    def _redact(self, text: str) -> str:
        return self._key.redact(text)


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` is either seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
