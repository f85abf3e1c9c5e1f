"""The judge that TAR queries, served over an OpenAI-compatible API (LitServe).

`serve/judge_app.py` is the command; this module builds the server from a backend (`video_r2.judge.backends`):
- `JudgeSpec`: LitServe's OpenAI spec plus `/v1/models`, the served model name, request limits (checked in
  the API process, before a request is queued) and the request deadline (`--timeout`: a 504 when a reply is
  not ready in time);
- `JudgeAPI`: decode -> backend -> encode in the inference worker, the API-key check, and `/health`, which
  turns 503 while a worker is busy past its deadline;
- two ASGI middlewares: the request body limit (413) and the API key on FastAPI's own /docs, /redoc and
  /openapi.json routes, which LitServe's auth dependency does not cover.

The server speaks the subset of the OpenAI chat API that `openai` clients and vLLM users expect, so training
can switch between this server and `vllm serve MODEL --port 8011` by changing a URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec

from video_r2.judge.backends import Completion, GenerationRequest
from video_r2.judge.prompts import judged_text_length
from video_r2.judge.rules import DeadlineExceeded
from video_r2.judge.watchdog import DeadlineBoard, die_with_parent, tie_forked_children

# FastAPI's self-description routes: they list every route and its schema.
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@dataclass
class Limits:
    """What a single request may ask for; anything beyond is refused with a 4xx before it is queued."""

    max_tokens: int = 4096  # the most max_tokens a request may ask for
    default_max_tokens: int = 1024  # used when a request gives none
    max_n: int = 8  # choices per request
    max_messages: int = 256
    # The text a judge prompt asks about (reasoning; for consistency also question and answer), checked
    # before any of it is parsed. Reasoning of a GRPO rollout is a few thousand characters.
    max_reasoning_chars: int = 100_000


def _flatten_content(content: Any) -> str:
    """OpenAI message content (a string or a list of parts) as plain text; non-text parts are dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if getattr(part, "type", None) == "text")


def _error(status: int, message: str, code: str) -> HTTPException:
    # The body mirrors OpenAI's error object, so `openai` clients show the message itself.
    kind = "invalid_request_error" if status < 500 else "server_error"
    return HTTPException(status, detail={"message": message, "type": kind, "code": code})


def key_matches(headers, api_key: str) -> bool:
    """The key as `Authorization: Bearer KEY` (what `openai` clients send) or `X-API-Key: KEY` (LitServe's)."""
    bearer = headers.get("authorization", "")
    given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return secrets.compare_digest(given.encode(), api_key.encode())


class TimedRequest(ChatCompletionRequest):
    """A chat request with the moment its reply is due (`time.monotonic()`), set when it arrives, so that the
    worker's deadline counts the time spent in the queue too."""

    deadline: Optional[float] = None


