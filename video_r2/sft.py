"""Stage 1, timestamp-aware SFT: `SFTModule`, a LightningModule around Qwen2.5-VL.

What it does, as the original `train_sft.sh` does it:
  * the batch (from `VideoDataModule(stage="sft")`) goes straight into the model; the loss is the token-mean
    cross-entropy over the answer tokens (labels are -100 everywhere else: system, question and video tokens,
    padding), the value of the model's own `labels=` loss, with the LM head run only where an answer token is
    predicted (`answer_loss`);
  * the optimizer, schedule, model building, lean checkpoints and HF export are `video_r2.stage.StageModule`'s,
    shared with GRPO.

Where it departs from the original (HF Trainer + DeepSpeed):
  * the first warmup step already has a small learning rate ((step + 1) / warmup steps) instead of 0;
  * Lightning checkpoints hold only the trainable weights (the frozen base is reloaded from
    `backbone.name_or_path` on resume), except under FSDP2 / sharded FSDP, whose sharded checkpoints
    keep every weight;
  * at every checkpoint and at the end of training the model is also exported in HF form
    (`<log_dir>/hf/step-N`, `<log_dir>/hf/final` or `export.dir`): the PEFT adapter, any trained base
    weights and the processor; `video-r2 merge-lora` folds it into a standalone checkpoint.

Logged to TensorBoard: train/loss, train/lr (and train/lr_<group> for the vision tower and merger),
train/grad_norm (before clipping), train/tokens_per_s (per device), train/batch_s, val/loss.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from video_r2.model import LoraConfigArgs, ModelConfig
from video_r2.stage import ExportArgs, NonFiniteStepError, OptimizerArgs, StageModule

__all__ = ["SFTModule", "NonFiniteStepError", "answer_loss", "model_inputs"]


def model_inputs(batch: dict) -> dict:
    """The tensors of a batch (input_ids, attention_mask, labels, mm_token_type_ids, pixel_values_videos,
    video_grid_thw, second_per_grid_ts); bookkeeping such as the sample ids stays out of the forward."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Token-mean cross-entropy of the answer tokens: the model's own `labels=` loss (shifted by one, -100
    ignored, logits in fp32), with the LM head applied only at the positions that predict a label.

    Why: most of a sample is video and question, and full-sequence logits are the step's largest tensor (on
    the recipe, 16k tokens x Qwen's 152k vocabulary is ~10 GB in fp32); here they cost only the answers.
    """
    inputs = model_inputs(batch)
    labels = inputs.pop("labels")  # [B, L]
    targets = labels[:, 1:]  # [B, L-1]: the token each position predicts
    predicts = torch.zeros_like(labels, dtype=torch.bool)  # [B, L]
    predicts[:, :-1] = targets != -100
    logits = model(**inputs, logits_to_keep=predicts).logits  # [n, V]: the kept positions, row-major
    return F.cross_entropy(logits.float(), targets[predicts[:, :-1]])


class SFTModule(StageModule):
    """Supervised fine-tuning of Qwen2.5-VL on timestamped video answers.

    Args:
        backbone: the checkpoint to start from and which of its parts train (see `ModelConfig`).
        lora: LoRA/DoRA settings; None trains the unfrozen parts of the base model directly.
        optim: AdamW and its schedule (`video_r2.stage.OptimizerArgs`; SFT's default lr is 1e-5 with 3% warmup).
        export: where the HF exports go (`video_r2.stage.ExportArgs`).
        max_bad_steps: this many non-finite updates in a row stop the run (each one is skipped and counted).
    """

    stage_name = "SFT"

    def __init__(
        self,
        backbone: ModelConfig,
        lora: LoraConfigArgs | None = None,
        optim: OptimizerArgs | None = None,
        export: ExportArgs | None = None,
        max_bad_steps: int = 3,
    ) -> None:
        super().__init__(backbone, lora, optim or OptimizerArgs(lr=1e-5, warmup_ratio=0.03), export, max_bad_steps)
        self.save_hyperparameters()
        self.plain_hparams()
        self._loss_skipped = False
        self._batch_started = 0.0

    def forward(self, **batch: Any):
        return self.model(**model_inputs(batch))

    # ---------------------------------------------------------------------------------------------
    # steps
    # ---------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = answer_loss(self.model, batch)
        bs = batch["input_ids"].shape[0]
        if self._any_rank(~torch.isfinite(loss.detach())):
            self._skip_bad_update(f"loss {loss.item()}", batch)
            self._loss_skipped = True  # on_before_optimizer_step still runs (without gradients): leave the count
            return None  # Lightning skips backward and the optimizer step of this batch
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True, batch_size=bs)
        for i, group in enumerate(self.optimizers().param_groups):
            if group.get("name", "llm") == "llm" or i == 0:
                self.log("train/lr", group["lr"], on_step=True, on_epoch=False, batch_size=bs)
            elif not group["name"].endswith("_no_decay"):
                self.log(f"train/lr_{group['name']}", group["lr"], on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        seconds = time.perf_counter() - self._batch_started
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False, batch_size=1)
        self.log("train/batch_s", seconds, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._loss_skipped:
            self._loss_skipped = False
            return
        grad_norm = self._grad_norm()
        if not torch.isfinite(grad_norm):  # the same value on every rank: the norm is reduced
            for p in self.model.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: this step changes nothing
            self._skip_bad_update(f"grad norm {grad_norm.item()}", None)
            return
        self.bad_steps_in_a_row = 0
        self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False, batch_size=1)

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """True if `flag` is set on any rank, so every rank skips the same step (DDP would hang otherwise)."""
        flag = flag.to(self.device, torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _skip_bad_update(self, what: str, batch: dict | None) -> None:
        self.log("train/bad_updates_total", float(self.bad_steps_total + 1), on_step=True, on_epoch=False,
                 batch_size=1)
        self.count_bad_update(what, [] if batch is None else list(batch.get("ids", [])))

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (before clipping), whatever the strategy."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: the local shard
                squares += grad.detach().float().pow(2).sum()
        if self.sharded():  # each rank holds a different slice of every gradient
            torch.distributed.all_reduce(squares)
        return squares.sqrt()
