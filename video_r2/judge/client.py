"""The judge client behind the Temporal Alignment Reward (TAR).

TAR asks a judge LLM two questions per completion: which `timestamp -> claim` pairs the reasoning
states (extraction), and whether the reasoning supports the final answer (the consistency gate).
The prompts live in `video_r2.judge.prompts`, shared with the judge server's rules backend, and are
used here unchanged.

Where this departs from the original Video-R2 code, which made two blocking calls per completion one
after another and turned every judge error into a reward of 0:
- every call of a step is sent concurrently (`asyncio`), at most `max_concurrency` at a time;
- each request has a deadline, and connection errors, timeouts and 5xx answers are retried with
  backoff (the `openai` client's own `timeout` and `max_retries`);
- answers are parsed tolerantly (JSON inside prose or code fences, single quotes, a verdict anywhere
  on the first line, a reasoning model's `<think>` block ignored);
- identical prompts are judged once: a cache keyed by (model, prompt), in memory and optionally in a
  JSON-lines file, plus de-duplication of identical requests that are in flight at the same time;
- a request that cannot be answered returns `None` and is counted in `judge/failures`; when too many
  of a step's requests fail, `check_failure_rate` raises `JudgeUnavailableError` naming the URL.

The methods are coroutines. Synchronous training code runs them with `JudgeClient.run(coro)`, which
hands them to one event loop that lives in a background thread for the life of the client: the
`openai` client's connection pool stays bound to that loop, and it works even when the caller is
itself inside a running event loop (where `asyncio.run` would refuse).
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai

from video_r2.judge.prompts import consistency_messages, extraction_messages

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8011/v1"  # the default port of serve/judge_app.py
DEFAULT_MODEL = "video-r2-judge"
# vLLM and LitServe accept any key, but the openai client refuses to start without one.
PLACEHOLDER_API_KEY = "EMPTY"


class JudgeUnavailableError(RuntimeError):
    """Too many judge requests of one step failed: training should stop rather than learn from noise."""


# ---------------------------------------------------------------------------------------------------
# Tolerant parsing of the judge's answers (pure functions)
# ---------------------------------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL | re.IGNORECASE)
_CODE_FENCE = re.compile(r"```[a-zA-Z]*")
_VERDICT = re.compile(r"\b(TRUE|FALSE)\b", flags=re.IGNORECASE)


def _strip_reasoning(text: str) -> str:
    # A reasoning model used as judge (Qwen3, R1 distills) may think aloud first; only its reply counts.
    return _THINK_BLOCK.sub("", text)


def _as_claims(value: Any) -> dict[str, str] | None:
    """A decoded JSON value as `{timestamp: claim}`, or None if it has another shape."""
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        # Some judges answer with a list of one-pair objects; merging them loses nothing.
        merged: dict[str, Any] = {}
        for item in value:
            merged.update(item)
        value = merged
    if not isinstance(value, dict):
        return None
    # A null claim reads as empty, as in the original, so TAR drops it rather than matching the word "None".
    return {str(key).strip(): "" if claim is None else str(claim).strip() for key, claim in value.items()}


def parse_claims(text: str) -> dict[str, str] | None:
    """Read the extraction answer: the first JSON object in `text`, or None if there is none.

    Accepts the object alone, inside a code fence, surrounded by prose, or written with single quotes
    (Python literal style). `{}` is a valid answer: the reasoning has no timestamped claims.
    """
    text = _CODE_FENCE.sub("", _strip_reasoning(text))
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(text) if char in "{["):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        claims = _as_claims(value)
        if claims is not None:
            return claims
    # Single-quoted objects are not JSON; Python's literal parser reads them without executing anything.
    first, last = text.find("{"), text.rfind("}")
    if 0 <= first < last:
        try:
            return _as_claims(ast.literal_eval(text[first : last + 1]))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return None


def parse_verdict(text: str) -> bool | None:
    """Read the consistency answer from its first non-empty line, as the original does, or None.

    A line that starts with TRUE or FALSE (any case, "TRUE." or "FALSE:" too) is that verdict; otherwise the
    verdict is the one of the two words that the line holds ("**Verdict: TRUE**"); a line with both or neither
    is no answer.
    """
    lines = [line.strip() for line in _CODE_FENCE.sub("", _strip_reasoning(text)).splitlines()]
    first_line = next((line for line in lines if line), "").upper()
    for word in ("TRUE", "FALSE"):
        if first_line.startswith(word):
            return word == "TRUE"
    found = {match.upper() for match in _VERDICT.findall(first_line)}
    return None if len(found) != 1 else found == {"TRUE"}


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------


class JudgeCache:
    """Judge replies keyed by (model, prompt), in memory and optionally appended to a JSON-lines file.

    Only replies that parsed are stored, so a reply that was cut off or garbled is asked for again.
    With several processes (one per GPU), give each its own file: appends are not coordinated.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._replies: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    @staticmethod
    def key(model: str, messages: list[dict[str, str]]) -> str:
        """A stable digest of the model name and the exact prompt."""
        payload = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _load(self, path: Path) -> None:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                self._replies[entry["key"]] = entry["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a crash must not stop training from starting

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self._replies[key] = reply
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self._replies)


