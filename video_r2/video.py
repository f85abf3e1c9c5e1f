"""Turn a video file (and an optional ``.srt``) into the frames and times the model sees.

The original recipe read every frame with torchvision's ``read_video`` and then kept a few, so its
cost grew with the video's length. Here only the sampled frames are decoded: torchcodec seeks to each
planned frame and returns it with its real presentation time (pts). Those times are what the overlays
draw; the data module turns the plan into ``second_per_grid_ts``.

The steps, in the order they run (planning is `video_r2.data.budget`'s, from the header alone)::

    open_video(path) / probe(path)    -> VideoInfo (duration, frame count, size; header only)
    plan_frames(total, native_fps, fps, ...) and fit_size(h, w, ...)   (video_r2.data.budget)
    decode_planned(path, T, positions) -> native uint8 [T, C, H, W], their pts and frame indices
    overlay_frames(frames, pts, cues) -> the time (top left) and the subtitle (bottom centre), drawn
                                         on the native frames as the original does (video_r2.overlay)
    resize_frames(frames, size)       -> [T, C, H, W] at the planned size
    load_frames(...) / sample_frames(...) run these in one call.
"""

from __future__ import annotations

import errno
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import srt
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchcodec.decoders import VideoDecoder

from video_r2.data.budget import (  # planning is budget's: the frames and the size come in planned
    DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, VideoInfo, fit_size, frame_indices, plan_frames, sample_times,
)
from video_r2.formats import format_hms  # noqa: F401 - the overlays' time format, re-exported
from video_r2.overlay import overlay_frames

__all__ = [
    "VideoDecodeError",
    "SubtitleWarning",
    "VideoInfo",
    "Cue",
    "open_video",
    "probe",
    "image_size",
    "decode_frames",
    "decode_planned",
    "resize_frames",
    "load_frames",
    "sample_frames",
    "load_image",
    "parse_srt",
]


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


def probe(path: str | Path) -> VideoInfo:
    """Duration, frame count and size of a video from its metadata, without decoding any frame."""
    return open_video(path)[1]


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as `load_image` will see it (EXIF rotation applied), header only."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (UnidentifiedImageError, OSError) as err:
        raise VideoDecodeError(path, err) from err
    return height, width


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


def decode_planned(
    path: str | Path, num_frames: int, positions: str = "linspace",
    opened: tuple[VideoDecoder, VideoInfo] | None = None,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """The ``num_frames`` planned frames at their native size, their pts and their frame indices.

    ``positions="linspace"``: frames ``linspace(0, total_frames - 1, T)`` by index (the original's);
    ``"centres"``: the frames shown at the centres of T equal slots of the video, by time.
    """
    decoder, info = opened or open_video(path)
    if positions == "linspace":
        indices = frame_indices(info.total_frames, num_frames)
        try:
            batch = decoder.get_frames_at(indices=indices)
        except Exception as err:  # a damaged file, or a header that overstates the frame count
            raise VideoDecodeError(path, err) from err
        return batch.data, batch.pts_seconds.tolist(), indices
    if positions != "centres":
        raise ValueError(f"positions must be 'linspace' or 'centres', got {positions!r}")
    frames, pts = _decode_at(decoder, path, sample_times(info.start, info.duration, num_frames))
    return frames, pts, [round((t - info.start) * info.native_fps) for t in pts]


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 ``[T, C, H, W]`` frames to ``size`` = ``(H, W)``: bicubic with antialiasing
    (as qwen-vl-utils resizes), done on uint8 directly, which torch does fast on the CPU."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(frames, size=tuple(size), mode="bicubic", antialias=True)
    return resized.contiguous()


def load_frames(
    path: str | Path, num_frames: int, size: tuple[int, int] | None, positions: str = "linspace",
    cues: Sequence[Cue] | None = None, draw_timestamps: bool = False, draw_subtitles: bool = False,
    opened: tuple[VideoDecoder, VideoInfo] | None = None,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Decode the planned frames, draw on them at their native size, then resize (``size``, or the
    native size when None): the frames the model sees, their pts and their native frame indices."""
    frames, pts, indices = decode_planned(path, num_frames, positions, opened)
    if draw_timestamps or (draw_subtitles and cues):
        frames = overlay_frames(frames, pts, cues, draw_timestamps, draw_subtitles)
    return (resize_frames(frames, size) if size else frames), pts, indices


def sample_frames(
    path: str | Path,
    fps: float,
    max_frames: int,
    min_frames: int = 4,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_frames: int | None = None,
    positions: str = "linspace",
    cues: Sequence[Cue] | None = None,
    draw_timestamps: bool = False,
    draw_subtitles: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Frames sampled at ``fps`` (an even count by `plan_frames`, or ``num_frames``), decoded alone,
    drawn on when asked, resized into the pixel budget.

    Returns ``(frames, timestamps)``: uint8 ``[T, C, H, W]`` (RGB) and T floats, the decoded frames'
    presentation times in seconds, non-decreasing (equal only when a frame is repeated).
    Raises ``FileNotFoundError`` for a missing file and ``VideoDecodeError`` for one that cannot
    be decoded; both name the path.
    """
    decoder, info = open_video(path)
    if num_frames is None:
        num_frames = plan_frames(info.total_frames, info.native_fps, fps, max_frames, min_frames)
    size = fit_size(info.height, info.width, min_pixels, max_pixels)
    frames, pts, _ = load_frames(path, num_frames, size, positions, cues, draw_timestamps, draw_subtitles,
                                 opened=(decoder, info))
    return frames, pts


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
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).contiguous()


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
