"""video.py, overlay.py and the frame planning of data/budget.py, on real videos: the tests encode tiny
H.264 clips with torchcodec and decode them back. qwen-vl-utils 0.0.14 (what the original recipe forks)
is the oracle for frame counts, positions, sizes and second_per_grid_ts.

Each test clip's frame i is one flat colour that encodes i (red = 8 i, green = 255 - 8 i), so a
decoded frame tells which source frame it is, after compression, within a few levels.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder

from video_r2 import video
from video_r2.data.budget import fit_size, frame_indices, plan_frames, sample_times, seconds_per_grid
from video_r2.overlay import draw_subtitle, draw_timestamp, overlay_frames, subtitle_at
from video_r2.video import (
    Cue,
    SubtitleWarning,
    VideoDecodeError,
    format_hms,
    load_frames,
    load_image,
    parse_srt,
    probe,
    resize_frames,
    sample_frames,
)

COLOUR_STEP = 8  # red levels between consecutive frames: H.264 keeps flat colours within ~3


def write_clip(path: Path, num_frames: int, fps: float, height: int = 48, width: int = 64) -> Path:
    """An H.264 mp4 whose frame i is the flat colour (8 i, 255 - 8 i, 128)."""
    assert num_frames * COLOUR_STEP <= 256
    frames = torch.empty(num_frames, 3, height, width, dtype=torch.uint8)
    for i in range(num_frames):
        frames[i, 0], frames[i, 1], frames[i, 2] = COLOUR_STEP * i, 255 - COLOUR_STEP * i, 128
    VideoEncoder(frames, frame_rate=fps).to_file(path)
    return path


def frame_index(frame: torch.Tensor) -> int:
    """Which source frame a decoded (maybe resized) frame is, from its colour at the centre."""
    red = frame[0, frame.shape[1] // 2, frame.shape[2] // 2].item()
    return round(red / COLOUR_STEP)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """3 s at 10 fps, 30 frames, 64x48."""
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", num_frames=30, fps=10)


# ---------------------------------------------------------------- planning (pure functions)


@pytest.mark.parametrize(
    "seconds, fps, max_frames, min_frames, expected",
    [
        (10.0, 1.0, 128, 4, 10),  # seconds * fps, already even
        (10.0, 2.0, 32, 4, 20),
        (7.0, 1.0, 128, 4, 6),  # odd 7 floors to an even 6 (the original's FRAME_FACTOR rule)
        (5.0, 1.0, 128, 4, 4),
        (600.0, 2.0, 32, 4, 32),  # capped by max_frames
        (600.0, 2.0, 33, 4, 32),  # an odd cap rounds down to stay within it
        (1.0, 1.0, 128, 4, 4),  # shorter than min_frames / fps: still min_frames ...
        (0.1, 1.0, 128, 4, 2),  # ... but never more than the video has (3 frames: floored to 2)
        (1 / 30, 1.0, 128, 4, 2),  # one frame: 2, that frame twice (qwen-vl-utils raises here)
        (1.0, 1.0, 128, 3, 4),  # an odd floor rounds up to stay above it
    ],
)
def test_plan_frames_follows_the_originals_rule(seconds, fps, max_frames, min_frames, expected):
    assert plan_frames(round(seconds * 30), 30.0, fps, max_frames, min_frames) == expected


def test_plan_frames_rejects_impossible_bounds():
    with pytest.raises(ValueError, match="max_frames"):
        plan_frames(300, 30.0, 1.0, max_frames=3, min_frames=4)
    with pytest.raises(ValueError, match="fps"):
        plan_frames(300, 30.0, 0.0, max_frames=8)


DURATIONS = [0.5, 1.0, 2.5, 4.0, 7.3, 10.0, 33.3, 60.0, 127.0, 300.0]
NATIVE_FPS = [24.0, 25.0, 30000 / 1001, 30.0]


@pytest.mark.parametrize("native_fps", NATIVE_FPS)
@pytest.mark.parametrize("fps", [1.0, 2.0])
@pytest.mark.parametrize("max_frames", [16, 32, 128])
def test_frame_count_and_positions_equal_qwen_vl_utils(native_fps, fps, max_frames):
    from qwen_vl_utils.vision_process import smart_nframes

    for seconds in DURATIONS:
        total = round(seconds * native_fps)
        n = plan_frames(total, native_fps, fps, max_frames, 4)
        assert n == smart_nframes({"fps": fps, "max_frames": max_frames, "min_frames": 4}, total, native_fps)
        expected = torch.linspace(0, total - 1, n).round().long().tolist()
        assert frame_indices(total, n) == expected
        assert expected[0] == 0 and expected[-1] == total - 1  # first and last frame included


@pytest.mark.parametrize("pixels", [(56 * 56, 56 * 56), (56 * 56, 360 * 420), (128 * 28 * 28, 360 * 420),
                                    (128 * 28 * 28, 768 * 28 * 28)])
def test_sizes_equal_qwen_vl_utils(pixels):
    from qwen_vl_utils.vision_process import smart_resize

    for height, width in [(48, 64), (56, 56), (240, 320), (360, 640), (480, 854), (720, 1280), (1080, 1920),
                          (1920, 1080), (405, 720), (77, 1234), (1000, 333)]:
        theirs = smart_resize(height, width, 28, *pixels)
        if min(theirs) > 0:
            assert fit_size(height, width, *pixels) == theirs
        else:  # a thin strip in a tiny budget: qwen-vl-utils gives a 0-pixel side, we keep one patch row
            assert min(fit_size(height, width, *pixels)) == 28


def test_centres_are_slot_centres_inside_the_video():
    times = sample_times(start=1.0, duration=4.0, num_frames=8)
    assert times == pytest.approx([1.25 + 0.5 * i for i in range(8)])
    assert all(1.0 <= t < 5.0 for t in times)


@pytest.mark.parametrize(
    "height, width, min_pixels, max_pixels, expected",
    [
        (360, 640, 56 * 56, 360 * 420, (280, 504)),  # shrunk into the recipe's budget
        (1080, 1920, 56 * 56, 360 * 420, (280, 504)),
        (56, 84, 56 * 56, 360 * 420, (56, 84)),  # already multiples of 28, inside the budget
        (50, 90, 56 * 56, 360 * 420, (56, 84)),  # nearest multiples
        (20, 20, 56 * 56, 360 * 420, (56, 56)),  # grown to the minimum
        (10, 1000, 56 * 56, 360 * 420, (28, 1008)),  # a thin strip keeps at least one patch row
    ],
)
def test_fit_size_matches_qwen_rule(height, width, min_pixels, max_pixels, expected):
    new_h, new_w = fit_size(height, width, min_pixels, max_pixels)
    assert (new_h, new_w) == expected
    assert new_h % 28 == 0 and new_w % 28 == 0
    assert min_pixels <= new_h * new_w <= max_pixels


def test_fit_size_keeps_aspect_within_one_patch():
    for height, width in [(360, 640), (480, 640), (720, 1280), (1000, 333), (77, 1234)]:
        new_h, new_w = fit_size(height, width, 56 * 56, 360 * 420)
        # Rounding each side to a multiple of 28 moves the ratio by at most one patch on the short side.
        ratio = width / height
        assert abs(new_w / new_h - ratio) / ratio <= 28 / min(new_h, new_w)


# ---------------------------------------------------------------- decoding real videos


def test_probe_reads_the_header(clip):
    info = probe(clip)
    assert info.duration == pytest.approx(3.0)
    assert (info.width, info.height, info.num_frames) == (64, 48, 30)
    assert info.fps == pytest.approx(10.0)


def test_sampled_frames_run_from_the_first_to_the_last_frame(clip):
    frames, timestamps = sample_frames(clip, fps=2.0, max_frames=32)
    assert frames.dtype == torch.uint8 and frames.shape[:2] == (6, 3)  # 3 s at 2 fps
    indices = frame_indices(30, 6)
    assert indices == [0, 6, 12, 17, 23, 29]  # linspace(0, 29, 6), rounded half to even
    assert timestamps == pytest.approx([i / 10 for i in indices])  # each frame's real pts
    assert [frame_index(f) for f in frames] == indices


def test_centres_option_takes_the_frames_shown_at_the_slot_centres(clip):
    frames, timestamps = sample_frames(clip, fps=2.0, max_frames=32, positions="centres")
    assert frames.shape[:2] == (6, 3) and timestamps == sorted(timestamps) and len(set(timestamps)) == 6
    # Each time is the real pts of the frame at the centre of its 0.5 s slot ...
    wanted = sample_times(0.0, 3.0, 6)
    assert timestamps == pytest.approx([math.floor(t * 10) / 10 for t in wanted])
    # ... and each frame's content is that source frame.
    assert [frame_index(f) for f in frames] == [round(t * 10) for t in timestamps]
    # The same pts an independent exact-mode decode reports for those frames.
    exact = VideoDecoder(str(clip), seek_mode="exact").get_frames_played_at(seconds=wanted)
    assert timestamps == exact.pts_seconds.tolist()


def test_frames_are_resized_into_the_pixel_budget(clip):
    frames, _ = sample_frames(clip, fps=1.0, max_frames=8, min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    height, width = frames.shape[-2:]
    assert height % 28 == 0 and width % 28 == 0 and height * width <= 28 * 28 * 4
    assert (height, width) == fit_size(48, 64, 28 * 28, 28 * 28 * 4)


def test_max_frames_spreads_the_frames_over_the_whole_video(clip):
    frames, timestamps = sample_frames(clip, fps=10.0, max_frames=8)
    assert len(frames) == len(timestamps) == 8
    assert timestamps[0] < 0.3 and timestamps[-1] > 2.6  # not just the first 0.8 s
    gaps = [b - a for a, b in zip(timestamps, timestamps[1:])]
    assert max(gaps) - min(gaps) <= 0.1 + 1e-9  # even spacing, up to one frame of quantisation


def test_short_video_gives_no_more_frames_than_it_has(tmp_path):
    short = write_clip(tmp_path / "short.mp4", num_frames=3, fps=10)  # 0.3 s, fewer frames than min_frames
    frames, timestamps = sample_frames(short, fps=1.0, max_frames=32, min_frames=4)
    assert len(frames) == len(timestamps) == 2  # capped at 3 frames, floored to an even count (the original)
    assert [frame_index(f) for f in frames] == [0, 2] and timestamps == pytest.approx([0.0, 0.2])


def test_frame_count_override(clip):
    frames, timestamps = sample_frames(clip, fps=2.0, max_frames=32, num_frames=4)
    assert len(frames) == len(timestamps) == 4


def test_decode_frames_at_given_times_and_size(clip):
    frames, pts = video.decode_frames(clip, [0.05, 1.55], size=(28, 56))
    assert frames.shape == (2, 3, 28, 56) and pts == pytest.approx([0.0, 1.5])
    assert [frame_index(f) for f in frames] == [0, 15]
    with pytest.raises(ValueError, match="outside"):
        video.decode_frames(clip, [3.0])  # the end of the video: no frame is shown there


def test_only_the_sampled_frames_are_requested_from_the_decoder(clip, monkeypatch):
    """The observable: every frame-fetching method of the decoder is spied on; the loader must make
    one seek-based request for exactly T frames and never a full or range decode."""
    calls: list[tuple[str, int]] = []
    fetchers = ["__getitem__", "get_all_frames", "get_frame_at", "get_frame_played_at", "get_frames_at",
                "get_frames_in_range", "get_frames_played_at", "get_frames_played_in_range"]

    def spy(name):
        original = getattr(VideoDecoder, name)

        def method(self, *args, **kwargs):
            asked = kwargs.get("seconds", kwargs.get("indices", args[0] if args else None))
            calls.append((name, len(asked) if isinstance(asked, (list, tuple)) else -1))
            return original(self, *args, **kwargs)

        return method

    SpyDecoder = type("SpyDecoder", (VideoDecoder,), {name: spy(name) for name in fetchers})
    seek_modes: list[str] = []

    def open_spy(path, **kwargs):
        seek_modes.append(kwargs["seek_mode"])
        return SpyDecoder(path, **kwargs)

    monkeypatch.setattr(video, "VideoDecoder", open_spy)

    frames, _ = sample_frames(clip, fps=2.0, max_frames=32)
    assert calls == [("get_frames_at", len(frames))]  # by index: linspace positions
    frames, _ = sample_frames(clip, fps=2.0, max_frames=32, positions="centres")
    assert calls[1:] == [("get_frames_played_at", len(frames))]  # by time: slot centres
    assert seek_modes == ["approximate"] * 2  # no whole-file scan either


def test_missing_video_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "gone.mp4"
    with pytest.raises(FileNotFoundError, match="gone.mp4") as caught:
        sample_frames(missing, fps=1.0, max_frames=8)
    assert caught.value.filename == str(missing)


def test_corrupt_video_names_the_path_and_what_to_do(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4") as caught:
        sample_frames(corrupt, fps=1.0, max_frames=8)
    assert isinstance(caught.value, RuntimeError) and caught.value.path == corrupt
    assert "on_bad_sample" in str(caught.value)


def test_load_image_is_a_resized_one_frame_stack(tmp_path):
    path = tmp_path / "still.png"
    Image.new("RGB", (100, 60), (10, 200, 30)).save(path)
    image = load_image(path, min_pixels=28 * 28, max_pixels=360 * 420)
    assert image.dtype == torch.uint8 and image.shape == (1, 3, *fit_size(60, 100, 28 * 28, 360 * 420))
    assert image[0, :, 20, 20].tolist() == [10, 200, 30]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(VideoDecodeError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")


# ---------------------------------------------------------------- overlays


@pytest.mark.parametrize(
    "t, text",
    [
        (0.0, "00:00:00"),
        (0.999, "00:00:00"),
        (59.999, "00:00:59"),  # floor, never rounded up to the next second
        (60.0, "00:01:00"),
        (3599.999, "00:59:59"),
        (3600.0, "01:00:00"),
        (2.0 - 2e-16, "00:00:02"),  # float noise in a pts is not a second earlier
        (-0.5, "00:00:00"),
    ],
)
def test_format_hms_floors_the_time(t, text):
    assert format_hms(t) == text


def grey_frame(height=112, width=196) -> torch.Tensor:
    return torch.full((3, height, width), 127, dtype=torch.uint8)


def changed_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels that differ."""
    rows, cols = (before != after).any(dim=0).nonzero(as_tuple=True)
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