class JudgeSpec(OpenAISpec):
    """OpenAISpec plus `GET /v1/models`, the served model name, request limits and the request deadline.

    Requests are checked here, in the API process, so that a bad one is refused with a clear 4xx before it
    reaches the inference worker (where an error would cost a whole batch, or arrive as an error chunk inside
    an already-started 200 stream).
    """

    def __init__(self, served_model_name: str, limits: Limits, timeout: float = 60.0):
        super().__init__()
        self.served_model_name = served_model_name
        self.limits = limits
        self.timeout = timeout if timeout and timeout > 0 else None  # LitServe: False or -1 is no limit
        self.created = int(time.time())

    def pre_setup(self, lit_api: "ls.LitAPI"):
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/models/{model_id:path}", self.retrieve_model, ["GET"])

    def _unknown_model(self, name: str) -> HTTPException:
        message = f"The model `{name}` does not exist; this server serves `{self.served_model_name}`."
        return _error(404, message, "model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "video-r2"}

    async def list_models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, model_id: str) -> JSONResponse:
        if model_id != self.served_model_name:
            raise self._unknown_model(model_id)
        return JSONResponse(self._model_card())

    def check(self, request: ChatCompletionRequest) -> None:
        """Raise a 4xx HTTPException for a request this server will not run."""
        limits = self.limits
        if request.model and request.model != self.served_model_name:
            raise self._unknown_model(request.model)
        if not request.messages:
            raise _error(400, "messages must hold at least one message", "invalid_messages")
        if len(request.messages) > limits.max_messages:
            raise _error(400, f"at most {limits.max_messages} messages per request", "too_many_messages")
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
            message = f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}"
            raise _error(400, message, "invalid_max_tokens")
        if request.n is not None and not 1 <= request.n <= limits.max_n:
            raise _error(400, f"n must be between 1 and {limits.max_n}, got {request.n}", "invalid_n")
        if request.temperature is not None and not 0 <= request.temperature <= 2:
            raise _error(400, f"temperature must be between 0 and 2, got {request.temperature}", "invalid_temperature")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise _error(400, f"top_p must be in (0, 1], got {request.top_p}", "invalid_top_p")
        messages = [{"role": m.role, "content": _flatten_content(m.content)} for m in request.messages]
        length = judged_text_length(messages)
        if length is not None and length > limits.max_reasoning_chars:
            message = (f"the text to judge is {length} characters long; this server judges at most "
                       f"{limits.max_reasoning_chars} (start it with a larger --max-reasoning-chars to raise that)")
            raise _error(413, message, "reasoning_too_long")

    def _timed_out(self) -> HTTPException:
        message = f"no reply within the server's deadline of {self.timeout:g} s (its --timeout)"
        return _error(504, message, "timeout")

    async def chat_completion(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks):
        self.check(request)
        fields = dict(request)
        fields["model"] = request.model or self.served_model_name  # echoed back in the response
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        timed = TimedRequest.model_construct(**fields, deadline=deadline)
        if request.stream or self.timeout is None:
            # A stream has started (200) before its text exists; the worker's own deadline ends it.
            return await super().chat_completion(timed, background_tasks)
        try:
            return await asyncio.wait_for(super().chat_completion(timed, background_tasks), self.timeout)
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    async def streaming_completion(self, request: ChatCompletionRequest, pipe_responses: list):
        # LitServe ends a failed stream with an error event that lacks its closing blank line, so clients drop
        # it, and with our error object nested inside its message: send OpenAI's error object, whole.
        async for chunk in super().streaming_completion(request, pipe_responses):
            if chunk.startswith('data: {"error"'):
                error = json.loads(chunk[len("data: ") :])["error"]
                error = error["message"] if isinstance(error.get("message"), dict) else error
                chunk = f"data: {json.dumps({'error': error})}\n\n"
            yield chunk


class JudgeAPI(ls.LitAPI):
    """decode (OpenAI request -> GenerationRequest) -> predict (backend) -> encode (OpenAI message dicts).

    With max_batch_size > 1 LitServe hands `predict` a list and expects one list per yielded step; with 1 it
    hands a single request. Both go through `backend.complete(list)`. A batch that runs out of time is
    answered 504 as a whole.
    """

    def __init__(self, backend, spec: JudgeSpec, board: DeadlineBoard, api_key: Optional[str] = None, **kwargs):
        super().__init__(spec=spec, **kwargs)
        self.backend = backend
        self.limits = spec.limits
        self.timeout = spec.timeout
        self.api_key = api_key
        self.board = board
        self.server_pid = os.getpid()  # built in the server's main process, the workers' parent

    def setup(self, device: str) -> None:
        # Runs in the inference worker. Ctrl+C in a terminal reaches the whole process group; the main process
        # then stops this worker itself (SIGTERM), so the worker ignores SIGINT instead of dying mid-request
        # with a traceback. If the main process dies without stopping it (SIGKILL), the worker goes too.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent(self.server_pid)
        self._slot = self.board.slot()
        self.backend.setup(device)

    def health(self) -> bool:
        """Answered in the API process: unhealthy while a worker computes past its deadline (wedged)."""
        return not self.board.overdue()

    def authorize(self, request: Request) -> None:
        """FastAPI dependency on every LitServe route: the key as `Authorization: Bearer KEY` or `X-API-Key: KEY`.
        `/health` stays open for load balancers."""
        if not self.api_key or request.url.path == "/health":
            return
        if not key_matches(request.headers, self.api_key):
            error = _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_api_key")
            error.headers = {"WWW-Authenticate": "Bearer"}
            raise error

    def decode_request(self, request: ChatCompletionRequest) -> GenerationRequest:
        stop = request.stop or []
        deadline = getattr(request, "deadline", None)
        if deadline is None and self.timeout is not None:  # not sent through JudgeSpec: count from now
            deadline = time.monotonic() + self.timeout
        return GenerationRequest(
            messages=[{"role": m.role, "content": _flatten_content(m.content)} for m in request.messages],
            max_tokens=request.max_completion_tokens or request.max_tokens or self.limits.default_max_tokens,
            temperature=0.0 if request.temperature is None else float(request.temperature),
            top_p=1.0 if request.top_p is None else float(request.top_p),
            stop=[stop] if isinstance(stop, str) else list(stop),
            deadline=deadline,
        )

    def predict(self, x):
        batch = x if isinstance(x, list) else [x]
        deadlines = [r.deadline for r in batch if r.deadline is not None]
        self.board.busy(self._slot, min(deadlines) if deadlines else None)
        try:
            completions = self.backend.complete(batch)
        except DeadlineExceeded:
            raise _error(504, f"the judge did not finish within the server's --timeout of {self.timeout:g} s",
                         "timeout") from None
        finally:
            self.board.idle(self._slot)
        yield completions if isinstance(x, list) else completions[0]

    @staticmethod
    def _message(c: Completion) -> dict:
        return {
            "role": "assistant",
            "content": c.text,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        }

    def encode_response(self, outputs):
        for step in outputs:
            yield [self._message(c) for c in step] if isinstance(step, list) else self._message(step)


