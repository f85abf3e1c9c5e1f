"""Dataset, collate and `VideoDataModule`: dataset records -> model-ready batches, for SFT and GRPO.

Per sample, in the DataLoader worker (each planned frame is decoded once, the processor runs once):
1. the record (validated at setup, see `video_r2.schema`) becomes chat messages: a system prompt, the
   human turns with one video/image part per `<video>`/`<image>` tag, the gpt turns;
2. the video headers are probed and the frame count and frame size are planned; when the sample would
   exceed its token budget (`max_seq_length` for SFT, `max_prompt_length` for GRPO) the plan takes fewer
   frames (down to `min_frames`), then fewer pixels, computed from Qwen's grid arithmetic before anything
   is decoded. Vision tokens are never cut;
3. only the planned frames are decoded (`video_r2.video`), then the time and subtitle are drawn on them;
4. the processor builds input ids and vision tensors from the chat template, given the real frame times
   (`VideoMetadata`) so `second_per_grid_ts` and the temporal rope positions are right;
5. SFT: labels are the assistant tokens (each reply and its `<|im_end|>`), -100 elsewhere.
   GRPO: the prompt ends with the generation prompt, and `sample` carries what the rewards read.

A missing or undecodable video, or a sample that cannot fit its budget, follows `on_bad_sample`:
`raise` (naming the path) or `skip` (counted, logged, and another sample drawn in its place).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from video_r2 import video as V
from video_r2.schema import (  # noqa: F401 - re-exported: `video-r2 check-data` is video_r2.data.check_data
    DEFAULT_SYSTEM_PROMPT, IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
    DataValidationError, Media, Sampling, check_data, fit_budget, image_size, load_dataset, media_paths,
    plan_media, reward_sample, to_messages, TooLong,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MAX_CONSECUTIVE_SKIPS = 50


class BadSample(RuntimeError):
    """A sample that cannot be loaded (missing or undecodable media, over its token budget)."""

    def __init__(self, index: int, path: Path | str | None, reason: str):
        self.index, self.path, self.reason = index, path, reason
        super().__init__(f"sample {index}{f' ({path})' if path else ''}: {reason}")


# --------------------------------------------------------------------------------------------------
# the Dataset
# --------------------------------------------------------------------------------------------------


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
    ):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.records, self.processor, self.stage = records, processor, stage
        self.video_folder = Path(video_folder)
        self.subtitles_folder = Path(subtitles_folder) if subtitles_folder else None
        vp = processor.video_processor
        self.sampling = replace(sampling or Sampling(), patch_size=vp.patch_size, merge_size=vp.merge_size,
                                temporal_patch_size=vp.temporal_patch_size)
        self.draw_timestamps, self.draw_subtitles = draw_timestamps, draw_subtitles
        self.system_prompt, self.max_length = system_prompt, max_length
        self.on_bad_sample, self.seed = on_bad_sample, seed
        self.skipped: Counter[str] = Counter()  # reason -> count, in this process (workers keep their own)
        # index -> processed sample; for small datasets seen for many epochs (each worker keeps its own)
        self.cache: dict[int, dict] | None = {} if cache_samples else None
        self._cues: dict[Path, list | None] = {}  # .srt path -> its cues
        tok = processor.tokenizer
        self._assistant_header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self._video_kwargs = {"do_sample_frames": False, "do_resize": False}
        if hasattr(type(vp), "cap_pixels_per_frame"):  # silences a transformers 5.x notice; we resize
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
                path = self.video_folder / rel
                if not path.is_file():
                    raise BadSample(index, path, f"missing {kind}")
                try:
                    if kind == "video":
                        decoder, info = V.open_video(path)  # opened once: planned with, then decoded from
                        media.append(Media(kind, path, info.height, info.width, info=info, decoder=decoder))
                    else:
                        media.append(Media(kind, path, *image_size(path)))
                except (V.VideoDecodeError, OSError) as err:
                    raise BadSample(index, path, f"undecodable {kind}: {err}") from err
        return media

    def _frames(self, index: int, m: Media) -> tuple[torch.Tensor, list[float], Any]:
        """Decode, overlay; returns the frames, their presentation times and the processor's VideoMetadata."""
        from transformers.video_utils import VideoMetadata

        info = m.info
        try:
            times = V.sample_times(info.start, info.duration, m.frames)
            frames, pts = V.decode_frames(m.path, times, m.size, opened=(m.decoder, info))
        except (V.VideoDecodeError, OSError) as err:
            raise BadSample(index, m.path, f"undecodable video: {err}") from err
        cues = None
        if self.draw_subtitles and self.subtitles_folder is not None:
            srt = self.subtitles_folder / f"{m.path.stem}.srt"
            if srt not in self._cues:  # parsed once per process: several records may share a video
                self._cues[srt] = V.parse_srt(srt) if srt.is_file() else None
            cues = self._cues[srt]
        frames = V.overlay_frames(frames, pts, cues, self.draw_timestamps, self.draw_subtitles)
        # The processor reads sampled_fps = len(frames_indices) / total_num_frames * fps: with the native
        # rate and the native frame count that is T / duration, the spacing of the planned times.
        native_fps = info.fps or (info.num_frames / info.duration if info.num_frames else 24.0)
        metadata = VideoMetadata(
            total_num_frames=max(1, round(info.duration * native_fps)), fps=native_fps,
            frames_indices=[round((t - info.start) * native_fps) for t in pts], duration=info.duration,
            width=m.size[1], height=m.size[0],
        )
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
            note = fit_budget(media, self.sampling, text_tokens, self.max_length)
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
            # Exactly temporal_patch_size / sampled_fps, free of the rounding of a header's frame count
            # (what the processor computed from the metadata, to within that rounding).
            tps = self.sampling.temporal_patch_size
            item["second_per_grid_ts"] = torch.tensor(
                [tps * m.info.duration / m.frames for m in media if m.kind == "video"], dtype=torch.float32)
        item["id"] = str(record.get("id", index))
        if self.stage == "sft":
            item["labels"] = self.assistant_labels(item["input_ids"])
        else:
            item["sample"] = {**reward_sample(record, index, text), "frame_times": frame_times}
        return item

    def assistant_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """-100 everywhere but the assistant replies: from after `<|im_start|>assistant\\n` through `<|im_end|>`."""
        ids = input_ids.tolist()
        labels = [IGNORE_INDEX] * len(ids)
        header, n = self._assistant_header, len(self._assistant_header)
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
            labels[start:end + 1] = ids[start:end + 1]
            i = end + 1
        return torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# the LightningDataModule
