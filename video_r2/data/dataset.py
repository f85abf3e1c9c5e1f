"""Records -> model-ready samples (`VideoR2Dataset`) and batches (`Collator`), for SFT and GRPO.

Per sample, in the DataLoader worker (each planned frame is decoded once, the processor runs once):
1. the record (validated at setup, `records`) becomes chat messages (`chat`);
2. the video headers are read and the frames and sizes planned within the token budget (`budget`);
3. only the planned frames are decoded, the time and subtitle drawn on them at their native size, then
   they are resized (`video_r2.video`);
4. the processor builds input ids and vision tensors from the chat template, given the frames' real
   indices and the video's frame rate (`VideoMetadata`), so `second_per_grid_ts` and the temporal rope
   positions are qwen-vl-utils' own;
5. SFT: labels are the assistant replies, each with its `<|im_end|>` and the newline after it (as the
   original labels them), -100 elsewhere. GRPO: the prompt ends with the generation prompt, and `sample`
   carries what the rewards read.

A missing or undecodable video, or a sample that cannot fit its budget, follows `on_bad_sample`:
`raise` (naming the path) or `skip` (counted, logged, and another sample drawn in its place).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from video_r2 import video as V
from video_r2.data.budget import Grid, Media, Sampling, TooLong, fit_budget, seconds_per_grid
from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT, reward_sample, to_messages
from video_r2.data.records import media_file, media_paths

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MAX_CONSECUTIVE_SKIPS = 50


class BadSample(RuntimeError):
    """A sample that cannot be loaded (missing or undecodable media, over its token budget)."""

    def __init__(self, index: int, path: Path | str | None, reason: str):
        self.index, self.path, self.reason = index, path, reason
        super().__init__(f"sample {index}{f' ({path})' if path else ''}: {reason}")


class VideoR2Dataset(Dataset):
    """Map-style dataset of validated records; `__getitem__` returns one unbatched sample (see module doc).

    SFT item: input_ids, labels, attention_mask, mm_token_type_ids [L]; pixel_values_videos [N, D],
    video_grid_thw [V, 3], second_per_grid_ts [V] (images: pixel_values, image_grid_thw); id; num_skipped.
    GRPO item: the prompt's tensors (no labels) and `sample` (the dict the rewards read).
    """

    def __init__(
        self,
        records: list[dict],
        processor: Any,
        video_folder: str | Path,
        subtitles_folder: str | Path | None = None,
        stage: Literal["sft", "grpo"] = "sft",
        sampling: Sampling | None = None,
        draw_timestamps: bool = True,
        draw_subtitles: bool = True,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: int | None = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        cache_samples: bool = False,
        keep_frames: bool = False,
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.records, self.processor, self.stage = records, processor, stage
        self.video_folder = Path(video_folder)
        self.subtitles_folder = Path(subtitles_folder) if subtitles_folder else None
        self.sampling, self.grid = sampling or Sampling(), Grid.of(processor)
        self.draw_timestamps, self.draw_subtitles = draw_timestamps, draw_subtitles
        self.system_prompt, self.max_length = system_prompt, max_length
        self.on_bad_sample, self.seed = on_bad_sample, seed
        self.skipped: Counter[str] = Counter()  # reason -> count, in this process (workers keep their own)
        # index -> processed sample; for small datasets seen for many epochs (each worker keeps its own)
        self.cache: dict[int, dict] | None = {} if cache_samples else None
        # GRPO with the vLLM engine: each sample also keeps its drawn uint8 frames and their metadata (the
        # engine is fed them). Off, they are dropped once processed: a 128-frame 360x420 video is ~58 MB that
        # would otherwise travel through the DataLoader's workers with every sample.
        self.keep_frames = keep_frames
        self._cues: dict[Path, list | None] = {}  # .srt path -> its cues
        tok = processor.tokenizer
        self._assistant_header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self._newline = tok.encode("\n", add_special_tokens=False)
        self._video_kwargs = {"do_sample_frames": False, "do_resize": False}
        if hasattr(type(processor.video_processor), "cap_pixels_per_frame"):  # silences a transformers 5.x notice
            self._video_kwargs["cap_pixels_per_frame"] = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        failures = 0
        current = index
        while True:
            try:
                item = self.load(current)
            except BadSample as bad:
                if self.on_bad_sample == "raise":
                    raise
                failures += 1
                self.skipped[bad.reason.split(":")[0]] += 1
                log.warning("skipping %s (on_bad_sample=skip; %d skipped in this process)", bad,
                            sum(self.skipped.values()))
                if failures >= _MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"{failures} bad samples in a row (last: {bad}); check the dataset "
                                       "with `video-r2 check-data`") from bad
                current = random.Random(f"{self.seed}:{index}:{failures}").randrange(len(self))
                continue
            item["num_skipped"] = failures
            return item

    # ---- one sample, no skipping -------------------------------------------------------------------

    def _media(self, index: int, record: dict) -> list[Media]:
        media = []
        for kind in ("video", "image"):
            for rel in media_paths(record, kind):
                path = media_file(self.video_folder, rel)
                if path is None:
                    raise BadSample(index, rel, f"{kind} path leaves video_folder {self.video_folder}: "
                                                "give paths relative to it")
                if not path.is_file():
                    raise BadSample(index, path, f"missing {kind}")
                try:
                    if kind == "video":
                        decoder, info = V.open_video(path)  # opened once: planned with, then decoded from
                        media.append(Media(kind, path, info.height, info.width, info=info, handle=decoder))
                    else:
                        media.append(Media(kind, path, *V.image_size(path)))
                except (V.VideoDecodeError, OSError) as err:
                    raise BadSample(index, path, f"undecodable {kind}: {err}") from err
        return media

    def cues(self, path: Path) -> list | None:
        """The cues of the video's `<stem>.srt`, parsed once per process (records may share a video)."""
        if not (self.draw_subtitles and self.subtitles_folder is not None):
            return None
        srt = self.subtitles_folder / f"{path.stem}.srt"
        if srt not in self._cues:
            self._cues[srt] = V.parse_srt(srt) if srt.is_file() else None
        return self._cues[srt]

    def _frames(self, index: int, m: Media) -> tuple[torch.Tensor, list[float], Any]:
        """Decode, draw, resize; returns the frames, their presentation times and the processor's VideoMetadata."""
        from transformers.video_utils import VideoMetadata

        info = m.info
        try:
            frames, pts, indices = V.load_frames(
                m.path, m.frames, m.size, self.sampling.frame_positions, self.cues(m.path),
                self.draw_timestamps, self.draw_subtitles, opened=(m.handle, info))
        except (V.VideoDecodeError, OSError) as err:
            raise BadSample(index, m.path, f"undecodable video: {err}") from err
        # The processor reads sampled_fps = len(frames_indices) / total_num_frames * fps: qwen-vl-utils' sample fps.
        metadata = VideoMetadata(total_num_frames=info.total_frames, fps=info.native_fps, frames_indices=indices,
                                 duration=info.duration, width=m.size[1], height=m.size[0])
        return frames, pts, metadata

    def load(self, index: int) -> dict:
        """One processed sample; raises `BadSample` (never skips). Served from memory when cached."""
        if self.cache is not None:
            if index not in self.cache:
                self.cache[index] = self._load(index)
            return dict(self.cache[index])  # a shallow copy: callers add keys (num_skipped)
        return self._load(index)

    def _load(self, index: int) -> dict:
        record = self.records[index]
        messages = to_messages(record, self.system_prompt)
        tpl = self.processor.apply_chat_template
        if self.stage == "sft":
            text = tpl(messages, tokenize=False, add_generation_prompt=False)
        else:
            text = tpl(messages[:-1], tokenize=False, add_generation_prompt=True)
        media = self._media(index, record)
        text_tokens = 0  # tokens other than vision ones; counted only when there is a budget to meet
        if self.max_length is not None:
            text_tokens = len(self.processor.tokenizer.encode(text, add_special_tokens=False)) - len(media)
        try:
            note = fit_budget(media, self.sampling, self.grid, text_tokens, self.max_length)
        except TooLong as err:
            raise BadSample(index, media[0].path if media else None, f"too long: {err}") from err
        except ValueError as err:  # a size `fit_size` refuses (an extreme aspect ratio)
            raise BadSample(index, media[0].path, f"unusable size: {err}") from err
        if note:
            log.warning("sample %d (%s): %s", index, record.get("id", index), note)

        videos, metadata, images, frame_times = [], [], [], []
        for m in media:
            if m.kind == "video":
                frames, pts, meta = self._frames(index, m)
                videos.append(frames)
                metadata.append(meta)
                frame_times.append(pts)
            else:
                try:
                    images.append(V.load_image(m.path, m.size[0] * m.size[1], m.size[0] * m.size[1])[0])
                except (V.VideoDecodeError, OSError) as err:
                    raise BadSample(index, m.path, f"undecodable image: {err}") from err
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs.update(videos=videos, videos_kwargs={**self._video_kwargs, "video_metadata": metadata})
        if images:
            kwargs.update(images=images, images_kwargs={"do_resize": False})
        out = self.processor(text=[text], return_tensors="pt", **kwargs)
        item = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in out.items()}
        if videos:
            # qwen-vl-utils' own value, temporal_patch_size / sample fps, computed from the plan.
            item["second_per_grid_ts"] = torch.tensor(
                [seconds_per_grid(m.info, m.frames, self.grid.temporal_patch_size) for m in media if m.kind == "video"],
                dtype=torch.float32)
        item["id"] = str(record.get("id", index))
        if self.stage == "sft":
            item["labels"] = self.assistant_labels(item["input_ids"])
        else:
            item["sample"] = {**reward_sample(record, index, text), "frame_times": frame_times}
            if self.keep_frames:  # videos (uint8 [T, C, H, W], as drawn) and their VideoMetadata, for vLLM
                item["sample"].update(videos=videos, video_metadata=metadata)
        return item

    def assistant_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """-100 everywhere but the assistant replies: from after `<|im_start|>assistant\\n` through
        `<|im_end|>` and the newline the template puts after it (the original trains that newline too)."""
        ids = input_ids.tolist()
        labels = [IGNORE_INDEX] * len(ids)
        header, n = self._assistant_header, len(self._assistant_header)
        newline = self._newline
        i = 0
        while i <= len(ids) - n:
            if ids[i:i + n] != header:
                i += 1
                continue
            start = i + n
            end = start
            while end < len(ids) and ids[end] != self._im_end:
                end += 1
            end = min(end, len(ids) - 1)
            if ids[end] == self._im_end and ids[end + 1:end + 1 + len(newline)] == newline:
                end += len(newline)
            labels[start:end + 1] = ids[start:end + 1]
            i = end + 1
        return torch.tensor(labels, dtype=torch.long)


_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
_VISION_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")


@dataclass
class Collator:
    """Pads the text (right for SFT, left for GRPO prompts) and concatenates the vision tensors."""

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_values: dict = field(default_factory=lambda: {"input_ids": None, "attention_mask": 0,
                                                      "mm_token_type_ids": 0, "labels": IGNORE_INDEX})

    def __call__(self, items: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        length = max(len(it["input_ids"]) for it in items)
        for key in _TEXT_KEYS:
            if key not in items[0]:
                continue
            value = self.pad_token_id if self.pad_values[key] is None else self.pad_values[key]
            out = torch.full((len(items), length), value, dtype=items[0][key].dtype)
            for row, it in enumerate(items):
                seq = it[key]
                if self.padding_side == "right":
                    out[row, : len(seq)] = seq
                else:
                    out[row, length - len(seq):] = seq
            batch[key] = out
        for key in _VISION_KEYS:
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        batch["ids"] = [it["id"] for it in items]
        batch["num_skipped"] = sum(it.get("num_skipped", 0) for it in items)
        if "sample" in items[0]:
            batch["samples"] = [it["sample"] for it in items]
        return batch
