"""Turn a video file (and an optional ``.srt``) into the frames and times the model sees.

The original recipe read every frame with torchvision's ``read_video`` and then kept a few, so its
cost grew with the video's length. Here only the sampled frames are decoded: torchcodec seeks to each
sampling time and returns the frame shown then, with its real presentation time (pts). Those times
are what the overlays draw and what the data module turns into ``second_per_grid_ts``.

Pipeline, one function per step (the data module calls the lower ones when it must shrink a sample
to fit a token budget)::

    probe(path)                       -> VideoInfo (duration, size; header only, nothing decoded)
    plan_frames(duration, fps, ...)   -> T, an even frame count inside [min_frames, max_frames]
    sample_times(start, duration, T)  -> T evenly spaced times, all inside the video
    decode_frames(path, times, size)  -> uint8 [T, C, H, W] + the decoded frames' pts
    fit_size(h, w, min_px, max_px)    -> (H, W), multiples of 28, aspect kept (Qwen's smart_resize rule)
    sample_frames(...)                -> all of the above in one call
    overlay_frames(frames, times, cues) draws HH:MM:SS (top left) and the active subtitle (bottom centre)

Pixel-budget defaults: ``DEFAULT_MAX_PIXELS = 360 * 420`` is the recipe's ``video_max_pixels``.
Qwen's own video default for the minimum (128 * 28 * 28 = 100,352 pixels) would upscale the tiny
synthetic demo videos about thirty-fold, so the default minimum here is ``56 * 56`` (transformers'
Qwen2-VL image-processor default, four merged tokens); the recipe configs may set a larger one.
"""

from __future__ import annotations

import errno
import functools
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import srt
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torchcodec.decoders import VideoDecoder

from video_r2.formats import TIME_EPSILON as _TIME_EPSILON, format_hms

__all__ = [
    "PATCH_FACTOR",
    "TEMPORAL_PATCH_SIZE",
    "DEFAULT_MIN_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "VideoDecodeError",
    "SubtitleWarning",
    "VideoInfo",
    "Cue",
    "probe",
    "plan_frames",
    "sample_times",
    "fit_size",
    "resize_frames",
    "decode_frames",
    "sample_frames",
    "load_image",
    "parse_srt",
    "subtitle_at",
    "format_hms",
    "draw_timestamp",
    "draw_subtitle",
    "overlay_frames",
]

PATCH_FACTOR = 28  # Qwen2.5-VL: 14-pixel ViT patches, merged 2x2 before the language model
TEMPORAL_PATCH_SIZE = 2  # Qwen2.5-VL packs two consecutive frames into one temporal patch
DEFAULT_MIN_PIXELS = 56 * 56  # see the module docstring for why not Qwen's 128 * 28 * 28
DEFAULT_MAX_PIXELS = 360 * 420  # the recipe's video_max_pixels
MAX_ASPECT_RATIO = 200  # Qwen's processor rejects anything more extreme; fail here with a clearer message



class VideoDecodeError(RuntimeError):
    """A video (or image) file exists but cannot be decoded. ``path`` names it."""

    def __init__(self, path: str | Path, reason: object) -> None:
        self.path = Path(path)
        super().__init__(
            f"Cannot decode {self.path}: {reason}. Check that the file is complete and plays "
            f"(e.g. `ffprobe {self.path}`); re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`) "
            "or remove it from the dataset, or set `on_bad_sample: skip` to train without it."
        )


class SubtitleWarning(UserWarning):
    """A subtitle cue was skipped; the message starts with ``file:line``."""


# --------------------------------------------------------------------------------------------
# Probing and planning (pure functions the data module reuses to fit a token budget)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says, read without decoding a frame.

    ``start`` is the first frame's presentation time (not always 0), ``duration`` the time from
    it to the end of the last frame; ``fps`` and ``num_frames`` are ``None`` when the header lacks
    them. ``width``/``height`` are the coded size, as the frames come out of the decoder.
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


def probe(path: str | Path) -> VideoInfo:
    """Duration and size of a video from its metadata, without decoding any frame."""
    return open_video(path)[1]


