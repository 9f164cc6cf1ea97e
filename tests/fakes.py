"""Stand-ins for an LLM that the tests can script: the same prompts reach them as reach a real
model, and real HTTP (on loopback) or the real generator protocol carries the answers.

- `scripted_answer` / `ScriptedGenerator`: a well-behaved instruct LLM, except on a few named
  passages, which get the malformed answers a small model writes (the synthesis tests count them);
- `CrashingGenerator`: the configured backend, failing on one shard (a killed worker);
- `FakeOpenAI`: an OpenAI-compatible server answering with `scripted_answer`, after a queue of
  faults (HTTP errors, garbage, refused keys) and with a key it checks;
- `ScriptedLLM`: the plain endpoint of the pipeline tests (`llm_url` in conftest.py): every
  configuration and query request gets a valid answer, so the synthetic pairs are accepted.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time

from tasks.config import GeneratorConfig
from tasks.synthesis.generators import GeneratorError, build_generator
from tasks.synthesis.prompts import QUESTION_TYPES

KEY = "sk-test-Q3E-do-not-leak-7f3a9c"


# ----------------------------------------------------------------------------- a scripted generator

def _section(text: str, name: str) -> str:
    m = re.search(r"\*\*" + name + r"\*\*:?\n(.*?)(?:\n\*\*|\Z)", text, re.S)
    return m.group(1).strip() if m else ""


def scripted_answer(messages: list[dict], state: dict) -> str:
    """Answers like a well-behaved instruct LLM, except for the passages named below, which get the
    malformed answers a small model produces. `state` counts calls per (stage, passage)."""
    system, user = messages[0]["content"], [m for m in messages if m["role"] == "user"][-1]["content"]
    passage = _section(user, "Passage")
    key = passage[:20]
    state[key] = state.get(key, 0) + 1
    if "select the appropriate option from three fields" in system:
        candidates = [re.sub(r"^\d+\. ", "", c) for c in _section(user, "Character").splitlines()]
        if passage.startswith("Major Crimes"):
            return "I think the best character is the first one, asking a question."
        if passage.startswith("Breaking Bad"):
            return json.dumps({"Character": candidates[0], "Question_Type": "opinion", "Difficulty": "phd"})
        if passage.startswith("Sin senos"):
            return json.dumps({"Persona": candidates[0], "Type": "summary"})
        if passage.startswith("How to Get Away"):  # fenced, single quotes, trailing comma, by number
            return "Sure!\n```json\n{'Character': '2', 'Question_Type': 'Yes or No', 'Difficulty': 'University',}\n```"
        qtype = list(QUESTION_TYPES)[int(hashlib.md5(passage.encode()).hexdigest(), 16) % 5]
        return json.dumps({"Character": candidates[0], "Question_Type": qtype, "Difficulty": "high_school"}) + \
            "\nThis character fits best."
    if "generate a query from the **Character**'s perspective" in system:
        if passage.startswith("Falling Skies"):  # a sentence copied from the passage
            return json.dumps({"Query": " ".join(passage.split()[:9])})
        if passage.startswith("Arrested Development") and state[key] == 2:  # first query attempt: too long
            return json.dumps({"Query": "tell me " + "everything " * 90})
        return json.dumps({"Query": "what is known about " + " ".join(passage.split()[:3])})
    if "translate it into the **Target** language" in system:
        text, target = _section(user, "Text"), _section(user, "Target")
        if target in ("Chinese", "Japanese"):
            return json.dumps({"Translation": "译" * (2 * len(text.split()))}, ensure_ascii=False)
        return json.dumps({"Translation": "en " + target + ": " + " ".join(reversed(text.split()))})
    if "semantic similarity to the **Sentence**" in system:
        return json.dumps({"Sentence": "In other words, " + " ".join(reversed(_section(user, "Sentence").split()))})
    if "choose the Label" in system:
        return '{"Label": "Arts and Entertainment", "Description": "television"}'
    return "?"


class ScriptedGenerator:
    """A generator backend (the protocol of tasks.synthesis.generators) that answers from
    `scripted_answer`; `calls` records the batch sizes it was given."""

    name = "scripted"

    def __init__(self):
        self.state: dict = {}
        self.calls: list[int] = []

    def generate(self, prompts, *, seed, temperature, max_new_tokens, schemas=None):
        self.calls.append(len(prompts))
        return [scripted_answer(m, self.state) for m in prompts]


class CrashingGenerator:
    """The configured backend, except that it fails on the shard holding `marker` (a killed worker)."""

    def __init__(self, cfg: GeneratorConfig, marker: str):
        self.inner = build_generator(cfg)
        self.name = self.inner.name
        self.marker = marker

    def generate(self, prompts, **kw):
        if any(self.marker in m["content"] for p in prompts for m in p):
            raise GeneratorError("simulated crash")
        return self.inner.generate(prompts, **kw)


# ----------------------------------------------------------------------------- OpenAI-compatible servers

class FakeOpenAI(http.server.ThreadingHTTPServer):
    """A real HTTP server on loopback speaking `POST /v1/chat/completions`. `script` is a queue of
    faults to serve first; then it answers with `scripted_answer`."""

    daemon_threads = True

    def __init__(self, key: str | None = KEY):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.key = key
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.state: dict = {}
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _done(self) -> None:
        """This request stops counting as active: before its answer is sent, since the client may
        start its next request the moment it reads the answer (a loaded machine showed 4 of 3)."""
        if getattr(self, "_active", False):
            self._active = False
            with self.server.lock:
                self.server.active -= 1

    def _send(self, code: int, body: str | bytes, headers: dict | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self._done()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv: FakeOpenAI = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
            srv.times.append(time.monotonic())
            action = srv.script.pop(0) if srv.script else ("llm",)
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        self._active = True
        try:
            time.sleep(srv.delay)
            auth = self.headers.get("Authorization", "")
            if self.path != "/v1/chat/completions":
                return self._send(404, '{"error": "not found"}')
            if action[0] == "status":
                return self._send(action[1], '{"error": "busy"}', action[2] if len(action) > 2 else None)
            if action[0] == "garbage":
                return self._send(200, "<html>this is not json")
            if action[0] == "echo_auth" or (srv.key and auth != f"Bearer {srv.key}"):
                return self._send(401, json.dumps({"error": f"bad credentials: {auth}"}))
            with srv.lock:
                content = scripted_answer(body["messages"], srv.state)
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}))
        finally:
            self._done()


class ScriptedLLM(http.server.BaseHTTPRequestHandler):
    """Answers the configuration and query-generation prompts of the paper's templates."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        # the last user turn is the request (an earlier one may be the template's example)
        system = body["messages"][0]["content"]
        user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        if "select the appropriate option" in system:
            first = re.search(r"^\s*1\. (.+)$", user.split("**Character**")[-1], re.M).group(1)
            content = {"Character": first, "Question_Type": "keywords", "Difficulty": "university"}
        elif "generate a query" in system:
            passage = user.split("**Passage**")[1].split("**Requirement**")[0].split()
            content = {"Query": "what do we know about " + " ".join(passage[4:10])}
        else:
            content = {}
        payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": json.dumps(content)}, "finish_reason": "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())
