"""A diverging SFT run stops with advice and exports nothing, instead of training through NaN and exiting 0."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from test_sft import data_module, quiet_trainer, sft_module


def test_a_diverging_run_skips_counts_then_stops_without_an_export(tiny_demo, tmp_path):
    from video_r2.sft import NonFiniteStepError

    dm = data_module(tiny_demo)
    module = sft_module(tiny_demo, lora=True, lr=1e-3, max_bad_steps=2, export_dir=str(tmp_path / "export"))

    class Diverge(L.Callback):
        """What a too-high learning rate does, made deterministic: the weights turn NaN after step 1."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                with torch.no_grad():
                    next(p for p in pl_module.model.parameters() if p.requires_grad).fill_(float("nan"))

    trainer = quiet_trainer(tmp_path, max_steps=20, limit_val_batches=0, callbacks=[Diverge()])
    with pytest.raises(NonFiniteStepError, match=r"2 SFT updates in a row .*nothing is exported. Lower lr"):
        trainer.fit(module, datamodule=dm)
    assert module.bad_steps_total == 2
    # The good step and the first skipped one (Lightning counts a step whose training_step returned None);
    # the run stopped at the second skip.
    assert trainer.global_step == 2
    assert not (tmp_path / "export").exists()


def test_one_non_finite_gradient_is_skipped_and_changes_nothing(tiny_demo, tmp_path):
    dm = data_module(tiny_demo)
    module = sft_module(tiny_demo, lora=True, lr=1e-3)

    class PoisonFirstGradient(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:  # runs before the module's own hook: the module sees inf
                next(p for p in pl_module.model.parameters() if p.grad is not None).grad.fill_(float("inf"))

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.after_first = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                    if p.requires_grad}

    snap = Snapshot()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[PoisonFirstGradient(), snap])
    trainer.fit(module, datamodule=dm)
    assert module.bad_steps_total == 1 and module.bad_steps_in_a_row == 0  # the second step was good
    assert all(torch.equal(snap.before[n], snap.after_first[n]) for n in snap.before)  # the bad step was a no-op
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