def plan_frames(duration: float, fps: float, max_frames: int, min_frames: int = 4) -> int:
    """How many frames to sample: ``duration * fps`` rounded to an even number, within the bounds.

    Even because Qwen2.5-VL packs frames in pairs (an odd count would make the processor repeat
    the last frame). The bounds are rounded inwards to even numbers (``min_frames=3`` means 4), so
    a video shorter than ``min_frames / fps`` still yields ``min_frames`` frames (some repeated).
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if duration < 0:
        raise ValueError(f"duration must be >= 0, got {duration}")
    low = max(TEMPORAL_PATCH_SIZE, _round_up_even(min_frames))
    high = _round_down_even(max_frames)
    if high < low:
        raise ValueError(
            f"max_frames={max_frames} leaves no even frame count >= min_frames={min_frames}"
        )
    wanted = 2 * math.floor(duration * fps / 2 + 0.5)  # nearest even, halves rounded up
    return min(max(wanted, low), high)


def sample_times(start: float, duration: float, num_frames: int) -> list[float]:
    """``num_frames`` times spread evenly over ``[start, start + duration)``.

    Each time is the centre of its ``duration / num_frames`` slot, so none falls on the video's
    end (where there is no frame to show) and, when ``num_frames == duration * fps``, they are the
    centres of the 1/fps intervals. When ``max_frames`` caps the count, the spacing simply widens:
    frames stay evenly spaced, which Qwen's temporal rope (one interval per video) assumes.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    step = duration / num_frames
    return [start + (i + 0.5) * step for i in range(num_frames)]


def fit_size(
    height: int,
    width: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = PATCH_FACTOR,
) -> tuple[int, int]:
    """The ``(height, width)`` the model sees: sides multiples of ``factor``, aspect kept,
    ``height * width`` within ``[min_pixels, max_pixels]``.

    The same rule as Qwen's ``smart_resize``: round each side to the nearest multiple, then if the
    area is out of budget scale both sides by one factor (rounding down when shrinking, up when
    growing) so the budget holds.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not factor * factor <= max_pixels or min_pixels > max_pixels:
        raise ValueError(
            f"need {factor * factor} <= max_pixels and min_pixels <= max_pixels, "
            f"got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_frames(
    path: str | Path, times: Sequence[float], size: tuple[int, int] | None = None,
    opened: tuple[VideoDecoder, VideoInfo] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Decode only the frames shown at ``times`` (seconds, inside the video).

    Returns uint8 frames ``[T, C, H, W]`` (resized to ``size`` = ``(H, W)`` when given) and each
    decoded frame's own presentation time, which is at or just before the asked-for time.
    ``opened``: the ``open_video(path)`` of a caller that already opened it (to plan), so it is not opened twice.
    """
    decoder, info = opened or open_video(path)
    outside = [t for t in times if not info.start <= t < info.end]
    if outside:  # a caller's mistake, not a damaged file: say so rather than raise VideoDecodeError
        raise ValueError(f"times {outside[:3]} lie outside {path}'s [{info.start:g}, {info.end:g}) s")
    frames, pts = _decode_at(decoder, path, times)
    return (resize_frames(frames, size) if size else frames), pts


