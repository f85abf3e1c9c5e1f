"""TAR's judge cost for one GRPO step: the original sequential calls against our concurrent client.

One step's worth of completions (8 prompts x 8 completions, each with timestamped reasoning that
matches its video's events, so every completion needs both calls) is judged by a real local HTTP
server that answers like a rules judge after a fixed 100 ms per call. Two scopes:
- "judge calls": the 128 calls alone. Original: two blocking calls per completion (extraction, then
  consistency), one completion after another, with the synchronous `openai` client. Ours: the same
  calls through `JudgeClient` at several concurrencies with the cache off, and a repeated step with
  the cache on.
- "TAR step": the whole reward (judge + MiniLM + matching). Original: as above, each completion's
  claims embedded on their own. Ours: `video_r2.rewards.tar_reward` at concurrency 16.
Every way must give the same judgements and TAR values. Each runs `--repeats` times and the fastest
is reported: the machines are shared, and the fastest run is the one least disturbed by others.
Prints a table and writes benchmarks/results/judge.json.

    .venv/bin/python benchmarks/judge.py [--latency 0.1] [--prompts 8] [--generations 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
from rich.console import Console
from rich.table import Table

from video_r2.judge import JudgeClient, parse_claims, parse_verdict
from video_r2.judge.prompts import (
    consistency_messages,
    extraction_messages,
    read_consistency_request,
    read_extraction_request,
)
from video_r2.rewards import (
    RewardContext,
    extract_answer,
    extract_think,
    get_embedder,
    match_claims,
    tar_reward,
)

RESULTS = Path(__file__).parent / "results" / "judge.json"
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow"]
LETTERS = "ABCD"


# -- a judge server with a fixed latency ---------------------------------------------------------


def rules_reply(messages: list[dict]) -> str:
    """What a careful judge would say: the reasoning's "At MM:SS <claim>" pairs, or TRUE/FALSE."""
    think = read_extraction_request(messages)
    if think is not None:
        claims = dict(re.findall(r"[Aa]t (\d\d:\d\d),? ([^,.]+)", think))
        return json.dumps({key: claim + "." for key, claim in claims.items()})
    _, think, answer = read_consistency_request(messages)
    return ("TRUE" if think.rstrip(".").endswith(f"the answer is {answer}") else "FALSE") + "\nBy the rules."


def start_server(latency: float) -> tuple[ThreadingHTTPServer, str]:
    """An OpenAI-compatible server on a free port that waits `latency` seconds before each answer."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes; with Nagle's algorithm on, the client's delayed
        # ACK adds ~40 ms to every call. Real servers (uvicorn, vLLM) set TCP_NODELAY too.
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)  # a thread per connection, so concurrent calls wait side by side
            message = {"role": "assistant", "content": rules_reply(request["messages"])}
            body = json.dumps({
                "id": "bench", "object": "chat.completion", "created": 0, "model": request["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


# -- one step of completions ---------------------------------------------------------------------


def make_step(prompts: int, generations: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Distinct completions whose claims match their video's events (so every one needs both calls)."""
    rng = random.Random(seed)
    completions, samples = [], []
    for p in range(prompts):
        events = {}
        for k in range(3):
            shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
            events[f"00:{3 * k:02d}-00:{3 * k + 3:02d}"] = f"A {colour} {shape} fills the screen."
        keys = list(events)
        answer_letter = rng.choice(LETTERS)
        record = {"question": f"Prompt {p}: which colour is shown at 00:04? A) red B) green C) blue D) yellow",
                  "answer": answer_letter, "temporal_grounding": events, "question_type": "multiple choice"}
        for g in range(generations):
            shown = rng.sample(keys, k=rng.randint(1, 3))
            said = [f"at 00:{int(key[3:5]) + rng.randint(0, 2):02d} {events[key][0].lower()}{events[key][1:-1]}" for key in shown]
            letter = rng.choice(LETTERS)
            think = ", ".join(said).capitalize() + f" (sample {g}), so the answer is {letter}."
            completions.append(f"<think>{think}</think><answer>{letter}</answer>")
            samples.append(record)
    return completions, samples


# -- the two ways --------------------------------------------------------------------------------


def judge_original(url: str, completions: list[str], samples: list[dict]) -> tuple[list, int]:
    """Two blocking calls per completion, one completion after another: [(claims, verdict)], calls."""
    client = openai.OpenAI(base_url=url, api_key="EMPTY", timeout=60.0, max_retries=3)
    results = []
    for completion, sample in zip(completions, samples):
        think, answer = extract_think(completion), extract_answer(completion)
        reply = client.chat.completions.create(model="judge", messages=extraction_messages(think), temperature=0.0)
        claims = parse_claims(reply.choices[0].message.content)
        messages = consistency_messages(sample["question"], think, answer)
        reply = client.chat.completions.create(model="judge", messages=messages, temperature=0.0)
        results.append((claims, parse_verdict(reply.choices[0].message.content)))
    client.close()
    return results, 2 * len(completions)


