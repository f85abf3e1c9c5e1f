"""Sampled-frame decoding (video_r2.video) against decode-everything-then-index (the original recipe).

The original recipe read a whole video with torchvision's ``read_video`` and then indexed a few
frames. torchvision 0.29 no longer has ``read_video``, so decoding every frame with torchcodec into
one tensor stands in for it. Both methods return the same thing: T evenly spaced frames resized
into the recipe's pixel budget (360*420).

Clips: 640x360, 30 fps, H.264 (x264 preset ``superfast``: CABAC and B-frames, as in ordinary
encodes) with a keyframe every ``--gop-seconds`` (2 s by default, common for streamed video), of a
moving pattern (sliding gradients and a checkerboard), generated once with torchcodec's streaming
encoder and cached. Seeking decodes from the keyframe before each sampled frame, so the
sampled method's cost depends on the keyframe interval: longer GOPs make it slower.

Each case runs in its own subprocess, so its peak memory (resident set size, which includes
the ~0.8 GB of an imported torch, printed below the table) is measured alone. Each method is
timed as the best of its repeats (``--repeats`` for sampling, ``--full-repeats`` for full
decoding), in wall-clock and in CPU seconds: on a machine shared with other work the wall clock
swings by 2x from run to run while CPU time (decoding is single-threaded) stays steady. Full decoding
of clips longer than ``--skip-full-above-minutes`` is skipped: 20 minutes would need ~25 GB.

    python benchmarks/decode.py            # 1, 5, 20 minutes x 32, 128 frames
    python benchmarks/decode.py --quick    # 1 minute only, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from video_r2.video import DEFAULT_MAX_PIXELS, fit_size, resize_frames, sample_frames  # noqa: E402

WIDTH, HEIGHT, FPS = 640, 360, 30
PATTERN_SECONDS = 2  # the pattern repeats every 2 s; the encoder sees no repetition across keyframes
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- clip generation


def moving_pattern(num_frames: int) -> torch.Tensor:
    """``num_frames`` 640x360 frames of sliding gradients and a drifting checkerboard: every
    macroblock changes every frame, as in real footage with motion, at about 0.8 Mbit/s."""
    y = torch.arange(HEIGHT).view(HEIGHT, 1)
    x = torch.arange(WIDTH).view(1, WIDTH)
    frames = torch.empty(num_frames, 3, HEIGHT, WIDTH, dtype=torch.uint8)
    for i in range(num_frames):
        frames[i, 0] = (x + 4 * i) % 256
        frames[i, 1] = (2 * y + 3 * i) % 256
        frames[i, 2] = ((x + i) // 40 + y // 40) % 2 * 200
    return frames


def make_clip(minutes: float, gop_seconds: float, folder: Path) -> Path:
    """The cached clip of ``minutes`` minutes, encoded chunk by chunk so memory stays small."""
    from torchcodec.encoders import Encoder

    gop = max(1, round(gop_seconds * FPS))
    path = folder / f"clip_{minutes:g}min_{WIDTH}x{HEIGHT}_{FPS}fps_gop{gop}_superfast.mp4"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    pattern = moving_pattern(PATTERN_SECONDS * FPS)
    chunks = round(minutes * 60 / PATTERN_SECONDS)
    print(f"[decode] generating {path.name} ({chunks * len(pattern)} frames) ...", flush=True)
    started = time.perf_counter()
    encoder = Encoder()
    stream = encoder.add_video(
        height=HEIGHT, width=WIDTH, frame_rate=FPS, preset="superfast", extra_options={"g": gop}
    )
    with encoder.open_file(partial):
        for _ in range(chunks):
            stream.add_frames(pattern)
    partial.rename(path)  # only a finished clip is cached
    print(f"[decode]   done in {time.perf_counter() - started:.0f} s, {path.stat().st_size / 1e6:.0f} MB")
    return path


# ---------------------------------------------------------------- the two methods (run in a subprocess)


def sampled(path: Path, num_frames: int) -> torch.Tensor:
    """video_r2's loader: seek to each of the T times, decode only those frames."""
    frames, _ = sample_frames(path, fps=1.0, max_frames=num_frames, num_frames=num_frames)
    return frames


def full_then_index(path: Path, num_frames: int) -> torch.Tensor:
    """The original approach: decode every frame into one tensor, then index T evenly spaced ones."""
    from torchcodec.decoders import VideoDecoder

    everything = VideoDecoder(str(path)).get_all_frames().data  # [N, C, H, W], all in memory
    picks = torch.linspace(0, len(everything) - 1, num_frames).round().long()
    chosen = everything[picks]
    return resize_frames(chosen, fit_size(*chosen.shape[-2:], max_pixels=DEFAULT_MAX_PIXELS))


METHODS = {"sampled": sampled, "full": full_then_index}