def sample_frames(
    path: str | Path,
    fps: float,
    max_frames: int,
    min_frames: int = 4,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_frames: int | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Frames sampled at ``fps`` (between ``min_frames`` and ``max_frames``, an even count),
    decoded alone, resized into the pixel budget.

    Returns ``(frames, timestamps)``: uint8 ``[T, C, H, W]`` (RGB) and T floats, the decoded frames'
    presentation times in seconds, non-decreasing (equal only when a video has fewer frames than
    T and some are repeated). ``num_frames`` overrides the planned count (the data module uses it
    to shrink a sample that exceeds its token budget; keep it even). Overlays are separate: see
    ``overlay_frames``.

    Raises ``FileNotFoundError`` for a missing file and ``VideoDecodeError`` for one that cannot
    be decoded; both name the path.
    """
    decoder, info = open_video(path)
    if num_frames is None:
        num_frames = plan_frames(info.duration, fps, max_frames, min_frames)
    frames, timestamps = _decode_at(decoder, path, sample_times(info.start, info.duration, num_frames))
    size = fit_size(frames.shape[-2], frames.shape[-1], min_pixels, max_pixels)
    return resize_frames(frames, size), timestamps


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 ``[T, C, H, W]`` frames to ``size`` = ``(H, W)``: bicubic with antialiasing
    (as Qwen's processor resizes), done on uint8 directly, which torch does fast on the CPU."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(frames, size=tuple(size), mode="bicubic", antialias=True)
    return resized.contiguous()


def load_image(
    path: str | Path, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """An image file as a one-frame stack: uint8 ``[1, C, H, W]`` (RGB), resized by ``fit_size``.

    One frame in the video layout, so records with ``image`` instead of ``video`` go through the
    same size checks; pass ``frames[0]`` to the processor's ``images``. EXIF rotation is applied.
    Raises ``FileNotFoundError`` or ``VideoDecodeError`` (naming the path) like ``sample_frames``.
    """
    path = _existing(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise VideoDecodeError(path, err) from err
    height, width = fit_size(image.height, image.width, min_pixels, max_pixels)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    return _to_tensor(image).unsqueeze(0)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"No such media file: {path}", str(path))
    return path


def open_video(path: str | Path) -> tuple[VideoDecoder, VideoInfo]:
    """A decoder on ``path`` and its header info.

    Approximate seek mode trusts the container's header (duration, frame rate) instead of scanning
    the whole file first, which would cost time proportional to the video's length. When a header
    has no duration (e.g. some WebM files) we fall back to an exact-mode scan, which measures it.
    """
    path = _existing(path)
    try:
        decoder = VideoDecoder(str(path), seek_mode="approximate")
        info = _info(path, decoder)
        if info is None:
            decoder = VideoDecoder(str(path), seek_mode="exact")
            info = _info(path, decoder)
    except Exception as err:  # torchcodec raises RuntimeError or ValueError depending on the failure
        raise VideoDecodeError(path, err) from err
    if info is None:
        raise VideoDecodeError(path, "the stream reports no duration or frames")
    return decoder, info


def _info(path: Path, decoder: VideoDecoder) -> VideoInfo | None:
    meta = decoder.metadata
    start = meta.begin_stream_seconds or 0.0
    end = meta.end_stream_seconds
    if end is None or end <= start or not meta.width or not meta.height:
        return None
    return VideoInfo(
        path=path,
        duration=float(end - start),
        start=float(start),
        width=int(meta.width),
        height=int(meta.height),
        fps=float(meta.average_fps) if meta.average_fps else None,
        num_frames=int(meta.num_frames) if meta.num_frames else None,
    )


def _decode_at(
    decoder: VideoDecoder, path: str | Path, times: Sequence[float]
) -> tuple[torch.Tensor, list[float]]:
    try:
        batch = decoder.get_frames_played_at(seconds=list(times))
    except Exception as err:  # a file whose header opens but whose frames are damaged
        raise VideoDecodeError(path, err) from err
    return batch.data, batch.pts_seconds.tolist()


def _round_up_even(n: int) -> int:
    return n + (n % 2)


def _round_down_even(n: int) -> int:
    return n - (n % 2)


# --------------------------------------------------------------------------------------------
# Subtitles
# --------------------------------------------------------------------------------------------


class Cue(NamedTuple):
    """One subtitle: shown from ``start`` (inclusive) to ``end`` (exclusive), in seconds."""

    start: float
    end: float
    text: str


_MARKUP = re.compile(r"</?[a-zA-Z][^>]*>|\{\\[^}]*\}")  # <i>, <font ...>, {\an8}: styling, not words


def parse_srt(path: str | Path) -> list[Cue]:
    """The cues of a SubRip file, sorted by start time, their styling tags removed.

    Accepts a UTF-8 BOM, CRLF or LF line ends, a missing final blank line, and ``,`` or ``.``
    before the milliseconds (the ``srt`` package parses each cue). A malformed cue (no or broken
    timing line, end before start) is skipped with a ``SubtitleWarning`` that names the file and
    the cue's first line. Bytes that are not UTF-8 are replaced (shown as U+FFFD), not fatal. Cues are split on blank lines, so a blank line inside a cue's text
    (invalid SubRip) cuts it short and the remainder is reported as malformed.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # utf-8-sig drops a BOM
    cues: list[Cue] = []
    for line_number, block in _blocks(text):
        try:
            # Strict parsing of one block: garbage raises instead of being silently dropped.
            subtitles = list(srt.parse(block))
        except (srt.SRTParseError, ValueError) as err:
            _warn_cue(path, line_number, _first_line(err))
            continue
        for subtitle in subtitles:
            start, end = subtitle.start.total_seconds(), subtitle.end.total_seconds()
            if end <= start:
                _warn_cue(path, line_number, f"it ends ({end:.3f} s) before it starts ({start:.3f} s)")
                continue
            content = _MARKUP.sub("", subtitle.content).strip()
            if content:  # an empty cue shows nothing, so it is dropped quietly
                cues.append(Cue(start, end, content))
    return sorted(cues, key=lambda cue: cue.start)


def subtitle_at(cues: Sequence[Cue], t: float) -> str | None:
    """The text showing at time ``t`` (cues with ``start <= t < end``, overlapping ones joined by
    a line break), or ``None`` when no cue is showing."""
    showing = [cue.text for cue in cues if cue.start <= t < cue.end]
    return "\n".join(showing) if showing else None


def _blocks(text: str):
    """Yield ``(first line number, block text)`` for each run of non-blank lines."""
    lines: list[str] = []
    first = 0
    # splitlines() treats \r\n, \n and a lone \r alike, and a missing final newline is no problem.
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not lines:
                first = number
            lines.append(line)
        elif lines:
            yield first, "\n".join(lines) + "\n"
            lines = []
    if lines:
        yield first, "\n".join(lines) + "\n"


def _first_line(err: Exception) -> str:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, srt.SRTParseError):
        message = f"not a cue: {err.unmatched_content.strip()[:60]!r}"
    return message