def judge_ours(judge: JudgeClient, completions: list[str], samples: list[dict]) -> list:
    """The same 2 calls per completion through our client: all extractions at once, then all verdicts."""
    thinks = [extract_think(c) for c in completions]

    async def step():
        claims = await asyncio.gather(*(judge.extract_claims(t) for t in thinks))
        verdicts = await asyncio.gather(*(
            judge.check_consistency(s["question"], t, extract_answer(c)) for c, s, t in zip(completions, samples, thinks)
        ))
        return list(zip(claims, verdicts))

    return judge.run(step())


def tar_original(judged: list, samples: list[dict], embedder) -> list[float]:
    """TAR from the original way's judgements, embedding each completion's claims on their own."""
    return [
        match_claims(claims or {}, sample["temporal_grounding"], embedder.similarity) * float(bool(verdict))
        for (claims, verdict), sample in zip(judged, samples)
    ]


def fastest(repeats: int, run) -> tuple[object, float]:
    """(result, best seconds) of `run()` over `repeats` runs."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


def measure(url: str, completions, samples, embedder, args) -> list[dict]:
    """Every row of the table; asserts that all ways agree."""
    rows = []

    def row(scope, method, concurrency, cache, seconds, calls):
        rows.append({"scope": scope, "method": method, "concurrency": concurrency, "cache": cache,
                     "seconds": seconds, "calls": calls})

    (reference, calls), seconds = fastest(args.repeats, lambda: judge_original(url, completions, samples))
    row("judge calls", "original: 2 blocking calls per completion", 1, "off", seconds, calls)
    for concurrency in args.concurrency:
        judge = new_client(url, concurrency, cache=False)
        judged, seconds = fastest(args.repeats, lambda: judge_ours(judge, completions, samples))
        assert judged == reference, "our client's judgements differ from the original way's"
        row("judge calls", "ours: JudgeClient", concurrency, "off", seconds, judge.counters()["judge/calls"] // args.repeats)
        judge.close()
    judge = new_client(url, 16, cache=True)
    judge_ours(judge, completions, samples)  # the first step fills the cache
    before = judge.counters()["judge/calls"]
    _, seconds = fastest(args.repeats, lambda: judge_ours(judge, completions, samples))
    row("judge calls", "ours: the same step again", 16, "hit", seconds, judge.counters()["judge/calls"] - before)
    judge.close()

    # The whole TAR step: judge, MiniLM and matching (ours embeds the step's claims in one call).
    def original_step():
        return tar_original(judge_original(url, completions, samples)[0], samples, embedder)

    expected, seconds = fastest(args.repeats, original_step)
    row("TAR step", "original: sequential, embeddings per completion", 1, "off", seconds, 2 * len(completions))
    judge = new_client(url, 16, cache=False)
    context = RewardContext(judge=judge, embedder=embedder)
    values, seconds = fastest(args.repeats, lambda: tar_reward(completions, samples, context))
    assert values == expected, "our TAR differs from the original way's"
    row("TAR step", "ours: tar_reward", 16, "off", seconds, judge.counters()["judge/calls"] // args.repeats)
    judge.close()
    return rows


def new_client(url: str, concurrency: int, cache: bool) -> JudgeClient:
    judge = JudgeClient(url, "judge", max_concurrency=concurrency, timeout=60.0, retries=3, cache=cache)
    judge.run(judge.check_consistency("warm-up", "x", "y"))  # start the loop thread before timing
    judge.counts.clear()
    return judge


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the server waits per call")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way; the fastest is reported")
    args = parser.parse_args()

    embedder = get_embedder()
    embedder.encode(["warm-up"])
    server, url = start_server(args.latency)
    completions, samples = make_step(args.prompts, args.generations)
    rows = measure(url, completions, samples, embedder, args)
    server.shutdown()

    for scope in ("judge calls", "TAR step"):
        baseline = next(r["seconds"] for r in rows if r["scope"] == scope)
        for r in rows:
            if r["scope"] == scope:
                r["speedup"] = baseline / r["seconds"]
    report(rows, args, len(completions))


def report(rows: list[dict], args, completions: int) -> None:
    table = Table(title=f"TAR judge, one GRPO step: {completions} completions, server latency {args.latency * 1000:.0f} ms/call")
    for column in ("scope", "method", "concurrency", "cache", "judge calls", "wall time (s)", "speed-up"):
        table.add_column(column, justify="left" if column in ("scope", "method", "cache") else "right")
    for row in rows:
        table.add_row(row["scope"], row["method"], str(row["concurrency"]), row["cache"], str(row["calls"]),
                      f"{row['seconds']:.3f}", f"{row['speedup']:.1f}x")
    Console(width=120).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "prompts": args.prompts, "generations": args.generations, "latency_s": args.latency,
        "repeats": args.repeats, "seconds": "fastest of the repeats",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
