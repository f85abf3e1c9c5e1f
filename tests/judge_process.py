"""Start and stop `serve/judge_app.py` as a real subprocess on a free port (shared by the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

APP = Path(__file__).resolve().parents[1] / "serve" / "judge_app.py"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_dir: Path, *args: str, ready_within: float = 120.0, script: Path = APP) -> Server:
    """Start `serve/judge_app.py` (or another `script` taking `--port`) on a free port; wait until /health is 200."""
    port = _free_port()
    log = log_dir / f"judge-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=log_dir, env=env,
        )
    server = Server(proc, port, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"judge server exited with {proc.returncode} during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.root}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_server(server)
    pytest.fail(f"judge server not healthy within {ready_within} s:\n{server.log_tail()}")


def stop_server(server: Server, timeout: float = 30.0) -> int:
    """SIGTERM, as `docker stop` or a process manager would; SIGKILL only if it does not exit in time."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


