"""The dataset side that needs no model run: reading and validating records, turning them into chat
messages, planning each sample's frames and sizes within a token budget, and `video-r2 check-data`.

A record, as in the original Video-R2 files (extra keys are allowed and ignored):

    {
      "id": "sft_0000",                                   # optional; the record index stands in
      "video": "clip.mp4",                                # or a list; relative to `video_folder`
      "conversations": [                                  # optional leading {"from": "system", ...}
        {"from": "human", "value": "<video>\\nWhat happens at 00:02?"},
        {"from": "gpt", "value": "<think>At 00:02 ...</think><answer>B</answer>"}
      ],                                                  # more human/gpt pairs: multi-turn
      "temporal_grounding": {"00:00-00:02": "A star fills the screen."},   # required for GRPO (TAR)
      "question_type": "multiple choice"                  # optional; read by the accuracy reward
    }

`image` (a path or a list) may stand where `video` stands; each `<video>` / `<image>` tag in the human
turns marks where one of them goes, so the tag count must equal the number of paths.

Every problem is collected, with its file, record index and field, so that one run of validation lists
them all (`DataValidationError`) instead of failing on the first.

Token budget: a video of T frames at H x W costs (T / 2) * (H / 28) * (W / 28) tokens in Qwen2.5-VL
(2-frame temporal patches, 14-pixel patches merged 2 x 2), so a sample's length is known from the video
headers and the text alone. `fit_budget` uses that to shrink a plan before anything is decoded.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from video_r2 import video as V

VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"
# LLaVA-style speaker names (and the chat names) -> chat template roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
STAGES = ("sft", "grpo")
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about videos. Each video frame shows its time "
    "(HH:MM:SS) in the top-left corner. First think step by step inside <think> </think>, citing the "
    "timestamps (MM:SS) of the moments your reasoning relies on, then give only the final answer inside "
    "<answer> </answer>."
)
VIDEO_MIN_PIXELS = V.DEFAULT_MIN_PIXELS
VIDEO_MAX_PIXELS = V.DEFAULT_MAX_PIXELS  # the recipe's 360 * 420
IMAGE_MIN_PIXELS = V.DEFAULT_MIN_PIXELS
IMAGE_MAX_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's usual image ceiling
_PIXEL_STEP = 0.9  # each shrink step keeps this share of the per-frame pixel budget

_TAG_SPLIT = re.compile(r"(<video>|<image>)\n?")  # a tag eats the newline after it, as the original does
_ANSWER = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, record index, field) and what."""

    file: str
    index: int | None  # None: the file itself
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.index is None else f"{self.file} record {self.index}"
        return f"{where} [{self.field}]: {self.message}"


class DataValidationError(ValueError):
    """Raised at setup, before any training, with every problem found in the dataset."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:200])
        more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
        super().__init__(f"{len(problems)} problem(s) in the dataset:\n{shown}{more}")


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> tuple[list[Any], list[Problem]]:
    """Records of a JSON file (a list of records) or a JSON Lines file (one record per line).

    The format is told by the content, not the suffix. An unreadable JSON Lines line becomes a problem and
    a `None` record at its place, so record indices stay the line's record number.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    else:
        if isinstance(data, list):
            return data, []
        if isinstance(data, dict):  # a single record (or a one-line JSON Lines file)
            return [data], []
        return [], [Problem(str(path), None, "<file>", "expected a list of records or JSON Lines")]
    records: list[Any] = []
    problems: list[Problem] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), len(records), "<json>", f"line {line_no}: invalid JSON ({e.msg})"))
            records.append(None)
    if not records:
        problems.append(Problem(str(path), None, "<file>", "no records"))
    return records, problems


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def media_paths(record: dict, key: str) -> list[str]:
    """The record's `video` or `image` paths as a list (a single path is allowed)."""
    value = record.get(key)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _parse_timestamp_key(key: str):
    from video_r2.rewards import parse_timestamp_key  # the reward's own reading of a key: one definition

    return parse_timestamp_key(key)