# ---------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------


@dataclass
class _LoopState:
    """What must belong to one event loop: the HTTP connection pool, the semaphore, in-flight requests."""

    client: openai.AsyncOpenAI
    semaphore: asyncio.Semaphore
    in_flight: dict[str, asyncio.Future] = field(default_factory=dict)


class _BackgroundLoop:
    """One event loop running forever in a daemon thread, for synchronous callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="judge-event-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class JudgeClient:
    """Asks an OpenAI-compatible judge server for TAR's claims and consistency verdicts.

    Args:
        base_url: the server's OpenAI API root, e.g. `http://127.0.0.1:8000/v1`.
        model: the served model name sent with every request (and part of the cache key).
        api_key: sent as a bearer token; local servers ignore it.
        max_concurrency: most requests in flight at once, across the whole step.
        timeout: seconds allowed for one HTTP attempt before it counts as failed.
        retries: further attempts after a connection error, timeout, 408/409/429 or 5xx, with the
            `openai` client's exponential backoff (0.5 s doubling, or the server's `Retry-After`).
        cache: True for an in-memory cache, a path to also keep it in a JSON-lines file across runs,
            False for none (identical requests in flight at the same moment are still sent once). A
            cache only makes sense for a deterministic judge (temperature 0), so it is off by default.
        max_failure_fraction: `check_failure_rate` raises when more than this fraction of a step's
            requests got no usable answer.
        max_tokens: cap on each reply; the extraction lists every claim, so leave room.
        temperature: the judge's sampling temperature; None sends none, so the server's default applies,
            as in the original code. 0 makes the judge deterministic (and its answers cacheable).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        retries: int = 3,
        cache: bool | str | os.PathLike = False,
        max_failure_fraction: float = 0.5,
        max_tokens: int = 1024,
        temperature: float | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or PLACEHOLDER_API_KEY
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retries = retries
        self.max_failure_fraction = max_failure_fraction
        self.max_tokens = max_tokens
        self.temperature = temperature
        if cache is False or cache is None:
            self.cache: JudgeCache | None = None
        else:
            self.cache = JudgeCache(None if cache is True else cache)
        # requests: judgements asked for; calls: HTTP requests actually made (retries inside one call
        # are the openai client's and not counted); cache_hits include identical in-flight requests.
        self.counts: Counter[str] = Counter()
        self.last_error: str | None = None  # the latest failed call, with the URL, for the error message
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._background: _BackgroundLoop | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, **overrides: Any) -> JudgeClient:
        """A client configured like the original code: OPENAI_API_BASE, SERVED_MODEL, OPENAI_API_KEY.

        Keyword arguments override the environment and set the other options.
        """
        settings: dict[str, Any] = {
            "base_url": os.environ.get("OPENAI_API_BASE") or DEFAULT_BASE_URL,
            "model": os.environ.get("SERVED_MODEL") or DEFAULT_MODEL,
            "api_key": os.environ.get("OPENAI_API_KEY") or None,
        }
        settings.update(overrides)
        return cls(**settings)

    # -- public judgements ------------------------------------------------------------------------

    async def extract_claims(self, think: str) -> dict[str, str] | None:
        """The `timestamp -> claim` pairs the judge finds in `think`; None if it could not answer."""
        return await self._judge(extraction_messages(think), parse_claims)

    async def check_consistency(self, question: str, think: str, answer: str) -> bool | None:
        """Whether the judge finds that `think` supports `answer`; None if it could not answer."""
        return await self._judge(consistency_messages(question, think, answer), parse_verdict, max_tokens=128)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of this client to completion from synchronous code and return its result."""
        with self._lock:
            if self._background is None:
                self._background = _BackgroundLoop()
        return self._background.run(coro)

    # -- health ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Cumulative counts for logging: judge/requests, judge/calls, judge/cache_hits, judge/failures."""
        names = ("requests", "calls", "cache_hits", "failures", "unparsed", "malformed", "auth_failures")
        return {f"judge/{name}": int(self.counts[name]) for name in names}

    @property
    def health_hint(self) -> str:
        """The command that tells a user whether the judge server is up."""
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        return f"curl {root}/health  (a vLLM server: curl {self.base_url}/models)"

    def check_failure_rate(self, since: dict[str, int]) -> None:
        """Raise `JudgeUnavailableError` if too many requests failed since the `counters()` snapshot `since`."""
        now = self.counters()
        requests = now["judge/requests"] - since.get("judge/requests", 0)
        failures = now["judge/failures"] - since.get("judge/failures", 0)
        if now["judge/auth_failures"] > since.get("judge/auth_failures", 0):
            raise JudgeUnavailableError(
                f"The TAR judge at {self.base_url} refused authentication (401/403): set OPENAI_API_KEY (or the "
                "judge's api_key) to the key the judge server was started with (`--api-key`)."
            )
        if requests and failures / requests > self.max_failure_fraction:
            detail = f" Last error: {self.last_error}." if self.last_error else ""
            raise JudgeUnavailableError(
                f"The TAR judge at {self.base_url} (model {self.model!r}) gave no usable answer to "
                f"{failures} of {requests} requests in this step (limit {self.max_failure_fraction:.0%}). "
                f"Check that the server is up and serves that model: {self.health_hint}.{detail}"
            )

    def close(self) -> None:
        """Close the connections and stop the background loop, if one was started."""
        background, self._background = self._background, None
        if background is not None:
            state = self._loops.pop(background.loop, None)
            if state is not None:
                background.run(state.client.close())
            background.stop()

    def __getstate__(self) -> dict[str, Any]:
        # Event loops, threads and connection pools cannot be pickled (ddp_spawn, deepcopy); a copy
        # starts its own when first used and keeps the configuration, cache and counts.
        state = self.__dict__.copy()
        state.update(_loops={}, _background=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- internals ---------------------------------------------------------------------------------

    def _state(self) -> _LoopState:
        # An httpx connection pool and an asyncio.Semaphore belong to the loop that first used them,
        # so each loop that calls the client gets its own (normally just the background loop).
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            for old in [old for old in self._loops if old.is_closed()]:
                del self._loops[old]
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=self.retries
            )
            state = self._loops[loop] = _LoopState(client, asyncio.Semaphore(self.max_concurrency))
        return state

    async def _judge(self, messages: list[dict[str, str]], parse, max_tokens: int | None = None):
        """Ask once per distinct prompt; parse the reply; count what happened."""
        self.counts["requests"] += 1
        key = JudgeCache.key(self.model, messages)
        if self.cache is not None and (reply := self.cache.get(key)) is not None:
            self.counts["cache_hits"] += 1
            return parse(reply)

        state = self._state()
        pending = state.in_flight.get(key)
        if pending is not None:  # the same prompt is already on its way: share its answer
            self.counts["cache_hits"] += 1
            reply = await asyncio.shield(pending)
        else:
            pending = asyncio.get_running_loop().create_future()
            state.in_flight[key] = pending
            try:
                reply = await self._ask(state, messages, max_tokens or self.max_tokens)
                pending.set_result(reply)
            finally:
                if not pending.done():  # cancelled: let the waiters retry on their own
                    pending.cancel()
                del state.in_flight[key]

        result = None if reply is None else parse(reply)
        if result is None:
            self.counts["failures"] += 1
            if reply is not None:
                self.counts["unparsed"] += 1
        elif self.cache is not None and self.cache.get(key) is None:
            self.cache.put(key, reply)
        return result

    async def _ask(self, state: _LoopState, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        """One chat completion (with the client's retries), or None when the server could not answer."""
        async with state.semaphore:
            self.counts["calls"] += 1
            try:
                sampling = {} if self.temperature is None else {"temperature": self.temperature}
                response = await state.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens, **sampling
                )
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:  # 401 / 403
                self.counts["auth_failures"] += 1
                self.last_error = f"{self.base_url} refused the key ({e.status_code})"
                return None
            except (openai.APIError, ValueError) as e:  # refused, timed out, 4xx/5xx after retries, not JSON
                self.last_error = f"{self.base_url}: {type(e).__name__}: {str(e)[:200]}"
                return None
        return self._reply_text(response)

    def _reply_text(self, response: Any) -> str | None:
        """The first choice's text, or None (a counted failure) for anything that is not a chat completion:
        an HTML or plain-text body, no choices, a choice without a message, a non-text content."""
        choices = getattr(response, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        content = getattr(message, "content", None) if message is not None else None
        if message is None or not (content is None or isinstance(content, str)):
            self.counts["malformed"] += 1
            self.last_error = (f"{self.base_url} answered with something that is not a chat completion: "
                               f"{str(response)[:120]!r}")
            return None
        return content or ""