def test_timestamp_is_drawn_at_the_top_left_only():
    frame = grey_frame()
    drawn = draw_timestamp(frame, 61.5)
    top, bottom, left, right = changed_box(frame, drawn)
    assert top >= 0 and bottom < 112 // 4 and right < 196 // 2
    assert (frame == 127).all()  # the input is not touched


def test_drawn_time_text_is_the_floor_of_the_frame_time():
    frame = grey_frame()
    # The picture depends on the time only through its whole second.
    assert torch.equal(draw_timestamp(frame, 59.999), draw_timestamp(frame, 59.0))
    assert not torch.equal(draw_timestamp(frame, 59.999), draw_timestamp(frame, 60.0))


def test_timestamp_size_follows_the_short_side_within_the_originals_clamp():
    def text_height(frame):
        top, bottom, _, _ = changed_box(frame, draw_timestamp(frame, 5.0))
        return bottom - top + 1

    # 5% of the short side: 20 px at 400, 60 px at 1200; clamped to 16 px on a tiny frame.
    small, large, tiny = grey_frame(400, 700), grey_frame(1200, 2000), grey_frame(112, 196)
    assert 2.6 <= text_height(large) / text_height(small) <= 3.4
    assert 14 <= text_height(tiny) <= 20  # the 16 px floor (digits plus stroke), not 5.6 px


