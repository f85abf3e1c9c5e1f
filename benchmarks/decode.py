"""video_r2's frame loading against its peer, qwen-vl-utils' ``fetch_video``, and against
decode-everything-then-index (the original recipe).

All three return the same T frames, ``linspace(0, N - 1, T)`` (the original's positions), resized into
the recipe's pixel budget (360*420):

* ``video_r2``: ``video_r2.video.load_frames``, what the data module runs per video: a header-only
  open, only the T planned frames decoded, the time and the subtitle drawn on each native frame (as the
  original does; the peer draws nothing), then the resize;
* ``qwen_vl_utils``: ``qwen_vl_utils.fetch_video`` 0.0.14 with its torchcodec backend (its default
  when torchcodec is installed: an exact-mode decoder, which scans the file first, and its default
  ``TORCHCODEC_NUM_THREADS=8``), asked for ``nframes=T``;
* ``full``: the original recipe read a whole video with torchvision's ``read_video`` and then indexed a
  few frames. torchvision 0.29 no longer has ``read_video``, so decoding every frame with torchcodec
  into one tensor stands in for it.

Clips: 640x360, 30 fps, H.264 (x264 preset ``superfast``: CABAC and B-frames, as in ordinary
encodes) with a keyframe every ``--gop-seconds`` (2 s by default, common for streamed video), of a
moving pattern (sliding gradients and a checkerboard), generated once with torchcodec's streaming
encoder and cached. Seeking decodes from the keyframe before each sampled frame, so the
sampled method's cost depends on the keyframe interval: longer GOPs make it slower.

Each case runs in its own subprocess, so its peak memory is measured alone: the table shows the rise of
the peak resident set size over the process's size after its imports (torch alone is ~0.8 GB). Each method is
timed as the best of its repeats (``--repeats`` for video_r2 and qwen_vl_utils, ``--full-repeats``
for full decoding), in wall-clock and in CPU seconds: on a machine shared with other work the wall clock
swings by 2x from run to run while CPU time stays steadier (video_r2 and full decode on one FFmpeg thread;
qwen_vl_utils' eight threads show in its CPU time). Full decoding
of clips longer than ``--skip-full-above-minutes`` is skipped: 20 minutes would need ~25 GB.

    python benchmarks/decode.py            # 1, 5, 20 minutes x 32, 128 frames
    python benchmarks/decode.py --quick    # 1 minute only, one repeat
    python benchmarks/decode.py --check    # fail unless video_r2 is >= 2x faster (wall) than qwen_vl_utils
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

from video_r2.data.budget import DEFAULT_MAX_PIXELS, fit_size, frame_indices  # noqa: E402
from video_r2.video import load_frames, open_video, parse_srt, resize_frames  # noqa: E402

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


# ---------------------------------------------------------------- the three methods (run in a subprocess)


def subtitles_for(clip: Path) -> Path:
    """An .srt beside the clip with a cue every other 2 s, so half the frames carry a subtitle."""
    path = clip.with_suffix(".srt")
    if not path.exists():
        stamp = lambda t: f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d},000"  # noqa: E731
        seconds = int(open_video(clip)[1].duration)
        cues = [f"{i + 1}\n{stamp(t)} --> {stamp(t + 2)}\nSubtitle number {i + 1}, long enough to wrap on a small frame\n"
                for i, t in enumerate(range(0, seconds, 4))]
        path.write_text("\n".join(cues))
    return path


def video_r2_frames(path: Path, num_frames: int) -> torch.Tensor:
    """video_r2's loader: open (header only), decode the T planned frames, draw time and subtitle, resize."""
    opened = open_video(path)
    info = opened[1]
    size = fit_size(info.height, info.width, max_pixels=DEFAULT_MAX_PIXELS)
    frames, _, _ = load_frames(path, num_frames, size, "linspace", parse_srt(subtitles_for(path)),
                               draw_timestamps=True, draw_subtitles=True, opened=opened)
    return frames


def qwen_vl_utils_frames(path: Path, num_frames: int) -> torch.Tensor:
    """The peer: qwen-vl-utils' fetch_video (torchcodec backend), the same T frames and pixel budget."""
    from qwen_vl_utils.vision_process import fetch_video

    return fetch_video({"video": str(path), "nframes": num_frames, "max_pixels": DEFAULT_MAX_PIXELS})


def full_then_index(path: Path, num_frames: int) -> torch.Tensor:
    """The original approach: decode every frame into one tensor, then index T evenly spaced ones."""
    from torchcodec.decoders import VideoDecoder

    everything = VideoDecoder(str(path)).get_all_frames().data  # [N, C, H, W], all in memory
    chosen = everything[frame_indices(len(everything), num_frames)]
    return resize_frames(chosen, fit_size(*chosen.shape[-2:], max_pixels=DEFAULT_MAX_PIXELS))


METHODS = {"video_r2": video_r2_frames, "qwen_vl_utils": qwen_vl_utils_frames, "full": full_then_index}


