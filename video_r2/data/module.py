"""`VideoDataModule`: the `data:` section of a LightningCLI config -> train / val DataLoaders.

Setup validates every record first (all problems reported together, `DataValidationError`) and builds
nothing when any is wrong; the samples themselves are made by `VideoR2Dataset` in the loader workers.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from video_r2.data.budget import Sampling
from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT
from video_r2.data.dataset import Collator, VideoR2Dataset
from video_r2.data.records import DataValidationError, load_dataset
from video_r2.data.sampler import ResumableSampler

log = logging.getLogger(__name__)


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
        sampling: Sampling = Sampling(),
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
        shuffle: bool = True,
        ranks_per_group: int = 1,
    ):
        """
        Args:
            data_path: dataset file, JSON (a list of records) or JSON Lines.
            video_folder: folder the records' `video` / `image` paths are relative to.
            processor_path: model folder or hub id whose processor (tokenizer, chat template) to load.
            stage: "sft" (conversation + labels) or "grpo" (prompt + reward fields).
            subtitles_folder: optional folder of `<video stem>.srt` files drawn on the frames.
            sampling: frames per second, frame caps, pixel ranges and frame positions (see `Sampling`).
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
            seed: seeds the training order (epoch e's order is a function of (seed, e), so a resumed run
                sees what the uninterrupted one would), the validation split and the replacement draws of
                skipped samples.
            cache_samples: keep every processed sample in memory after its first load, so a small
                dataset trained for many epochs is decoded once (use num_workers 0: each worker would
                keep its own copy). Off for real datasets.
            shuffle: a new order every epoch; off: the file's order.
            ranks_per_group: consecutive ranks that get the same prompts; equal to the GRPO module's
                `rollout.ranks_per_group` (groups spanning ranks); 1 for SFT.
        """
        super().__init__()
        self.save_hyperparameters()
        # Plain types in hparams: checkpoints (which keep the data module's hparams) load with weights_only.
        self.hparams["sampling"] = dataclasses.asdict(sampling) if dataclasses.is_dataclass(sampling) else sampling
        if stage not in ("sft", "grpo"):
            raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling(**sampling)
        self.processor = None
        self.train_dataset: VideoR2Dataset | None = None
        self.val_dataset: VideoR2Dataset | None = None
        # Set by GRPOModule when its rollout engine needs each prompt's frames (rollout_engine: vllm).
        self.keep_frames = False
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
            h.cache_samples, self.keep_frames,
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

    def _loader(self, dataset: VideoR2Dataset, sampler=None) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset, batch_size=h.batch_size, sampler=sampler, num_workers=h.num_workers,
            collate_fn=self.collator(), pin_memory=h.pin_memory and torch.cuda.is_available(),
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        h = self.hparams
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self.train_dataset.keep_frames = self.keep_frames  # the model's setup may have asked for them since
        sampler = ResumableSampler(len(self.train_dataset), h.shuffle, h.seed, world, rank, h.ranks_per_group)
        if trainer is not None:  # a resumed run starts its epoch after the batches the checkpoint consumed
            # `processed`, not `completed`: a checkpoint taken in on_train_batch_end (ModelCheckpoint's
            # every_n_train_steps) has processed its batch but not yet marked it completed.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done:
                sampler.resume_at(trainer.current_epoch, done * h.batch_size)
        return self._loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader(self.val_dataset) if self.val_dataset is not None else []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "num_skipped" in batch:
            n = batch.pop("num_skipped")
            if n:
                self.skipped += n
                rank = self.trainer.global_rank if self.trainer is not None else 0
                log.warning("rank %d: %d bad sample(s) skipped in this batch, %d so far", rank, n, self.skipped)
        return batch
