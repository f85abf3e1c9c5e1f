"""Exact resume: N steps in one go equal N/2 steps, a checkpoint, and a fresh run resumed to N, with the real
data module shuffling (a new order every epoch) and the checkpoint taken in the middle of an epoch."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from test_sft import quiet_trainer, sft_module


def small_data_module(tiny_demo, tmp_path, records: int = 6):
    from video_r2.data import Sampling, VideoDataModule

    data = tiny_demo / "data"
    path = tmp_path / "sft-subset.json"
    path.write_text(json.dumps(json.loads((data / "video-r2-sft-dataset.json").read_text())[:records]))
    return VideoDataModule(data_path=str(path), video_folder=str(data / "videos"), processor_path=str(tiny_demo / "model"),
                           subtitles_folder=str(data / "subtitles"), stage="sft", batch_size=2, seed=3,
                           sampling=Sampling(fps=2.0, max_frames=16, video_min_pixels=56 * 56,
                                             video_max_pixels=56 * 56))


class Killed(Exception):
    pass


class KillAtStep(L.Callback):
    """The run dies at the start of step `step`, as a SIGKILL would leave it: only its checkpoints remain."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


class Record(L.Callback):
    def __init__(self):
        self.losses, self.ids = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ids.append(list(batch["ids"]))


def fit(tiny_demo, tmp_path, name, steps, ckpt=None, every=None, kill_at=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    record = Record()
    callbacks = [record] + ([ModelCheckpoint(dirpath=tmp_path / name / "ckpt", every_n_train_steps=every,
                                             save_top_k=-1, filename="{step}")] if every else [])
    callbacks += [KillAtStep(kill_at)] if kill_at else []
    trainer = quiet_trainer(tmp_path / name, max_steps=steps, callbacks=callbacks, enable_checkpointing=bool(every))
    module = sft_module(tiny_demo, lora=True, lr=1e-2)
    try:
        trainer.fit(module, datamodule=small_data_module(tiny_demo, tmp_path), ckpt_path=ckpt)
    except Killed:
        pass
    return module, record


@pytest.mark.slow
def test_sft_resumed_mid_epoch_repeats_the_uninterrupted_run_bit_for_bit(tiny_demo, tmp_path):
    # 6 records in batches of 2: 3 batches an epoch; 8 steps cross two epoch boundaries, step 4 is mid-epoch.
    whole, whole_record = fit(tiny_demo, tmp_path, "whole", 8)
    _, first = fit(tiny_demo, tmp_path, "first", 8, every=4, kill_at=4)
    resumed, rest = fit(tiny_demo, tmp_path, "resumed", 8, ckpt=str(tmp_path / "first" / "ckpt" / "step=4.ckpt"))
    epochs = [sorted(sum(whole_record.ids[i:i + 3], [])) for i in (0, 3)]
    assert epochs[0] == epochs[1] and whole_record.ids[:3] != whole_record.ids[3:6]  # reshuffled each epoch
    assert first.ids == whole_record.ids[:4] and first.losses == whole_record.losses[:4]
    assert rest.ids == whole_record.ids[4:]  # the resumed epoch goes on where it stopped
    assert rest.losses == whole_record.losses[4:]
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