def run_case(method: str, path: Path, num_frames: int, repeats: int) -> dict:
    """Time one method in this (fresh) process and report its peak resident memory."""
    from video_r2.video import probe

    probe(path)  # loads FFmpeg's libraries so their one-off start-up is not timed
    baseline_mb = _peak_rss_mb()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        frames = METHODS[method](path, num_frames)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        assert frames.shape[0] == num_frames, frames.shape
        del frames
    return {"seconds": min(seconds), "cpu_seconds": min(cpu_seconds), "all_seconds": seconds,
            "all_cpu_seconds": cpu_seconds, "peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline_mb}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: str, path: Path, num_frames: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--run-case", method, str(path), str(num_frames), str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- table and JSON


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_case:
        method, path, num_frames, repeats = args.run_case
        print(json.dumps(run_case(method, Path(path), int(num_frames), int(repeats))))
        return

    minutes_list = [1.0] if args.quick else args.minutes
    repeats = 1 if args.quick else args.repeats
    full_repeats = 1 if args.quick else args.full_repeats
    rows = []
    for minutes in minutes_list:
        clip = make_clip(minutes, args.gop_seconds, args.clips)
        for num_frames in args.frames:
            row = {"minutes": minutes, "frames": num_frames, "clip": clip.name}
            row["sampled"] = measure("sampled", clip, num_frames, repeats)
            if minutes > args.skip_full_above_minutes:
                row["full"] = {"skipped": f"clip longer than --skip-full-above-minutes={args.skip_full_above_minutes:g}"}
            else:
                row["full"] = measure("full", clip, num_frames, full_repeats)
            if "seconds" in row["sampled"] and "seconds" in row["full"]:
                row["speedup_wall"] = row["full"]["seconds"] / row["sampled"]["seconds"]
                row["speedup_cpu"] = row["full"]["cpu_seconds"] / row["sampled"]["cpu_seconds"]
            rows.append(row)
            print(format_row(row), flush=True)

    print()
    print(format_table(rows))
    baselines = [r[m]["baseline_rss_mb"] for r in rows for m in ("sampled", "full") if "baseline_rss_mb" in r[m]]
    if baselines:
        print(f"(peak MB: the whole process, {min(baselines):.0f}-{max(baselines):.0f} MB of it after imports, "
              f"before decoding. Seconds: best of {repeats} sampled / {full_repeats} full runs; fr/s = T / wall s;\n"
              " cpu s = the process's CPU time, the steadier measure when other work shares the cores.)")
    report = {
        "description": "seconds per sample (T frames resized to the 360*420 budget), sampled seek-decoding "
                       "vs decoding every frame then indexing; peak RSS per case in its own process",
        "clips": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "codec": "h264 x264 superfast",
                  "gop_seconds": args.gop_seconds, "content": "moving gradients + checkerboard"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchcodec": _torchcodec_version(), "ffmpeg_threads": 1},
        "repeats": {"sampled": repeats, "full": full_repeats, "statistic": "min"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


def format_row(row: dict) -> str:
    return " | ".join(_cells(row))


def format_table(rows: list[dict]) -> str:
    header = ["clip", "T", "sampled s", "cpu s", "fr/s", "peak MB",
              "full s", "cpu s", "fr/s", "peak MB", "speedup wall", "speedup cpu"]
    lines = [header] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(out)


def _cells(row: dict) -> list[str]:
    def method_cells(result: dict) -> list[str]:
        if "seconds" not in result:
            return ["skipped" if "skipped" in result else "failed", "-", "-", "-"]
        return [f"{result['seconds']:.2f}", f"{result['cpu_seconds']:.2f}",
                f"{row['frames'] / result['seconds']:.0f}", f"{result['peak_rss_mb']:.0f}"]

    speedups = [f"{row[key]:.1f}x" if key in row else "n/a" for key in ("speedup_wall", "speedup_cpu")]
    return [f"{row['minutes']:g} min", str(row["frames"]), *method_cells(row["sampled"]),
            *method_cells(row["full"]), *speedups]


def _torchcodec_version() -> str:
    import torchcodec

    return torchcodec.__version__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0, 20.0], help="clip lengths")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128], help="frames per sample (T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the sampled method (best kept)")
    parser.add_argument("--full-repeats", type=int, default=2, help="timed runs of full decoding (best kept)")
    parser.add_argument("--gop-seconds", type=float, default=2.0, help="keyframe interval of the clips")
    parser.add_argument("--skip-full-above-minutes", type=float, default=5.0,
                        help="skip full decoding of longer clips (it holds every frame: ~1.2 GB per minute)")
    parser.add_argument("--quick", action="store_true", help="1-minute clip, one repeat (~20 s)")
    parser.add_argument("--clips", type=Path, default=RESULTS / "clips", help="where generated clips are cached")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    parser.add_argument("--run-case", nargs=4, metavar=("METHOD", "PATH", "FRAMES", "REPEATS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
