"""Stage 1, timestamp-aware SFT: `SFTModule`, a LightningModule around Qwen2.5-VL.

What it does, as the original `train_sft.sh` does it:
  * the batch (from `VideoDataModule(stage="sft")`) goes straight into the model; the loss is the model's own
    token-mean cross-entropy over the answer tokens (labels are -100 everywhere else: system, question and
    video tokens, padding);
  * AdamW with parameter groups (`lr` for the LLM / LoRA, `merger_lr`, `vision_lr`; no weight decay on norms
    and biases), linear warmup for `warmup_ratio` of the optimizer steps, then cosine decay to
    `min_lr_ratio * lr`, stepped every optimizer step;
  * the model is built in `configure_model`, so Lightning's FSDPStrategy wraps it as built, and under
    `ModelParallelStrategy` (FSDP2) each decoder layer and vision block is `fully_shard`-ed there.

Where it departs from the original (HF Trainer + DeepSpeed):
  * the first warmup step already has a small learning rate ((step + 1) / warmup steps) instead of 0;
  * Lightning checkpoints hold only the trainable weights (the frozen base is reloaded from
    `backbone.name_or_path` on resume), except under FSDP2 / sharded FSDP, whose sharded checkpoints
    keep every weight;
  * at every checkpoint and at the end of training the model is also exported in HF form
    (`<log_dir>/hf/step-N`, `<log_dir>/hf/final` or `export_dir`): the PEFT adapter, any trained base
    weights and the processor; `video-r2 merge-lora` folds it into a standalone checkpoint.

Logged to TensorBoard: train/loss, train/lr (and train/lr_<group> for the vision tower and merger),
train/grad_norm (before clipping), train/tokens_per_s (per device), train/batch_s, val/loss.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from video_r2 import model as vm
from video_r2.model import LoraConfigArgs, ModelConfig


class NonFiniteStepError(RuntimeError):
    """Raised after `max_bad_steps` consecutive SFT updates whose loss or gradients were not finite."""
from video_r2.training import (as_dataclass, build_optimizer, check_export_dir, export_final, plain_hparams,
                               save_trainable_checkpoint)


def model_inputs(batch: dict) -> dict:
    """The tensors of a batch (input_ids, attention_mask, labels, mm_token_type_ids, pixel_values_videos,
    video_grid_thw, second_per_grid_ts); bookkeeping such as the sample ids stays out of the forward."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


class SFTModule(LightningModule):
    """Supervised fine-tuning of Qwen2.5-VL on timestamped video answers.

    Args:
        backbone: the checkpoint to start from and which of its parts train (see `ModelConfig`).
        lora: LoRA/DoRA settings; None trains the unfrozen parts of the base model directly.
        lr: peak learning rate of the language model (LoRA weights included).
        vision_lr: peak learning rate of the vision tower (default: lr).
        merger_lr: peak learning rate of the vision-to-text merger (default: lr).
        weight_decay: AdamW weight decay (not on norms, biases and DoRA magnitudes).
        warmup_ratio: fraction of the optimizer steps spent warming up linearly.
        min_lr_ratio: the cosine ends at min_lr_ratio * peak.
        betas: AdamW betas.
        eps: AdamW epsilon.
        export_dir: where the final HF export goes (default: `<log_dir>/hf/final`).
        export_on_checkpoint: also export to `<log_dir>/hf/step-N` whenever a checkpoint is saved.
        max_bad_steps: this many non-finite updates in a row stop the run (each one is skipped and counted).
    """

    def __init__(
        self,
        backbone: ModelConfig,
        lora: LoraConfigArgs | None = None,
        lr: float = 1e-5,
        vision_lr: float | None = None,
        merger_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        export_dir: str | None = None,
        export_on_checkpoint: bool = True,
        max_bad_steps: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        plain_hparams(self)  # checkpoints are loaded with weights_only=True: plain types only
        self.backbone = as_dataclass(ModelConfig, backbone)
        self.lora = as_dataclass(LoraConfigArgs, lora)
        self.lr, self.vision_lr, self.merger_lr = lr, vision_lr, merger_lr
        self.weight_decay, self.warmup_ratio, self.min_lr_ratio = weight_decay, warmup_ratio, min_lr_ratio
        self.betas, self.eps = tuple(betas), eps
        self.export_dir = export_dir
        self.export_on_checkpoint = export_on_checkpoint
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self._loss_skipped = False
        self.model: torch.nn.Module | None = None
        self.processor = None
        # Checkpoints may leave out the frozen base weights (see on_save_checkpoint).
        self.strict_loading = False
        self._batch_started = 0.0

    # ---------------------------------------------------------------------------------------------
    # model
    # ---------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        check_export_dir(self)  # before anything is built: fail in seconds, not at the end of the run
        if self.model is not None:  # Lightning may call this more than once (fit, then validate)
            return
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        model = vm.build_model(self.backbone, self.lora, dtype=vm.dtype_for_precision(precision))
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            vm.fully_shard_model(model, self.device_mesh["data_parallel"])
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds
        self.processor = vm.load_processor(self.backbone.name_or_path)
        if self.global_rank == 0:
            print(f"{self.backbone.name_or_path}: {vm.trainable_summary(model)}")

    def forward(self, **batch: Any):
        return self.model(**model_inputs(batch))

    # ---------------------------------------------------------------------------------------------
    # steps
    # ---------------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self(**batch).loss
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
        seconds = time.perf_counter() - self._batch_started
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False, batch_size=1)
        self.log("train/batch_s", seconds, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
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
        """Skip a non-finite update, count and log it, and stop after `max_bad_steps` in a row."""
        from lightning.pytorch.utilities import rank_zero_warn

        self.bad_steps_in_a_row += 1
        self.bad_steps_total += 1
        self.log("train/bad_updates_total", float(self.bad_steps_total), on_step=True, on_epoch=False, batch_size=1)
        ids = [] if batch is None else list(batch.get("ids", []))
        rank_zero_warn(f"step {self.global_step}: skipped an update with non-finite {what} (samples {ids}); "
                       f"{self.bad_steps_in_a_row} in a row, {self.bad_steps_total} in total")
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise NonFiniteStepError(
                f"{self.bad_steps_in_a_row} SFT updates in a row had a non-finite {what.split()[0]} "
                f"({self.bad_steps_total} in total); nothing is exported. Lower lr (now {self.lr}), check the "
                "precision, or resume from the last good checkpoint with --ckpt_path."
            )

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients (before clipping), whatever the strategy."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: the local shard
                squares += grad.detach().float().pow(2).sum()
        if self._grads_sharded():  # each rank holds a different slice of every gradient
            torch.distributed.all_reduce(squares)
        return squares.sqrt()

    def _grads_sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    # ---------------------------------------------------------------------------------------------
    # optimizer
    # ---------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        return build_optimizer(self.model, self.trainer.estimated_stepping_batches, self.lr, self.vision_lr,
                               self.merger_lr, self.weight_decay, self.warmup_ratio, self.min_lr_ratio,
                               self.betas, self.eps)

    # ---------------------------------------------------------------------------------------------
    # checkpoints and the HF export
    # ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        export_final(self)

    def export(self, out_dir: str | Path) -> Path | None:
        """HF export of the current weights (collective under FSDP: every rank calls it)."""
        return vm.export_hf(self.model, self.processor, out_dir, rank=self.global_rank)