def run_case(method: str, path: Path, num_frames: int, repeats: int) -> dict:
    """Time one method in this (fresh) process and report its peak resident memory."""
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "torchcodec"  # before qwen_vl_utils is imported
    import qwen_vl_utils.vision_process  # noqa: F401 - imported before the baseline, as torch is

    open_video(path)  # loads FFmpeg's libraries so their one-off start-up is not timed
    subtitles_for(path)
    baseline_mb = _peak_rss_mb()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        frames = METHODS[method](path, num_frames)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        assert frames.shape[0] == num_frames, frames.shape
        del frames
    peak = _peak_rss_mb()
    return {"seconds": min(seconds), "cpu_seconds": min(cpu_seconds), "all_seconds": seconds,
            "all_cpu_seconds": cpu_seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline_mb,
            "peak_rise_mb": peak - baseline_mb}


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
            row["video_r2"] = measure("video_r2", clip, num_frames, repeats)
            row["qwen_vl_utils"] = measure("qwen_vl_utils", clip, num_frames, repeats)
            if minutes > args.skip_full_above_minutes:
                row["full"] = {"skipped": f"clip longer than --skip-full-above-minutes={args.skip_full_above_minutes:g}"}
            else:
                row["full"] = measure("full", clip, num_frames, full_repeats)
            for other in ("qwen_vl_utils", "full"):
                if "seconds" in row["video_r2"] and "seconds" in row[other]:
                    row[f"speedup_vs_{other}_wall"] = row[other]["seconds"] / row["video_r2"]["seconds"]
                    row[f"speedup_vs_{other}_cpu"] = row[other]["cpu_seconds"] / row["video_r2"]["cpu_seconds"]
            rows.append(row)
            print(format_row(row), flush=True)

    print()
    print(format_table(rows))
    baselines = [r[m]["baseline_rss_mb"] for r in rows for m in METHODS if "baseline_rss_mb" in r[m]]
    if baselines:
        print(f"(peak +MB: the rise of the process's peak RSS over its {min(baselines):.0f}-{max(baselines):.0f} MB "
              f"after imports. Seconds: best of {repeats} (video_r2, qwen_vl_utils) / {full_repeats} (full) runs;\n"
              " cpu s = the process's CPU time, the steadier measure when other work shares the cores;\n"
              " x qwen / x full = how many times faster video_r2 is, wall / cpu.)")
    report = {
        "description": "seconds per sample (T frames at linspace positions, resized to the 360*420 budget): "
                       "video_r2.video.load_frames (only the planned frames decoded, time and subtitle drawn on "
                       "the native frames) vs qwen_vl_utils.fetch_video 0.0.14 (torchcodec backend, no overlays) "
                       "vs decoding every frame then indexing; peak RSS per case in its own process",
        "clips": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "codec": "h264 x264 superfast",
                  "gop_seconds": args.gop_seconds, "content": "moving gradients + checkerboard"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchcodec": _torchcodec_version(), "video_r2_ffmpeg_threads": 1,
                    "qwen_vl_utils_ffmpeg_threads": int(os.environ.get("TORCHCODEC_NUM_THREADS", 8))},
        "repeats": {"video_r2": repeats, "qwen_vl_utils": repeats, "full": full_repeats, "statistic": "min"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    slow = [r for r in rows if r.get("speedup_vs_qwen_vl_utils_wall", 0) < 2.0]
    if args.check and slow:
        raise SystemExit(f"video_r2 is not 2x faster than qwen_vl_utils in {len(slow)} case(s)")


def format_row(row: dict) -> str:
    return " | ".join(_cells(row))


def format_table(rows: list[dict]) -> str:
    header = ["clip", "T"] + [f"{m} {c}" if c == "s" else c for m in METHODS for c in ("s", "cpu s", "peak +MB")]
    header += ["x qwen", "x full"]
    lines = [header] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(out)


def _cells(row: dict) -> list[str]:
    def method_cells(result: dict) -> list[str]:
        if "seconds" not in result:
            return ["skipped" if "skipped" in result else "failed", "-", "-"]
        return [f"{result['seconds']:.3f}", f"{result['cpu_seconds']:.3f}", f"{result['peak_rise_mb']:.0f}"]

    def ratio(other: str) -> str:
        wall, cpu = row.get(f"speedup_vs_{other}_wall"), row.get(f"speedup_vs_{other}_cpu")
        return f"{wall:.1f}/{cpu:.1f}" if wall is not None else "n/a"

    cells = [f"{row['minutes']:g} min", str(row["frames"])]
    for method in METHODS:
        cells += method_cells(row[method])
    return cells + [ratio("qwen_vl_utils"), ratio("full")]


def _torchcodec_version() -> str:
    import torchcodec

    return torchcodec.__version__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0, 20.0], help="clip lengths")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128], help="frames per sample (T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of video_r2 and qwen_vl_utils (best kept)")
    parser.add_argument("--full-repeats", type=int, default=2, help="timed runs of full decoding (best kept)")
    parser.add_argument("--gop-seconds", type=float, default=2.0, help="keyframe interval of the clips")
    parser.add_argument("--skip-full-above-minutes", type=float, default=5.0,
                        help="skip full decoding of longer clips (it holds every frame: ~1.2 GB per minute)")
    parser.add_argument("--quick", action="store_true", help="1-minute clip, one repeat (~30 s)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless video_r2 is >= 2x faster than qwen_vl_utils")
    parser.add_argument("--clips", type=Path, default=RESULTS / "clips", help="where generated clips are cached")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    parser.add_argument("--run-case", nargs=4, metavar=("METHOD", "PATH", "FRAMES", "REPEATS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
