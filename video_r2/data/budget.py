"""How many frames, at which positions, at what size: planned from a video's header and the text alone.

`Sampling` is the one description of frame sampling that the data module, `video-r2 check-data` and
`video-r2 evaluate` share. Planning follows the original recipe's fork of qwen-vl-utils:

* frame count: ``total_frames / native_fps * fps``, clamped to ``[min_frames, max_frames]`` (bounds rounded
  inwards to even numbers), capped at the video's frame count, then floored to an even number, because
  Qwen2.5-VL packs frames in pairs;
* positions: ``linspace(0, total_frames - 1, T)`` rounded, so the first and the last frame are both seen;
* size: Qwen's ``smart_resize`` rule (`fit_size`).

Token budget: a video of T frames at H x W costs (T / 2) * (H / 28) * (W / 28) tokens in Qwen2.5-VL
(2-frame temporal patches, 14-pixel patches merged 2 x 2), so a sample's length is known before anything
is decoded; `fit_budget` shrinks a plan that does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

PATCH_FACTOR = 28  # Qwen2.5-VL: 14-pixel ViT patches, merged 2x2 before the language model
TEMPORAL_PATCH_SIZE = 2  # Qwen2.5-VL packs two consecutive frames into one temporal patch
# Qwen's video minimum (128 * 28 * 28) would upscale the tiny demo videos thirty-fold; 56 * 56 is
# transformers' Qwen2-VL image-processor minimum (four merged tokens). The recipe configs set Qwen's.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 360 * 420  # the recipe's video_max_pixels
IMAGE_MAX_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's usual image ceiling
MAX_ASPECT_RATIO = 200  # Qwen's processor rejects anything more extreme; fail here with a clearer message
_PIXEL_STEP = 0.9  # each shrink step keeps this share of the per-frame pixel budget


@dataclass(frozen=True)
class Sampling:
    """How frames are sampled and sized (the processor's patch sizes are separate: see `Grid`).

    Args:
        fps: frames sampled per second of video (recipe: 1.0 SFT, 2.0 GRPO).
        max_frames: frame cap per video (recipe: 128 SFT, 32 GRPO).
        min_frames: frames even for a very short video (never more than the video has).
        video_min_pixels: per-frame pixel floor.
        video_max_pixels: per-frame pixel ceiling (recipe: 360*420).
        image_min_pixels: pixel floor of `image` records.
        image_max_pixels: pixel ceiling of `image` records.
        frame_positions: "linspace" takes frames 0 .. N-1 evenly, first and last included (the original);
            "centres" takes the frame shown at the centre of each of T equal slots of the video (our own
            departure: no frame sits on the very start or end, and every slot is represented equally).
    """

    fps: float = 1.0
    max_frames: int = 128
    min_frames: int = 4
    video_min_pixels: int = DEFAULT_MIN_PIXELS
    video_max_pixels: int = DEFAULT_MAX_PIXELS
    image_min_pixels: int = DEFAULT_MIN_PIXELS
    image_max_pixels: int = IMAGE_MAX_PIXELS
    frame_positions: Literal["linspace", "centres"] = "linspace"

    def __post_init__(self):  # a bad config fails at construction, not as a bad sample in a worker
        plan_frames(1000, 1.0, self.fps, self.max_frames, self.min_frames)
        for kind in ("video", "image"):
            fit_size(28, 28, *self.pixel_range(kind))
        if self.frame_positions not in ("linspace", "centres"):
            raise ValueError(f"frame_positions must be 'linspace' or 'centres', got {self.frame_positions!r}")

    def pixel_range(self, kind: str) -> tuple[int, int]:
        if kind == "video":
            return self.video_min_pixels, self.video_max_pixels
        return self.image_min_pixels, self.image_max_pixels


@dataclass(frozen=True)
class Grid:
    """The processor's patch sizes, which turn a plan into a token count."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE

    @classmethod
    def of(cls, processor: Any) -> "Grid":
        vp = processor.video_processor
        return cls(vp.patch_size, vp.merge_size, vp.temporal_patch_size)

    def tokens(self, media: "Media") -> int:
        """Vision tokens the processor will put in place of one `<|video_pad|>` / `<|image_pad|>`."""
        grid_t = math.ceil(media.frames / self.temporal_patch_size)
        grid_h, grid_w = (side // self.patch_size for side in media.size)
        return grid_t * grid_h * grid_w // (self.merge_size**2)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says, read without decoding a frame.

    ``start`` is the first frame's presentation time (not always 0), ``duration`` the time from it to
    the end of the last frame; ``fps`` and ``num_frames`` are ``None`` when the header lacks them.
    ``width``/``height`` are the coded size, as the frames come out of the decoder.
    """

    path: Path
    duration: float
    start: float
    width: int
    height: int
    fps: float | None
    num_frames: int | None

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def native_fps(self) -> float:
        """The frame rate planning uses; 24 (what Qwen's processor assumes) when the header has none."""
        if self.fps:
            return self.fps
        return self.num_frames / self.duration if self.num_frames and self.duration > 0 else 24.0

    @property
    def total_frames(self) -> int:
        """The frame count planning uses: the header's, else duration x frame rate."""
        return self.num_frames or max(1, round(self.duration * self.native_fps))


@dataclass
class Media:
    """One video or image of a sample: its source facts and, once planned, its frame count and size."""

    kind: Literal["video", "image"]
    path: Path
    height: int  # source size
    width: int
    info: VideoInfo | None = None  # videos
    handle: Any = None  # videos: the opened decoder that read `info`, reused to decode (owned by the reader)
    frames: int = 1  # planned
    size: tuple[int, int] = (0, 0)  # planned (H, W), multiples of 28


class TooLong(ValueError):
    """A sample that exceeds its token budget even at `min_frames` and the minimum pixels."""


# --------------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------------


def _even_up(n: float) -> int:
    return 2 * math.ceil(n / 2)


def _even_down(n: float) -> int:
    return 2 * math.floor(n / 2)


def plan_frames(total_frames: int, native_fps: float, fps: float, max_frames: int, min_frames: int = 4) -> int:
    """How many frames to sample, by the original's rule (qwen-vl-utils' ``smart_nframes``).

    ``total_frames / native_fps * fps`` (the video's length in frames at the sampling rate) is clamped
    to ``[min_frames, max_frames]``, rounded inwards to even numbers, then capped at ``total_frames`` and
    floored to an even number. Where qwen-vl-utils raises for a video of a single frame, we return 2
    (that frame twice), the smallest count Qwen2.5-VL takes.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if native_fps <= 0 or total_frames < 0:
        raise ValueError(f"need a positive frame rate and frame count, got {native_fps} fps, {total_frames} frames")
    low = max(TEMPORAL_PATCH_SIZE, _even_up(min_frames))
    high = _even_down(max_frames)
    if high < low:
        raise ValueError(f"max_frames={max_frames} leaves no even frame count >= min_frames={min_frames}")
    wanted = total_frames / native_fps * fps
    return max(TEMPORAL_PATCH_SIZE, _even_down(min(max(wanted, low), high, total_frames)))


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` frame indices from the first to the last frame, evenly spread (the original's
    ``linspace``; computed with torch's float32 linspace and round-half-to-even, so they equal it)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return torch.linspace(0, max(0, total_frames - 1), num_frames).round().long().tolist()


def sample_times(start: float, duration: float, num_frames: int) -> list[float]:
    """``num_frames`` times at the centres of equal slots of ``[start, start + duration)`` (the
    "centres" positions): none falls on the video's end, where there is no frame to show."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    step = duration / num_frames
    return [start + (i + 0.5) * step for i in range(num_frames)]


def seconds_per_grid(info: VideoInfo, num_frames: int, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> float:
    """``second_per_grid_ts`` as Qwen's processor computes it from qwen-vl-utils' sample fps
    (``num_frames / total_frames * native_fps``): the seconds one temporal patch spans."""
    return temporal_patch_size / (num_frames / max(info.total_frames, 1e-6) * info.native_fps)


# --------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------


def fit_size(
    height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = PATCH_FACTOR,
) -> tuple[int, int]:
    """The ``(height, width)`` the model sees: sides multiples of ``factor``, aspect kept,
    ``height * width`` within ``[min_pixels, max_pixels]`` (Qwen's ``smart_resize`` rule).

    Each side is rounded to the nearest multiple; if the area is then out of budget both sides are
    scaled by one factor (rounding down when shrinking, up when growing) so the budget holds.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not factor * factor <= max_pixels or min_pixels > max_pixels:
        raise ValueError(f"need {factor * factor} <= max_pixels and min_pixels <= max_pixels, "
                         f"got min_pixels={min_pixels}, max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}:1")
    new_h = max(factor, round(height / factor) * factor)
    new_w = max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


# --------------------------------------------------------------------------------------------------
# a sample's plan within its token budget
# --------------------------------------------------------------------------------------------------


def plan_media(media: list[Media], s: Sampling, frame_cap: int | None = None, pixel_scale: float = 1.0) -> None:
    """Set each media's planned frames and size for a frame cap and a scale of the pixel ceilings."""
    for m in media:
        if m.kind == "video":
            m.frames = plan_frames(m.info.total_frames, m.info.native_fps, s.fps, frame_cap or s.max_frames,
                                   s.min_frames)
        lo, hi = s.pixel_range(m.kind)
        m.size = fit_size(m.height, m.width, lo, max(lo, int(hi * pixel_scale)))


def fit_budget(media: list[Media], s: Sampling, grid: Grid, text_tokens: int, budget: int | None) -> str | None:
    """Plan `media` so that text + vision tokens fit `budget`: fewer frames first (down to `min_frames`),
    then fewer pixels (down to the minimum). Returns a note on what was shrunk, None when nothing was;
    raises TooLong when even the smallest plan does not fit (ValueError: a size `fit_size` refuses)."""
    plan_media(media, s)
    total = lambda: text_tokens + sum(grid.tokens(m) for m in media)  # noqa: E731
    if budget is None or total() <= budget:
        return None
    before = total()
    videos = [m for m in media if m.kind == "video"]
    low = max(grid.temporal_patch_size, s.min_frames + s.min_frames % 2)
    cap = max((m.frames for m in videos), default=low)
    while total() > budget and cap > low:
        cap -= 2
        plan_media(media, s, frame_cap=cap)
    scale = 1.0
    while total() > budget:
        if all(int(s.pixel_range(m.kind)[1] * scale) <= s.pixel_range(m.kind)[0] for m in media):
            raise TooLong(f"{total()} tokens > {budget} even at {low} frames and the minimum pixels "
                          "(raise the length limit or lower the min pixels)")
        scale *= _PIXEL_STEP
        plan_media(media, s, frame_cap=cap, pixel_scale=scale)
    shown = ", ".join(f"{m.path.name}: {m.frames} frames at {m.size[0]}x{m.size[1]}" for m in media)
    return f"{before} tokens > {budget}: shrunk to {total()} ({shown})"
