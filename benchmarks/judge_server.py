"""Benchmark of the judge server's rules backend, measured the way training uses it: over HTTP with `openai`.

    python benchmarks/judge_server.py                      # prints a table, writes benchmarks/results/judge_server.json
    python benchmarks/judge_server.py --max-batch-sizes 1 8 --concurrency 64 --rounds 5

For each `--max-batch-size` it starts `serve/judge_app.py --backend rules` as a subprocess and reports
- startup: seconds from process launch until /health answers 200 (median of `--startups` launches);
- latency: one extraction request at a time, median and p90 over `--requests` requests (after a warm-up);
- throughput: `--rounds` rounds of `--concurrency` simultaneous requests, answered requests per second.
The extraction prompt is a synthetic-style reasoning with three timestamps, so the numbers include the rules
judge's own work and JSON, not just the HTTP round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from video_r2.judge.prompts import extraction_messages  # noqa: E402

APP = ROOT / "serve" / "judge_app.py"
RESULTS = ROOT / "benchmarks" / "results" / "judge_server.json"
MODEL = "video-r2-judge"
THINK = (
    "At 00:01 a red circle fills the screen. From 00:02 to 00:05 a blue triangle fills the screen, and at "
    "00:06 a green square appears, so the answer is C."
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(max_batch_size: int) -> tuple[subprocess.Popen, str, float]:
    """Launch the rules server; return (process, base URL, seconds until /health answered)."""
    port = _free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(APP), "--backend", "rules", "--port", str(port), "--max-batch-size", str(max_batch_size),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"judge server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1", time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.02)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def latencies(base_url: str, n: int) -> list[float]:
    """Seconds per request, one at a time on a kept-alive connection."""
    messages = extraction_messages(THINK)
    with openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) as client:
        for _ in range(5):  # warm-up: connection, first-request paths
            client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
            times.append(time.perf_counter() - t)
    return times


async def _rounds(base_url: str, concurrency: int, rounds: int) -> tuple[int, int, float]:
    messages = extraction_messages(THINK)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120) as client:
        await client.chat.completions.create(model=MODEL, messages=messages)  # warm-up
        ok = failed = 0
        t = time.perf_counter()
        for _ in range(rounds):
            calls = [client.chat.completions.create(model=MODEL, messages=messages) for _ in range(concurrency)]
            for reply in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(reply, Exception) or not reply.choices[0].message.content.startswith("{"):
                    failed += 1
                else:
                    ok += 1
        return ok, failed, time.perf_counter() - t


def measure(max_batch_size: int, startups: int, requests: int, concurrency: int, rounds: int) -> dict:
    startup_times = []
    for _ in range(startups - 1):
        proc, _, seconds = start(max_batch_size)
        startup_times.append(seconds)
        stop(proc)
    proc, base_url, seconds = start(max_batch_size)
    startup_times.append(seconds)
    try:
        times = latencies(base_url, requests)
        ok, failed, wall = asyncio.run(_rounds(base_url, concurrency, rounds))
    finally:
        stop(proc)
    return {
        "max_batch_size": max_batch_size,
        "startup_s_median": statistics.median(startup_times),
        "startup_s_all": startup_times,
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_ms_p90": 1000 * statistics.quantiles(times, n=10)[-1],
        "concurrency": concurrency,
        "requests_answered": ok,
        "requests_failed": failed,
        "throughput_rps": ok / wall,
    }


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="judge server, rules backend (openai client over HTTP, 127.0.0.1)")
    for name in ("max batch", "startup s", "latency ms (median)", "latency ms (p90)", "concurrent",
                 "answered/failed", "throughput req/s"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["max_batch_size"]), f"{r['startup_s_median']:.2f}", f"{r['latency_ms_median']:.1f}",
            f"{r['latency_ms_p90']:.1f}", str(r["concurrency"]), f"{r['requests_answered']}/{r['requests_failed']}",
            f"{r['throughput_rps']:.0f}",
        )
    Console(width=120).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--startups", type=int, default=3, help="launches timed per configuration")
    p.add_argument("--requests", type=int, default=50, help="sequential requests for the latency")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="rounds of --concurrency simultaneous requests")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = [measure(b, args.startups, args.requests, args.concurrency, args.rounds) for b in args.max_batch_sizes]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
