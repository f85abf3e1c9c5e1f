"""How the rules judge's parsing time grows with the reasoning it reads (it should grow linearly).

    .venv/bin/python benchmarks/rules_judge.py                    # 7/14/28/56 KB, prints a table
    .venv/bin/python benchmarks/rules_judge.py --sizes 7 56 900 --repeats 5

For each shape of reasoning and each size, `extract_claims` and `judge_consistency` run `--repeats` times in
this process (no server, no HTTP) and the fastest run is reported, the one least disturbed on a shared
machine. The shapes:
- sentences: ordinary reasoning, one timestamped observation per sentence;
- one sentence: times separated by commas and no full stop, the shape that was quadratic before;
- blank runs: long runs of spaces inside lines;
- one key: the same time stated again and again with different claims.
"ms per 10 KB" stays flat when the time is linear. Writes benchmarks/results/rules_judge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from video_r2.judge.rules import extract_claims, judge_consistency

RESULTS = Path(__file__).parent / "results" / "rules_judge.json"
QUESTION = "What fills the screen at 00:03?\nA) red circle\nB) green square\nC) blue triangle\nD) yellow star"


def _repeat(piece, size: int) -> str:
    parts, length, i = [], 0, 0
    while length < size:
        parts.append(piece(i))
        length += len(parts[-1])
        i += 1
    return "".join(parts)[:size]


SHAPES = {
    "sentences": lambda i: f"At 00:{i % 60:02d} a blue triangle number {i} fills the screen, then it turns red. ",
    "one sentence": lambda i: f"at 00:{i % 60:02d} shape {i} appears, ",
    "blank runs": lambda i: f"At 00:{i % 60:02d} shape {i}" + " " * 200 + "appears.\n",
    "one key": lambda i: f"At 00:03 claim number {i} holds. ",
}


def best_seconds(think: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extract_claims(think)
        judge_consistency(QUESTION, think + " So the answer is C.", "C")
        times.append(time.perf_counter() - started)
    return min(times)


def measure(sizes_kb: list[int], repeats: int) -> list[dict]:
    rows = []
    for shape, piece in SHAPES.items():
        for kb in sizes_kb:
            seconds = best_seconds(_repeat(piece, kb * 1000), repeats)
            rows.append({"shape": shape, "kb": kb, "seconds": seconds, "ms_per_10kb": 1000 * seconds / (kb / 10)})
    return rows


def print_table(rows: list[dict]) -> None:
    table = Table(title="rules judge: extraction + consistency time vs reasoning size (fastest run)")
    for name in ("shape", "KB", "ms", "ms per 10 KB", "x time for x size"):
        table.add_column(name, justify="right")
    first = {}
    for r in rows:
        base = first.setdefault(r["shape"], r)
        growth = f"{r['seconds'] / base['seconds']:.1f} for {r['kb'] / base['kb']:g}"
        table.add_row(r["shape"], str(r["kb"]), f"{1000 * r['seconds']:.1f}", f"{r['ms_per_10kb']:.2f}", growth)
    Console(width=110).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28, 56], help="reasoning sizes in KB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = measure(args.sizes, args.repeats)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
