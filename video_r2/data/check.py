"""`video-r2 check-data`: validate a dataset without a GPU and print a summary.

`check_data` is the command (its signature and docstring are the flags and `--help`); `DataCheck` does
the work in three steps: each media file is checked once (headers, one decoded frame, its `.srt`), each
valid record is planned as the data module would plan it (and, with a processor, its tokens counted),
then the summary is printed.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from video_r2 import video as V
from video_r2.data.budget import Grid, Media, Sampling, TooLong, fit_budget, plan_media
from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT, to_messages
from video_r2.data.records import Problem, load_dataset, media_file, media_paths


def _stats(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    v = sorted(values)
    median = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return "  ".join(f"{name} {fmt.format(x)}" for name, x in
                     (("min", v[0]), ("median", median), ("mean", sum(v) / len(v)), ("max", v[-1])))


class DataCheck:
    """One run of `check-data`: the problems found and the numbers the summary prints."""

    def __init__(self, data_path: str, video_folder: str, subtitles_folder: str | None, processor: Any,
                 stage: str, sampling: Sampling, max_length: int | None, system_prompt: str | None):
        self.data_path, self.stage, self.sampling = data_path, stage, sampling
        self.folder = Path(video_folder)
        self.subs = Path(subtitles_folder) if subtitles_folder else None
        self.processor, self.max_length, self.system_prompt = processor, max_length, system_prompt
        self.grid = Grid.of(processor) if processor is not None else Grid()
        self.records, self.problems = load_dataset(data_path, stage)
        self.bad_records = {p.index for p in self.problems if p.index is not None}
        self.checked: dict[Path, Media | str] = {}  # a file used by several records is checked once
        self.counts: Counter[str] = Counter()
        self.durations: list[float] = []
        self.frames: list[int] = []
        self.visual: list[int] = []
        self.lengths: list[int] = []
        self.longest: tuple[int, str | None] = (0, None)
        self.sub_warnings: list[str] = []

    def problem(self, index: int, field: str, message: str) -> None:
        self.problems.append(Problem(str(self.data_path), index, field, message))

    def check_file(self, kind: str, path: Path) -> Media | str:
        """The file's planning entry, or why it cannot be used; headers only, plus one decoded frame."""
        if not path.is_file():
            return "missing"
        try:
            if kind == "image":
                V.load_image(path, *self.sampling.pixel_range("image"))
                return Media(kind, path, *V.image_size(path))
            info = V.probe(path)
            V.decode_frames(path, [info.start + info.duration / 2])
            self.durations.append(info.duration)
            srt = self.subs / f"{path.stem}.srt" if self.subs is not None else None
            if srt is not None and srt.is_file():
                self.counts["subtitles"] += 1
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    V.parse_srt(srt)
                self.sub_warnings.extend(str(w.message) for w in caught)
            return Media(kind, path, info.height, info.width, info=info)
        except (V.VideoDecodeError, OSError, ValueError) as err:
            return f"undecodable: {str(err).splitlines()[0][:200]}"

    def media_of(self, index: int, record: dict) -> list[Media] | None:
        """The record's planning entries, or None (with its problems noted) when one cannot be used."""
        media: list[Media] = []
        wanted = 0
        for kind in ("video", "image"):
            for rel in media_paths(record, kind):
                wanted += 1
                path = media_file(self.folder, rel)
                if path is None:
                    self.problem(index, kind, f"{rel!r} leaves video_folder {self.folder}: give paths relative to it")
                    continue
                if path not in self.checked:
                    self.checked[path] = state = self.check_file(kind, path)
                    self.counts[f"{kind}s"] += 1
                    self.counts[f"{kind}s " + ("found" if isinstance(state, Media) else state.split(":")[0])] += 1
                state = self.checked[path]
                if isinstance(state, Media):
                    media.append(replace(state))
                else:
                    self.problem(index, kind, f"{state} {kind} {path}")
        return media if len(media) == wanted else None

    def check_record(self, index: int, record: dict) -> None:
        media = self.media_of(index, record)
        if media is None:
            return
        try:
            plan_media(media, self.sampling)
        except ValueError as err:  # e.g. an aspect ratio Qwen's processor refuses
            self.problem(index, "video" if "video" in record else "image", str(err))
            return
        self.frames += [m.frames for m in media if m.kind == "video"]
        if self.processor is not None:
            self.count_tokens(index, record, media)

    def count_tokens(self, index: int, record: dict, media: list[Media]) -> None:
        messages = to_messages(record, self.system_prompt)
        grpo = self.stage == "grpo"
        text = self.processor.apply_chat_template(messages[:-1] if grpo else messages, tokenize=False,
                                                  add_generation_prompt=grpo)
        text_tokens = len(self.processor.tokenizer.encode(text, add_special_tokens=False)) - len(media)
        tokens = sum(self.grid.tokens(m) for m in media)
        self.visual.append(tokens)
        self.lengths.append(text_tokens + tokens)
        if self.lengths[-1] > self.longest[0]:
            self.longest = (self.lengths[-1], f"record {index} ({record.get('id', index)})")
        if self.max_length is not None and self.lengths[-1] > self.max_length:
            self.counts["over length"] += 1
            try:
                fit_budget(media, self.sampling, self.grid, text_tokens, self.max_length)
            except TooLong as err:
                self.problem(index, "length", f"cannot fit max_length: {err}")

    def run(self) -> None:
        for index, record in enumerate(self.records):
            if index not in self.bad_records:
                self.check_record(index, record)

    def summary(self) -> list[tuple[str, str]]:
        c, s = self.counts, self.sampling
        n, bad = len(self.records), len(self.bad_records)
        rows = [
            ("dataset", f"{self.data_path} (stage {self.stage})"),
            ("records", f"{n}  valid {n - bad}  invalid {bad}"),
            ("videos", f"{c['videos']}  found {c['videos found']}  missing {c['videos missing']}  "
                       f"undecodable {c['videos undecodable']}"),
        ]
        if c["images"]:
            rows.append(("images", f"{c['images']}  found {c['images found']}  missing "
                                   f"{c['images missing']}  undecodable {c['images undecodable']}"))
        if self.subs is not None:
            rows.append(("subtitles", f"{c['subtitles']} of {c['videos found']} videos have an .srt; "
                                      f"{len(self.sub_warnings)} malformed cue(s) skipped"))
        hours = f"  total {sum(self.durations) / 3600:.2f} h" if self.durations else ""
        rows += [("duration (s)", _stats(self.durations, "{:.1f}") + hours),
                 ("frames/video", _stats(self.frames) + f"  (fps {s.fps}, {s.min_frames}..{s.max_frames})")]
        if self.processor is None:
            return rows + [("tokens", "pass --model to count text and visual tokens")]
        rows += [("visual tokens", _stats(self.visual)), ("sequence tokens", _stats(self.lengths)),
                 ("longest", f"{self.longest[0]} tokens, {self.longest[1]}" if self.longest[1] else "-")]
        if self.max_length is not None:
            rows.append(("over max_length", f"{c['over length']} (shrunk to fit at load time)"))
        return rows


def check_data(
    data_path: str,
    video_folder: str,
    subtitles_folder: str | None = None,
    model: str | None = None,
    stage: Literal["sft", "grpo"] = "sft",
    sampling: Sampling = Sampling(),
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
        sampling: frames per second, frame caps and pixel ranges, as in the config's `data.sampling`.
        max_length: with --model: token budget (max_seq_length / max_prompt_length); a sample that cannot
            fit even after shrinking frames and pixels is a problem, one that must shrink is counted.
        system_prompt: system message used when counting tokens.
    """
    processor = None
    if model is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
    check = DataCheck(data_path, video_folder, subtitles_folder, processor, stage, sampling, max_length,
                      system_prompt)
    check.run()
    rows = check.summary()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for w in check.sub_warnings:
        print(f"warning: {w}")
    if check.problems:
        print(f"\n{len(check.problems)} problem(s):")
        for p in check.problems:
            print(f"  {p}")
        raise SystemExit(1)
    print("\nOK: no problems found")
    return 0