def _warn_cue(path: Path, line_number: int, reason: str) -> None:
    message = f"{path}:{line_number}: skipped malformed subtitle cue: {reason}"
    warnings.warn(message, SubtitleWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Overlays (drawn after resizing, so their size is relative to what the model sees)
# --------------------------------------------------------------------------------------------

# The original recipe's overlay style (its qwen_vl_utils fork), so a released checkpoint reads the
# text it was trained on: DejaVu Sans; time at 5% of the short side clamped to 16-72 px, red, or white
# where the corner is dark or red; subtitles at 6% clamped to 20-96 px, white, on a box of alpha 0.55;
# both with a thin black stroke.
_TIME_FONT = (0.05, 16, 72)  # (fraction of the short side, min px, max px)
_SUBTITLE_FONT = (0.06, 20, 96)
_SUBTITLE_MAX_HEIGHT = 0.4  # a long cue may cover at most this fraction of the frame
_SUBTITLE_WIDTH = 0.90  # wrap subtitles to 90% of the frame's width
_BOX_RGBA = (0, 0, 0, int(255 * 0.55))  # semi-transparent black behind subtitles
_RED, _WHITE = (255, 0, 0), (255, 255, 255)


def draw_timestamp(frame: torch.Tensor, t: float) -> torch.Tensor:
    """A copy of a uint8 ``[C, H, W]`` frame with ``format_hms(t)`` drawn at the top left."""
    image = _to_image(frame)
    _draw_time_text(image, format_hms(t))
    return _to_tensor(image)


def draw_subtitle(frame: torch.Tensor, text: str) -> torch.Tensor:
    """A copy of a uint8 ``[C, H, W]`` frame with ``text`` at the bottom centre, wrapped to the
    frame's width, on a semi-transparent box."""
    image = _to_image(frame)
    _draw_subtitle_text(image, text)
    return _to_tensor(image)


def overlay_frames(
    frames: torch.Tensor,
    timestamps: Sequence[float],
    cues: Sequence[Cue] | None = None,
    draw_timestamps: bool = True,
    draw_subtitles: bool = True,
) -> torch.Tensor:
    """Draw each frame's time and the subtitle showing at that time on uint8 ``[T, C, H, W]``
    frames; returns new frames (the input is left unchanged). Each frame is converted to an image
    once, whatever is drawn on it."""
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    draw_subtitles = draw_subtitles and bool(cues)
    if not (draw_timestamps or draw_subtitles):
        return frames.clone()
    out = []
    for frame, t in zip(frames, timestamps):
        image = _to_image(frame)
        if draw_timestamps:
            _draw_time_text(image, format_hms(t))
        text = subtitle_at(cues, t) if draw_subtitles else None
        if text:
            _draw_subtitle_text(image, text)
        out.append(_to_tensor(image))
    return torch.stack(out)


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    # matplotlib (a dependency already) ships DejaVu Sans: the original's font, nothing downloaded.
    import matplotlib

    return str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), size)


def _font_size(image: Image.Image, style: tuple[float, int, int]) -> int:
    fraction, low, high = style
    return max(low, min(high, round(min(image.size) * fraction)))


def _time_colour(image: Image.Image) -> tuple[int, int, int]:
    """Red, or white where the top-left patch (up to 40 x 200 px) is dark or red: the original's rule."""
    width, height = image.size
    patch = np.asarray(image.crop((0, 0, min(200, width), min(40, height))), dtype=np.float32)
    r, g, b = (float(patch[..., c].mean()) for c in range(3))
    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 80.0  # perceptual luminance
    reddish = r > 120.0 and r - max(g, b) > 40.0
    return _WHITE if dark or reddish else _RED


def _draw_time_text(image: Image.Image, text: str) -> None:
    size = _font_size(image, _TIME_FONT)
    margin = max(5, size // 4)
    ImageDraw.Draw(image).text(
        (margin, margin), text, font=_font(size), fill=_time_colour(image),
        stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0),
    )


def _draw_subtitle_text(image: Image.Image, text: str) -> None:
    size = _font_size(image, _SUBTITLE_FONT)
    width, height = image.size
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
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA mode blends the box's alpha onto the RGB frame
    draw.rectangle((box_left, box_top, min(width, box_left + widest + 2 * margin), box_bottom), fill=_BOX_RGBA)
    for i, line in enumerate(lines):
        draw.text(
            (width / 2, box_top + margin + i * line_height), line, font=font, fill=_WHITE, anchor="mt",
            stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0),
        )


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


def _to_image(frame: torch.Tensor) -> Image.Image:
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] frame, got {frame.dtype} {tuple(frame.shape)}")
    return Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