async def _send_error(send, status: int, message: str, code: str, headers: tuple = ()) -> None:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class RequestSizeLimit:
    """ASGI middleware: refuses a request body over `max_bytes` with 413, from Content-Length when the client
    sends it (before reading anything) and by counting otherwise."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            message = f"request body exceeds {self.max_bytes} bytes (the server's --max-request-bytes)"
            return await _send_error(send, 413, message, "request_too_large")
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, detail=f"request body exceeds {self.max_bytes} bytes")
            return message

        return await self.app(scope, counting_receive, send)


class DocsNeedKey:
    """ASGI middleware: with an API key, FastAPI's /docs, /redoc and /openapi.json need it as well."""

    def __init__(self, app, api_key: Optional[str]):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope.get("path") in DOCS_PATHS:
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
            if not key_matches(headers, self.api_key):
                message = "missing or wrong API key (send 'Authorization: Bearer KEY')"
                return await _send_error(send, 401, message, "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


def _install_error_handlers(app) -> None:
    """Every error as OpenAI's `{"error": {"message": ...}}`, so `openai` clients print the reason; a request
    that does not parse or validate is a 400, as with OpenAI and vLLM (FastAPI's default is a 422)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail), "type": kind, "code": None}
        return JSONResponse({"error": error}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        message = f"malformed request: {problems}"
        error = {"message": message, "type": "invalid_request_error", "code": "invalid_request"}
        return JSONResponse({"error": error}, status_code=400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def build_server(
    backend,
    served_model_name: str,
    limits: Limits,
    api_key: Optional[str] = None,
    max_batch_size: int = 1,
    batch_timeout: float = 0.02,
    workers: int = 1,
    timeout: float = 60.0,
    max_request_bytes: int = 1 << 20,
    accelerator: str = "auto",
) -> ls.LitServer:
    """A LitServer hosting `backend` behind the OpenAI chat API.

    Every process the server forks from here on (LitServe's manager and API servers) ends with this one, and
    its spawned inference workers watch it too, so no worker outlives its server, however the server ends.
    """
    tie_forked_children()
    spec = JudgeSpec(served_model_name, limits, timeout=timeout)
    api = JudgeAPI(
        backend,
        spec=spec,
        board=DeadlineBoard(workers),
        api_key=api_key,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout if max_batch_size > 1 else 0.0,
    )
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        timeout=timeout if timeout and timeout > 0 else False,  # LitServe's "no limit"
        middlewares=[(RequestSizeLimit, {"max_bytes": max_request_bytes}), (DocsNeedKey, {"api_key": api_key})],
        model_metadata={"served_model_name": served_model_name, "backend": backend.name},
    )
    _install_error_handlers(server.app)
    return server