def validate_record(record: Any, stage: str = "sft") -> list[tuple[str, str]]:
    """`(field, message)` for everything wrong with one record (empty when it is usable)."""
    if not isinstance(record, dict):
        return [("<record>", f"expected a JSON object, got {type(record).__name__}")]
    problems: list[tuple[str, str]] = []
    if "id" in record and not isinstance(record["id"], (str, int)):
        problems.append(("id", "must be a string or an integer"))

    # media
    if "video" in record and "image" in record:
        problems.append(("video", "a record has either `video` or `image`, not both"))
    for key in ("video", "image"):
        if key not in record:
            continue
        value = record[key]
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            problems.append((key, "must be a non-empty path or a non-empty list of paths"))

    # conversations
    turns = record.get("conversations")
    if turns is None:
        problems.append(("conversations", "missing"))
        return problems
    if not isinstance(turns, list) or not turns:
        problems.append(("conversations", "must be a non-empty list of turns"))
        return problems
    roles = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append((f"conversations[{i}]", "must be an object with `from` and `value`"))
            continue
        if turn.get("from") not in ROLES:
            problems.append((f"conversations[{i}].from", f"must be one of {sorted(ROLES)}, got {turn.get('from')!r}"))
            continue
        if not isinstance(turn.get("value"), str):
            problems.append((f"conversations[{i}].value", "missing or not a string"))
            continue
        roles.append(ROLES[turn["from"]])
    if len(roles) == len(turns):
        body = roles[1:] if roles[0] == "system" else roles
        expected = ["user", "assistant"] * (len(body) // 2 + 1)
        if not body or body != expected[: len(body)] or body[-1] != "assistant":
            problems.append(("conversations", "turns must alternate human, gpt, ... and end with gpt "
                                              f"(after an optional system turn); got {roles}"))
        for key, tag in (("video", VIDEO_TAG), ("image", IMAGE_TAG)):
            in_user = sum(t["value"].count(tag) for t, r in zip(turns, roles) if r == "user")
            elsewhere = sum(t["value"].count(tag) for t, r in zip(turns, roles) if r != "user")
            n_paths = len(media_paths(record, key)) if isinstance(record.get(key), (str, list)) else 0
            if elsewhere:
                problems.append(("conversations", f"{tag} tag outside a human turn"))
            if in_user != n_paths:
                problems.append(("conversations", f"{in_user} {tag} tag(s) but {n_paths} {key}(s)"))

    # temporal grounding: the reference events of TAR
    grounding = record.get("temporal_grounding")
    if grounding is None:
        if stage == "grpo":
            problems.append(("temporal_grounding", "missing (GRPO's temporal alignment reward needs it)"))
    elif not isinstance(grounding, dict):
        problems.append(("temporal_grounding", "must be an object {\"MM:SS-MM:SS\": sentence}"))
    else:
        for key, sentence in grounding.items():
            if _parse_timestamp_key(key) is None:
                problems.append(("temporal_grounding", f"unparseable timestamp key {key!r}"))
            if not isinstance(sentence, str):
                problems.append(("temporal_grounding", f"value of {key!r} must be a string"))
    if "question_type" in record and not isinstance(record["question_type"], (str, type(None))):
        problems.append(("question_type", "must be a string"))
    return problems


def load_dataset(path: str | Path, stage: str = "sft") -> tuple[list[Any], list[Problem]]:
    """Read a dataset file and validate every record; returns the records and all problems found."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    records, problems = read_records(path)
    for index, record in enumerate(records):
        if record is None:  # unreadable line, already reported
            continue
        problems += [Problem(str(path), index, f, m) for f, m in validate_record(record, stage)]
    return records, problems


# --------------------------------------------------------------------------------------------------
# records -> chat messages
# --------------------------------------------------------------------------------------------------


def _user_content(text: str) -> list[dict]:
    parts = []
    for piece in _TAG_SPLIT.split(text):
        if piece == VIDEO_TAG:
            parts.append({"type": "video"})
        elif piece == IMAGE_TAG:
            parts.append({"type": "image"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """Chat-template messages of a (valid) record: its own system turn, else `system_prompt` (if any)."""
    turns = record["conversations"]
    messages = []
    if ROLES[turns[0]["from"]] == "system":
        messages.append({"role": "system", "content": turns[0]["value"]})
        turns = turns[1:]
    elif system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for turn in turns:
        role = ROLES[turn["from"]]
        content = _user_content(turn["value"]) if role == "user" else turn["value"]
        messages.append({"role": role, "content": content})
    return messages


def strip_tags(text: str) -> str:
    """A human turn's text without its `<video>` / `<image>` tags."""
    return _TAG_SPLIT.sub("", text).strip()


def reference_answer(reference: str) -> str:
    """The text inside `<answer>` of a reference reply (without `<think>` when there is no such tag)."""
    match = _ANSWER.search(reference)
    return (match.group(1) if match else _THINK.sub("", reference)).strip()


def reward_sample(record: dict, index: int, prompt_text: str) -> dict:
    """What the GRPO rewards read about a record (see `video_r2.rewards`)."""
    turns = record["conversations"]
    question = next(t["value"] for t in reversed(turns) if ROLES[t["from"]] == "user")
    reference = turns[-1]["value"]
    return {
        "id": str(record.get("id", index)),
        "question": strip_tags(question),
        "answer": reference_answer(reference),
        "solution": reference,
        "temporal_grounding": dict(record.get("temporal_grounding") or {}),
        "question_type": record.get("question_type"),
        "prompt_text": prompt_text,
    }


# --------------------------------------------------------------------------------------------------
# planning: how many frames at what size, from the grid arithmetic alone
# --------------------------------------------------------------------------------------------------


@dataclass
class Media:
    kind: Literal["video", "image"]
    path: Path
    height: int  # source size
    width: int
    info: V.VideoInfo | None = None  # videos
    decoder: Any = None  # videos: the torchcodec decoder that read `info`, reused to decode the frames
    frames: int = 1  # planned
    size: tuple[int, int] = (0, 0)  # planned (H, W), multiples of 28


class TooLong(ValueError):
    """A sample that exceeds its token budget even at `min_frames` and the minimum pixels."""


@dataclass(frozen=True)
class Sampling:
    """How frames are sampled and sized; the patch sizes come from the processor."""

    fps: float = 1.0
    max_frames: int = 128
    min_frames: int = 4
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    image_min_pixels: int = IMAGE_MIN_PIXELS
    image_max_pixels: int = IMAGE_MAX_PIXELS
    patch_size: int = 14  # from the processor
    merge_size: int = 2
    temporal_patch_size: int = 2

    def __post_init__(self):  # a bad config fails at construction, not as a bad sample in a worker
        V.plan_frames(1.0, self.fps, self.max_frames, self.min_frames)
        for kind in ("video", "image"):
            V.fit_size(28, 28, *self.pixel_range(kind))

    def tokens(self, media: Media) -> int:
        """Vision tokens the processor will put in place of one `<|video_pad|>` / `<|image_pad|>`."""
        grid_t = math.ceil(media.frames / self.temporal_patch_size)
        grid_h, grid_w = (side // self.patch_size for side in media.size)
        return grid_t * grid_h * grid_w // (self.merge_size**2)

    def pixel_range(self, kind: str) -> tuple[int, int]:
        if kind == "video":
            return self.video_min_pixels, self.video_max_pixels
        return self.image_min_pixels, self.image_max_pixels


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as `load_image` will see it (EXIF rotation applied), header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (UnidentifiedImageError, OSError) as err:
        raise V.VideoDecodeError(path, err) from err
    return height, width


def plan_media(media: list[Media], s: Sampling, frame_cap: int | None = None, pixel_scale: float = 1.0) -> None:
    """Set each media's planned frames and size for a frame cap and a scale of the pixel ceilings."""
    for m in media:
        if m.kind == "video":
            m.frames = V.plan_frames(m.info.duration, s.fps, frame_cap or s.max_frames, s.min_frames)
        lo, hi = s.pixel_range(m.kind)
        m.size = V.fit_size(m.height, m.width, lo, max(lo, int(hi * pixel_scale)))


def fit_budget(media: list[Media], s: Sampling, text_tokens: int, budget: int | None) -> str | None:
    """Plan `media` so that text + vision tokens fit `budget`: fewer frames first (down to `min_frames`),
    then fewer pixels (down to the minimum). Returns a note on what was shrunk, None when nothing was;
    raises TooLong when even the smallest plan does not fit (ValueError: a size `fit_size` refuses)."""
    plan_media(media, s)
    total = lambda: text_tokens + sum(s.tokens(m) for m in media)  # noqa: E731
    if budget is None or total() <= budget:
        return None
    before = total()
    videos = [m for m in media if m.kind == "video"]
    low = max(s.temporal_patch_size, s.min_frames + s.min_frames % 2)
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


# --------------------------------------------------------------------------------------------------
# `video-r2 check-data`
# --------------------------------------------------------------------------------------------------


def _stats(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    v = sorted(values)
    median = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return "  ".join(f"{name} {fmt.format(x)}" for name, x in
                     (("min", v[0]), ("median", median), ("mean", sum(v) / len(v)), ("max", v[-1])))


def check_data(
    data_path: str,
    video_folder: str,
    subtitles_folder: str | None = None,
    model: str | None = None,
    stage: Literal["sft", "grpo"] = "sft",
    fps: float = 1.0,
    max_frames: int = 128,
    min_frames: int = 4,
    video_min_pixels: int = VIDEO_MIN_PIXELS,
    video_max_pixels: int = VIDEO_MAX_PIXELS,
    image_min_pixels: int = IMAGE_MIN_PIXELS,
    image_max_pixels: int = IMAGE_MAX_PIXELS,
    max_length: int | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> int:
    """Validate a dataset without a GPU and print a summary; exits with status 1 if anything is wrong.

    Checks every record's schema, that each video exists, that its header reads and one frame decodes,
    and (with --model) counts each sample's tokens as the training data module would build it.

    Args:
        data_path: dataset file, JSON (a list of records) or JSON Lines.
        video_folder: folder the records' video / image paths are relative to.
        subtitles_folder: optional folder of <video stem>.srt files (counted and parsed).
        model: model folder or hub id whose processor counts text and visual tokens.
        stage: "sft" counts the whole conversation, "grpo" the prompt; grpo also requires temporal_grounding.
        fps: frames sampled per second.
        max_frames: frame cap per video.
        min_frames: frames even for a very short video.
        video_min_pixels: per-frame pixel floor.
        video_max_pixels: per-frame pixel ceiling.
        image_min_pixels: pixel floor of image records.
        image_max_pixels: pixel ceiling of image records.
        max_length: with --model: token budget (max_seq_length / max_prompt_length); a sample that cannot
            fit even after shrinking frames and pixels is a problem, one that must shrink is counted.
        system_prompt: system message used when counting tokens.
    """
    import warnings

    sampling = Sampling(fps, max_frames, min_frames, video_min_pixels, video_max_pixels,
                        image_min_pixels, image_max_pixels)
    processor = None
    if model is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
        vp = processor.video_processor
        sampling = replace(sampling, patch_size=vp.patch_size, merge_size=vp.merge_size,
                           temporal_patch_size=vp.temporal_patch_size)
    records, problems = load_dataset(data_path, stage)
    bad_records = {p.index for p in problems if p.index is not None}
    folder, subs = Path(video_folder), Path(subtitles_folder) if subtitles_folder else None
    checked: dict[Path, Media | str] = {}  # a file used by several records is checked once
    counts: Counter[str] = Counter()
    durations, frames, visual, lengths = [], [], [], []
    longest = (0, None)
    sub_warnings: list[str] = []

    def problem(index: int, field: str, message: str) -> None:
        problems.append(Problem(str(data_path), index, field, message))

    def check_file(kind: str, path: Path) -> Media | str:
        """The file's planning entry, or why it cannot be used; headers only, plus one decoded frame."""
        if not path.is_file():
            return "missing"
        try:
            if kind == "image":
                V.load_image(path, image_min_pixels, image_max_pixels)
                return Media(kind, path, *image_size(path))
            info = V.probe(path)
            V.decode_frames(path, [info.start + info.duration / 2])
            durations.append(info.duration)
            srt = subs / f"{path.stem}.srt" if subs is not None else None
            if srt is not None and srt.is_file():
                counts["subtitles"] += 1
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    V.parse_srt(srt)
                sub_warnings.extend(str(w.message) for w in caught)
            return Media(kind, path, info.height, info.width, info=info)
        except (V.VideoDecodeError, OSError, ValueError) as err:
            return f"undecodable: {str(err).splitlines()[0][:200]}"

    for index, record in enumerate(records):
        if index in bad_records:
            continue
        media: list[Media] = []
        for kind in ("video", "image"):
            for rel in media_paths(record, kind):
                path = folder / rel
                if path not in checked:
                    checked[path] = check_file(kind, path)
                    state = checked[path]
                    counts[f"{kind}s"] += 1
                    counts[f"{kind}s " + ("found" if isinstance(state, Media) else state.split(":")[0])] += 1
                state = checked[path]
                if isinstance(state, Media):
                    media.append(replace(state))
                else:
                    problem(index, kind, f"{state} {kind} {path}")
        if len(media) != len(media_paths(record, "video")) + len(media_paths(record, "image")):
            continue
        try:
            plan_media(media, sampling)
        except ValueError as err:  # e.g. an aspect ratio Qwen's processor refuses
            problem(index, "video" if "video" in record else "image", str(err))
            continue
        frames += [m.frames for m in media if m.kind == "video"]
        if processor is None:
            continue
        messages = to_messages(record, system_prompt)
        text = processor.apply_chat_template(messages if stage == "sft" else messages[:-1], tokenize=False,
                                             add_generation_prompt=stage == "grpo")
        text_tokens = len(processor.tokenizer.encode(text, add_special_tokens=False)) - len(media)
        tokens = sum(sampling.tokens(m) for m in media)
        visual.append(tokens)
        lengths.append(text_tokens + tokens)
        if lengths[-1] > longest[0]:
            longest = (lengths[-1], f"record {index} ({record.get('id', index)})")
        if max_length is not None and lengths[-1] > max_length:
            counts["over length"] += 1
            try:
                fit_budget(media, sampling, text_tokens, max_length)
            except TooLong as err:
                problem(index, "length", f"cannot fit max_length: {err}")

    rows = [
        ("dataset", f"{data_path} (stage {stage})"),
        ("records", f"{len(records)}  valid {len(records) - len(bad_records)}  invalid {len(bad_records)}"),
        ("videos", f"{counts['videos']}  found {counts['videos found']}  missing {counts['videos missing']}  "
                   f"undecodable {counts['videos undecodable']}"),
    ]
    if counts["images"]:
        rows.append(("images", f"{counts['images']}  found {counts['images found']}  missing "
                               f"{counts['images missing']}  undecodable {counts['images undecodable']}"))
    if subs is not None:
        rows.append(("subtitles", f"{counts['subtitles']} of {counts['videos found']} videos have an .srt; "
                                  f"{len(sub_warnings)} malformed cue(s) skipped"))
    rows += [("duration (s)", _stats(durations, "{:.1f}") + (f"  total {sum(durations) / 3600:.2f} h" if durations else "")),
             ("frames/video", _stats(frames) + f"  (fps {fps}, {min_frames}..{max_frames})")]
    if processor is not None:
        rows += [("visual tokens", _stats(visual)), ("sequence tokens", _stats(lengths)),
                 ("longest", f"{longest[0]} tokens, {longest[1]}" if longest[1] else "-")]
        if max_length is not None:
            rows.append(("over max_length", f"{counts['over length']} (shrunk to fit at load time)"))
    else:
        rows.append(("tokens", "pass --model to count text and visual tokens"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for w in sub_warnings:
        print(f"warning: {w}")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        raise SystemExit(1)
    print("\nOK: no problems found")
    return 0
