"""The time (HH:MM:SS, top left) and the subtitle showing (bottom centre), drawn on a frame.

Drawn on the native frame, before it is resized, as the original recipe does (its fork of qwen-vl-utils
draws right after decoding): the text is sized from the source's short side, and the resize then
shrinks it with the picture, so a released checkpoint sees the text as it was trained on it.

The style is the original's: DejaVu Sans; time at 5% of the short side clamped to 16-72 px, red, or
white where the corner is dark or red; subtitles at 6% clamped to 20-96 px, white, wrapped to 90% of the
width, on a black box of alpha 0.55; both with a thin black stroke.

Only the strip of rows the text covers is turned into an image and back: on a 1080p frame the text
covers a few percent of it, and converting whole frames would cost more than decoding them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from video_r2.formats import format_hms

__all__ = ["draw_timestamp", "draw_subtitle", "overlay_frames", "subtitle_at"]

_TIME_FONT = (0.05, 16, 72)  # (fraction of the short side, min px, max px)
_SUBTITLE_FONT = (0.06, 20, 96)
_SUBTITLE_MAX_HEIGHT = 0.4  # a long cue may cover at most this fraction of the frame
_SUBTITLE_WIDTH = 0.90  # wrap subtitles to 90% of the frame's width
_BOX_RGBA = (0, 0, 0, int(255 * 0.55))  # semi-transparent black behind subtitles
_RED, _WHITE = (255, 0, 0), (255, 255, 255)


def subtitle_at(cues: Sequence, t: float) -> str | None:
    """The text showing at time ``t`` (cues ``(start, end, text)`` with ``start <= t < end``,
    overlapping ones joined by a line break), or ``None`` when no cue is showing."""
    showing = [cue[2] for cue in cues if cue[0] <= t < cue[1]]
    return "\n".join(showing) if showing else None


def draw_timestamp(frame: torch.Tensor, t: float) -> torch.Tensor:
    """A copy of a uint8 ``[C, H, W]`` frame with ``format_hms(t)`` drawn at the top left."""
    out = _checked(frame).clone()
    _draw_time_text(out, format_hms(t))
    return out


def draw_subtitle(frame: torch.Tensor, text: str) -> torch.Tensor:
    """A copy of a uint8 ``[C, H, W]`` frame with ``text`` at the bottom centre, wrapped to the
    frame's width, on a semi-transparent box."""
    out = _checked(frame).clone()
    _draw_subtitle_text(out, text)
    return out


def overlay_frames(
    frames: torch.Tensor,
    timestamps: Sequence[float],
    cues: Sequence | None = None,
    draw_timestamps: bool = True,
    draw_subtitles: bool = True,
) -> torch.Tensor:
    """Draw each frame's time and the subtitle showing at that time on uint8 ``[T, C, H, W]``
    frames; returns new frames (the input is left unchanged)."""
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    out = frames.clone()
    draw_subtitles = draw_subtitles and bool(cues)
    for frame, t in zip(out, timestamps):
        _checked(frame)
        if draw_timestamps:
            _draw_time_text(frame, format_hms(t))
        text = subtitle_at(cues, t) if draw_subtitles else None
        if text:
            _draw_subtitle_text(frame, text)
    return out


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    # matplotlib (a dependency already) ships DejaVu Sans: the original's font, nothing downloaded.
    # Found without importing matplotlib, which would cost a worker ~0.4 s at its first sample.
    import importlib.util

    package = Path(importlib.util.find_spec("matplotlib").origin).parent
    return str(package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), size)


def _font_size(height: int, width: int, style: tuple[float, int, int]) -> int:
    fraction, low, high = style
    return max(low, min(high, round(min(height, width) * fraction)))


def _time_colour(frame: torch.Tensor) -> tuple[int, int, int]:
    """Red, or white where the top-left patch (up to 40 x 200 px) is dark or red: the original's rule."""
    r, g, b = frame[:, :40, :200].float().mean(dim=(1, 2)).tolist()
    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 80.0  # perceptual luminance
    reddish = r > 120.0 and r - max(g, b) > 40.0
    return _WHITE if dark or reddish else _RED


def _draw_time_text(frame: torch.Tensor, text: str) -> None:
    """Draw in place on ``frame``, through an image of the corner the text covers only."""
    _, height, width = frame.shape
    size = _font_size(height, width, _TIME_FONT)
    margin, stroke = max(5, size // 4), max(1, size // 12)
    font = _font(size)
    _, _, right, bottom = font.getbbox(text, stroke_width=stroke)
    rows, cols = min(height, margin + bottom + 1), min(width, margin + right + 1)
    colour = _time_colour(frame)  # from the frame before anything is drawn on it
    corner = _to_image(frame[:, :rows, :cols])
    ImageDraw.Draw(corner).text((margin, margin), text, font=font, fill=colour, stroke_width=stroke,
                                stroke_fill=(0, 0, 0))
    frame[:, :rows, :cols] = _to_tensor(corner)


def _draw_subtitle_text(frame: torch.Tensor, text: str) -> None:
    """Draw in place on ``frame``, through an image of the bottom strip the box covers only."""
    _, height, width = frame.shape
    size = _font_size(height, width, _SUBTITLE_FONT)
    margin = max(6, int(size * 0.25))
    gap = int(0.2 * size)  # between lines
    line_height = size + gap
    max_lines = max(1, int(_SUBTITLE_MAX_HEIGHT * height) // line_height)
    lines = _wrap(text, size, int(width * _SUBTITLE_WIDTH), max_lines)
    font = _font(size)
    widest = max(font.getlength(line) for line in lines)
    text_height = len(lines) * size + gap * (len(lines) - 1)
    box_left = max(0, round((width - widest) / 2) - margin)
    box_bottom = height - margin
    box_top = max(0, box_bottom - text_height - 2 * margin)
    top = max(0, box_top - size)  # the strip drawn on: the box, plus room for a glyph's stroke above it
    strip = _to_image(frame[:, top:, :])
    draw = ImageDraw.Draw(strip, "RGBA")  # RGBA mode blends the box's alpha onto the RGB strip
    draw.rectangle((box_left, box_top - top, min(width, box_left + widest + 2 * margin), box_bottom - top),
                   fill=_BOX_RGBA)
    for i, line in enumerate(lines):
        draw.text(
            (width / 2, box_top - top + margin + i * line_height), line, font=font, fill=_WHITE, anchor="mt",
            stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0),
        )
    frame[:, top:, :] = _to_tensor(strip)


@functools.lru_cache(maxsize=256)
def _wrap(text: str, font_size: int, max_width: int, max_lines: int) -> tuple[str, ...]:
    """Greedy word wrap to ``max_width`` pixels, keeping the cue's own line breaks; a word wider
    than the line is split by characters; past ``max_lines`` the last line ends in an ellipsis.
    Cached: consecutive frames usually show the same cue."""
    font = _font(font_size)
    fits = lambda s: font.getlength(s) <= max_width  # noqa: E731
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if fits(candidate):
                line = candidate
                continue
            if line:
                lines.append(line)
            while not fits(word) and len(word) > 1:  # split an over-long word where it overflows
                cut = 1
                while fits(word[: cut + 1]):
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        if line:
            lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return tuple(lines) or ("",)


def _checked(frame: torch.Tensor) -> torch.Tensor:
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] frame, got {frame.dtype} {tuple(frame.shape)}")
    return frame


def _to_image(region: torch.Tensor) -> Image.Image:
    return Image.fromarray(region.permute(1, 2, 0).contiguous().numpy())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