def _text_colour_counts(frame, drawn):
    changed = (frame != drawn).any(dim=0)
    r, g, b = (drawn[c][changed].int() for c in range(3))
    red = ((r > 200) & (g < 60) & (b < 60)).sum().item()
    white = ((r > 200) & (g > 200) & (b > 200)).sum().item()
    return red, white


def test_timestamp_is_red_on_a_light_frame_and_white_on_a_dark_or_red_one():
    light = torch.full((3, 240, 320), 200, dtype=torch.uint8)
    red, white = _text_colour_counts(light, draw_timestamp(light, 5.0))
    assert red > 50 and white == 0
    for background in (torch.full((3, 240, 320), 20, dtype=torch.uint8),
                       torch.stack([torch.full((240, 320), v, dtype=torch.uint8) for v in (200, 40, 40)])):
        red, white = _text_colour_counts(background, draw_timestamp(background, 5.0))
        assert white > 50 and red == 0


def test_subtitle_is_drawn_at_the_bottom_centre_wrapped_to_the_width():
    frame = grey_frame(360, 640)  # the original's 20 px floor leaves a tiny frame room for one line only
    drawn = draw_subtitle(frame, "a fairly long subtitle that cannot possibly fit on one line of this frame here")
    top, bottom, left, right = changed_box(frame, drawn)
    assert top > 360 // 2 and bottom < 360 and left > 0 and right < 639
    assert abs((left + right) / 2 - 639 / 2) <= 2  # centred
    # Wrapped: the changed area is more than one text line tall.
    one_line = changed_box(frame, draw_subtitle(frame, "short"))
    assert (bottom - top) > 1.5 * (one_line[1] - one_line[0])