# --------------------------------------------------------------------------------------------------


class VideoDataModule(LightningDataModule):
    """Video-R2 data for both stages, configured from the `data:` section of a LightningCLI config.

    Batches (B samples, L padded tokens): input_ids, attention_mask, mm_token_type_ids [B, L] (+ labels
    [B, L] for SFT, right-padded; GRPO prompts are left-padded); pixel_values_videos [sum of patches, D],
    video_grid_thw [videos, 3], second_per_grid_ts [videos] (pixel_values / image_grid_thw for images);
    ids: list[str]; GRPO also samples: list[dict] (id, question, answer, solution, temporal_grounding,
    question_type, prompt_text, frame_times). `num_skipped` is taken out of the batch before it reaches
    the model and added to `self.skipped`.
    """

    def __init__(
        self,
        data_path: str,
        video_folder: str,
        processor_path: str,
        stage: Literal["sft", "grpo"] = "sft",
        subtitles_folder: str | None = None,
        fps: float = 1.0,
        max_frames: int = 128,
        min_frames: int = 4,
        video_min_pixels: int = VIDEO_MIN_PIXELS,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
        image_min_pixels: int = IMAGE_MIN_PIXELS,
        image_max_pixels: int = IMAGE_MAX_PIXELS,
        draw_timestamps: bool = True,
        draw_subtitles: bool = True,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_seq_length: int | None = None,
        max_prompt_length: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = True,
        val_data_path: str | None = None,
        val_fraction: float = 0.0,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        cache_samples: bool = False,
    ):
        """
        Args:
            data_path: dataset file, JSON (a list of records) or JSON Lines.
            video_folder: folder the records' `video` / `image` paths are relative to.
            processor_path: model folder or hub id whose processor (tokenizer, chat template) to load.
            stage: "sft" (conversation + labels) or "grpo" (prompt + reward fields).
            subtitles_folder: optional folder of `<video stem>.srt` files drawn on the frames.
            fps: frames sampled per second (recipe: 1.0 SFT, 2.0 GRPO).
            max_frames: frame cap per video (recipe: 128 SFT, 32 GRPO).
            min_frames: frames even for a very short video (or after shrinking to fit a length budget).
            video_min_pixels: per-frame pixel floor.
            video_max_pixels: per-frame pixel ceiling (recipe: 360*420).
            image_min_pixels: pixel floor of `image` records.
            image_max_pixels: pixel ceiling of `image` records.
            draw_timestamps: draw each frame's HH:MM:SS at its top left.
            draw_subtitles: draw the subtitle showing at each frame's time (needs subtitles_folder).
            system_prompt: system message (a record's own system turn wins); null for the template's own.
            max_seq_length: SFT token budget per sample; longer samples get fewer frames, then pixels.
            max_prompt_length: GRPO prompt token budget, handled the same way.
            batch_size: samples per batch (per device).
            num_workers: DataLoader worker processes (decoding runs there).
            pin_memory: pin batches in page-locked memory (only used when CUDA is available).
            val_data_path: a validation file; else val_fraction of data_path is held out.
            val_fraction: share of data_path held out for validation when val_data_path is not set.
            on_bad_sample: "raise" on a missing/undecodable/unfittable sample, or "skip" (count, log, draw another).
            seed: seeds the validation split and the replacement draws of skipped samples.
            cache_samples: keep every processed sample in memory after its first load, so a small
                dataset trained for many epochs is decoded once (use num_workers 0: each worker would
                keep its own copy). Off for real datasets.
        """
        super().__init__()
        self.save_hyperparameters()
        if stage not in ("sft", "grpo"):
            raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sampling = Sampling(fps, max_frames, min_frames, video_min_pixels, video_max_pixels,
                                 image_min_pixels, image_max_pixels)
        self.processor = None
        self.train_dataset: VideoR2Dataset | None = None
        self.val_dataset: VideoR2Dataset | None = None
        self.skipped = 0  # samples skipped so far (on_bad_sample=skip), summed over this rank's workers

    def load_processor(self):
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.hparams.processor_path)
        return self.processor

    def _dataset(self, records: list[dict]) -> VideoR2Dataset:
        h = self.hparams
        return VideoR2Dataset(
            records, self.load_processor(), h.video_folder, h.subtitles_folder, h.stage, self.sampling,
            h.draw_timestamps, h.draw_subtitles, h.system_prompt,
            h.max_seq_length if h.stage == "sft" else h.max_prompt_length, h.on_bad_sample, h.seed,
            h.cache_samples,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        h = self.hparams
        records, problems = load_dataset(h.data_path, h.stage)
        val_records: list[dict] = []
        if h.val_data_path:
            val_records, val_problems = load_dataset(h.val_data_path, h.stage)
            problems += val_problems
        if problems:
            raise DataValidationError(problems)
        if not h.val_data_path and h.val_fraction > 0:
            order = list(range(len(records)))
            random.Random(h.seed).shuffle(order)
            n_val = max(1, round(h.val_fraction * len(records)))
            held = set(order[:n_val])
            val_records = [records[i] for i in sorted(held)]
            records = [r for i, r in enumerate(records) if i not in held]
        self.train_dataset = self._dataset(records)
        self.val_dataset = self._dataset(val_records) if val_records else None

    def collator(self) -> Collator:
        tok = self.load_processor().tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return Collator(pad, "right" if self.hparams.stage == "sft" else "left")

    def _loader(self, dataset: VideoR2Dataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset, batch_size=h.batch_size, shuffle=shuffle, num_workers=h.num_workers,
            collate_fn=self.collator(), pin_memory=h.pin_memory and torch.cuda.is_available(),
            persistent_workers=h.num_workers > 0,
            generator=torch.Generator().manual_seed(h.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "num_skipped" in batch:
            n = batch.pop("num_skipped")
            if n:
                self.skipped += n
                rank = self.trainer.global_rank if self.trainer is not None else 0
                log.warning("rank %d: %d bad sample(s) skipped in this batch, %d so far", rank, n, self.skipped)
        return batch
