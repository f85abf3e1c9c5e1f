"""What both stages get from `video_r2.stage.StageModule`: a resumable checkpoint when a run dies, and a
refusal to resume onto base weights other than those the checkpoint was trained from."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch

from test_sft import data_module, quiet_trainer, sft_module


class DieAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise ConnectionError("the judge went away")


def few_batches(tiny_demo, n: int = 4):
    dm = data_module(tiny_demo)
    items = [dm.train_dataset[i] for i in range(2 * n)]
    return lambda: torch.utils.data.DataLoader(items, batch_size=2, shuffle=False, collate_fn=dm.collator())


def test_a_run_that_dies_leaves_a_resumable_checkpoint_and_says_how_to_resume(tiny_demo, tmp_path):
    loader = few_batches(tiny_demo)
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[DieAtStep(2)],
                            logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run", version=""))
    with pytest.warns(UserWarning, match=r"stopped at step 2.*--ckpt_path .*on_exception\.ckpt"):
        with pytest.raises(ConnectionError):
            trainer.fit(sft_module(tiny_demo, lora=True, lr=1e-2), loader())
    ckpt = tmp_path / "run" / "checkpoints" / "on_exception.ckpt"
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 2
    assert not (tmp_path / "run" / "hf").exists()  # a failing run writes no HF export

    resumed = quiet_trainer(tmp_path / "resumed", max_steps=4)
    resumed.fit(sft_module(tiny_demo, lora=True, lr=1e-2), loader(), ckpt_path=str(ckpt))
    assert resumed.global_step == 4


def test_resuming_onto_other_base_weights_is_refused(tiny_demo, tmp_path):
    from video_r2.model import load_model
    from video_r2.stage import BaseMismatchError

    base = tmp_path / "base"
    shutil.copytree(tiny_demo / "model", base)
    demo = tmp_path  # sft_module reads <demo>/model
    (tmp_path / "model").symlink_to(base)
    loader = few_batches(tiny_demo, 2)
    trainer = quiet_trainer(tmp_path / "a", max_steps=2)
    trainer.fit(sft_module(demo, lora=True, lr=1e-2), loader())
    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["video_r2_base"]
    assert saved["path"] == str(demo / "model") and saved["fingerprint"]

    # The same base: the resume goes on.
    again = quiet_trainer(tmp_path / "b", max_steps=3)
    again.fit(sft_module(demo, lora=True, lr=1e-2), loader(), ckpt_path=str(ckpt))
    assert again.global_step == 3

    # The base replaced by a same-architecture model with other weights: refused, naming both.
    other = load_model(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(base)
    refused = quiet_trainer(tmp_path / "c", max_steps=3)
    with pytest.raises(BaseMismatchError, match=r"trained from .*other weights.*Point backbone.name_or_path"):
        refused.fit(sft_module(demo, lora=True, lr=1e-2), loader(), ckpt_path=str(ckpt))


def test_skipped_samples_reach_the_logs_summed_over_ranks(tiny_demo, tmp_path):
    """A missing video under on_bad_sample=skip is replaced, and the count is a logged metric, not just a print."""
    import json

    from video_r2.data import Sampling, VideoDataModule

    data = tiny_demo / "data"
    recs = json.loads((data / "video-r2-sft-dataset.json").read_text())[:4]
    recs[0]["video"] = "missing.mp4"
    path = tmp_path / "with-a-hole.json"
    path.write_text(json.dumps(recs))
    dm = VideoDataModule(data_path=str(path), video_folder=str(data / "videos"), processor_path=str(tiny_demo / "model"),
                         stage="sft", batch_size=2, shuffle=False, on_bad_sample="skip",
                         sampling=Sampling(fps=2.0, max_frames=16, video_min_pixels=56 * 56, video_max_pixels=56 * 56))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(sft_module(tiny_demo, lora=True, lr=1e-3), datamodule=dm)
    assert dm.skipped >= 1  # the hole was hit (a replacement draw may hit it again)
    assert trainer.callback_metrics["data/skipped_samples"] == float(dm.skipped)