def test_overlay_draws_each_frames_time_and_the_cue_showing_then(clip):
    frames, timestamps = sample_frames(clip, fps=2.0, max_frames=32, min_pixels=112 * 196, max_pixels=112 * 196)
    cues = [Cue(0.0, 1.0, "first cue"), Cue(1.0, 1.9, "second cue"), Cue(2.5, 3.0, "last cue")]
    # Frames 0, 6, 12, 17, 23, 29 of 10 fps; worked out by hand from the cue table.
    assert timestamps == pytest.approx([0.0, 0.6, 1.2, 1.7, 2.3, 2.9])
    showing = ["first cue", "first cue", "second cue", "second cue", None, "last cue"]

    drawn = overlay_frames(frames, timestamps, cues)
    for frame, t, text, out in zip(frames, timestamps, showing, drawn):
        expected = draw_timestamp(frame, t)
        if text is not None:
            expected = draw_subtitle(expected, text)
        assert torch.equal(out, expected), (t, text)

    assert torch.equal(overlay_frames(frames, timestamps, cues, draw_timestamps=False, draw_subtitles=False), frames)
    only_time = overlay_frames(frames, timestamps, cues, draw_subtitles=False)
    assert all(torch.equal(o, draw_timestamp(f, t)) for o, f, t in zip(only_time, frames, timestamps))


def test_subtitle_at_uses_half_open_intervals():
    cues = [Cue(1.0, 2.0, "a"), Cue(1.5, 3.0, "b")]
    assert subtitle_at(cues, 0.99) is None
    assert subtitle_at(cues, 1.0) == "a"
    assert subtitle_at(cues, 1.7) == "a\nb"  # overlapping cues are both shown
    assert subtitle_at(cues, 2.0) == "b"
    assert subtitle_at(cues, 3.0) is None


# ---------------------------------------------------------------- .srt parsing


def test_parse_srt_accepts_bom_crlf_dot_millis_and_no_final_blank(tmp_path):
    text = (
        "1\r\n00:00:01,000 --> 00:00:02,500\r\n<i>Hello</i> there\r\n\r\n"
        "2\r\n00:00:03.250 --> 00:00:04.000\r\nTwo\r\nlines\r\n\r\n"
        "3\r\n00:01:00,000 --> 00:01:01,000\r\nLast, no blank line after"
    )
    path = tmp_path / "subs.srt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert parse_srt(path) == [
        (1.0, 2.5, "Hello there"),
        (3.25, 4.0, "Two\nlines"),
        (60.0, 61.0, "Last, no blank line after"),
    ]


def test_parse_srt_skips_malformed_cues_with_file_and_line(tmp_path):
    path = tmp_path / "broken.srt"
    path.write_text(
        "1\n00:00:01,000 --> 00:00:02,000\nGood one\n\n"  # lines 1-3
        "2\n00:00:0x,000 --> 00:00:03,000\nBad timing\n\n"  # line 5
        "3\n00:00:05,000 --> 00:00:04,000\nEnds before it starts\n\n"  # line 9
        "4\nNo timing line at all\n\n"  # line 13
        "5\n00:00:06,000 --> 00:00:07,000\nGood again\n"  # line 16
    )
    with pytest.warns(SubtitleWarning) as caught:
        cues = parse_srt(path)
    assert cues == [(1.0, 2.0, "Good one"), (6.0, 7.0, "Good again")]
    messages = [str(w.message) for w in caught]
    assert [m.split(": ")[0] for m in messages] == [f"{path}:5", f"{path}:9", f"{path}:13"]
    assert "before it starts" in messages[1]


# ---------------------------------------------------------------- against qwen-vl-utils on real clips


def coded_clip(path: Path, num_frames: int, fps: float, height: int = 96, width: int = 160) -> Path:
    """An H.264 mp4 of a gradient whose offset moves with the frame index (any length)."""
    y = torch.arange(height).view(height, 1)
    x = torch.arange(width).view(1, width)
    frames = torch.empty(num_frames, 3, height, width, dtype=torch.uint8)
    for i in range(num_frames):
        frames[i, 0] = (x + 7 * i) % 256
        frames[i, 1] = (2 * y + 3 * i) % 256
        frames[i, 2] = (5 * i) % 256
    VideoEncoder(frames, frame_rate=fps).to_file(path)
    return path


@pytest.mark.parametrize("num_frames, native_fps", [(12, 24), (30, 25), (61, 30000 / 1001), (90, 30)])
def test_real_clips_equal_qwen_vl_utils_fetch_video(tmp_path, num_frames, native_fps):
    from qwen_vl_utils.vision_process import fetch_video

    path = coded_clip(tmp_path / "clip.mp4", num_frames, native_fps)
    info = probe(path)
    for fps, max_frames, pixels in [(1.0, 16, (28 * 28, 84 * 140)), (2.0, 32, (56 * 56, 360 * 420))]:
        (theirs, meta), sample_fps = fetch_video(
            {"video": str(path), "fps": fps, "max_frames": max_frames, "min_pixels": pixels[0],
             "max_pixels": pixels[1]}, return_video_sample_fps=True, return_video_metadata=True)
        n = plan_frames(info.total_frames, info.native_fps, fps, max_frames, 4)
        size = fit_size(info.height, info.width, *pixels)
        ours, pts, indices = load_frames(path, n, size)
        assert (info.total_frames, n, indices) == (meta["total_num_frames"], len(theirs), meta["frames_indices"])
        assert tuple(ours.shape) == tuple(theirs.shape)
        assert seconds_per_grid(info, n) == pytest.approx(2 / sample_fps, rel=1e-12)
        # The same frames, resized the same way (up to uint8 rounding at the gradient's sharp wrap edge).
        diff = (ours.float() - theirs).abs()
        assert diff.mean() < 0.5 and diff.max() <= 8


# ---------------------------------------------------------------- overlays drawn on the native frame


def flat_clip(path: Path, level: int, height: int = 360, width: int = 640) -> Path:
    VideoEncoder(torch.full((4, 3, height, width), level, dtype=torch.uint8), frame_rate=2).to_file(path)
    return path


def text_rows(before: torch.Tensor, after: torch.Tensor) -> int:
    """How many rows the drawing changed (by more than a codec's or a resize's noise)."""
    rows = ((before.int() - after.int()).abs() > 40).any(dim=0).any(dim=1).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_time_is_drawn_on_the_native_frame_before_resizing(tmp_path):
    light, dark = flat_clip(tmp_path / "light.mp4", 200), flat_clip(tmp_path / "dark.mp4", 20)
    plain, _, _ = load_frames(light, 2, None)
    native, _, _ = load_frames(light, 2, None, draw_timestamps=True)
    # Sized from the native short side: 5% of 360 = 18 px (digits with their stroke), red on a light frame.
    assert 0.6 * 18 <= text_rows(plain[0], native[0]) <= 1.1 * 18
    changed = (plain[0] != native[0]).any(dim=0)
    rows, cols = changed.nonzero(as_tuple=True)
    assert rows.max() < 360 // 4 and cols.max() < 640 // 2  # top left
    red, white = _text_colour_counts(plain[0], native[0])
    assert red > 50 and white == 0
    dark_plain, _, _ = load_frames(dark, 2, None)
    dark_drawn, _, _ = load_frames(dark, 2, None, draw_timestamps=True)
    red, white = _text_colour_counts(dark_plain[0], dark_drawn[0])
    assert white > 50 and red == 0
    # Resized to 168 x 308 after drawing: the text shrinks with the frame. Drawn after resizing it would
    # be the 16 px floor of a 168 px frame instead, twice as tall.
    small = (168, 308)
    resized, _, _ = load_frames(light, 2, small, draw_timestamps=True)
    expected = resize_frames(native, small)
    assert torch.equal(resized, expected)
    height = text_rows(resize_frames(plain, small)[0], resized[0])
    assert abs(height - text_rows(plain[0], native[0]) * 168 / 360) <= 3 and height < 12
