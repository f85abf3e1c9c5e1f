"""What both training stages share: `StageModule`, the base LightningModule of `SFTModule` and `GRPOModule`.

A stage module holds its model as `self.model` and its processor as `self.processor`, and gets from here:
  * `configure_model`: the model is built there, not in `__init__`, so Lightning's FSDPStrategy wraps it as it
    is built, and under `ModelParallelStrategy` (FSDP2) each decoder layer and vision block is sharded;
  * `configure_optimizers`: AdamW over `model.param_groups` (LLM / vision / merger rates, no decay on norms
    and biases), linear warmup then cosine to `min_lr_ratio * lr`, stepped every optimizer step;
  * lean checkpoints: only the trained weights (the frozen base is reloaded from `backbone.name_or_path`),
    except sharded checkpoints, which keep every key;
  * the HF export: `<log_dir>/hf/step-N` with each checkpoint and `<log_dir>/hf/final` (or `export.dir`) at
    the end, with the command to run next;
  * the non-finite-update policy: a bad update is skipped and counted, `max_bad_steps` in a row stop the run;
  * on any exception (a judge outage, Ctrl-C, a dead worker) a resumable `checkpoints/on_exception.ckpt`,
    and the command that resumes from it;
  * the base's identity (path and `model.weights_fingerprint`) in every checkpoint: resuming onto other base
    weights is refused instead of training on silently;
  * `data/skipped_samples`: bad samples skipped so far, summed over ranks, in TensorBoard.

Subclasses add `_after_build(model)` for what only they need (GRPO's reference copy, its token ids).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from video_r2 import model as vm
from video_r2.model import LoraConfigArgs, ModelConfig


@dataclass
class OptimizerArgs:
    """AdamW and its schedule (the original's HF Trainer flags in brackets)."""

    lr: float = 1e-5  # peak learning rate of the language model, LoRA weights included (--learning_rate)
    vision_lr: float | None = None  # peak rate of the vision tower; None: lr (--vision_lr)
    merger_lr: float | None = None  # peak rate of the vision-to-text merger; None: lr (--merger_lr)
    weight_decay: float = 0.0  # AdamW decay, never on norms, biases or DoRA magnitudes (--weight_decay)
    warmup_ratio: float = 0.0  # share of the optimizer steps warming up linearly (--warmup_ratio)
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio * peak (--lr_scheduler_type cosine: 0)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (--adam_beta1, --adam_beta2)
    eps: float = 1e-8  # AdamW epsilon (--adam_epsilon)


@dataclass
class ExportArgs:
    """Where the HF-format exports of a run go."""

    dir: str | None = None  # the final export; None: <log_dir>/hf/final
    on_checkpoint: bool = True  # also write <log_dir>/hf/step-N with every checkpoint


class NonFiniteStepError(RuntimeError):
    """Raised after `max_bad_steps` consecutive updates whose loss or gradients were not finite."""


class BaseMismatchError(ValueError):
    """A checkpoint is resumed onto base weights other than those it was trained from."""


class ResumableOnException(OnExceptionCheckpoint):
    """Lightning's checkpoint-on-exception, plus the line that tells the user how to resume from it."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.saving_on_exception = True  # no HF export from a failing run: only the resumable checkpoint
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            pl_module.saving_on_exception = False
        rank_zero_warn(f"{type(exception).__name__}: the run stopped at step {trainer.global_step}; its state is in "
                       f"{self.ckpt_path}. Fix the cause, then resume with the same command and "
                       f"--ckpt_path {self.ckpt_path}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    The first warmup step already has a small rate ((step + 1) / warmup_steps), not HF's 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, total_steps: int, args: OptimizerArgs) -> dict:
    """AdamW over `vm.param_groups` with the warmup-cosine schedule; Lightning's `configure_optimizers` dict."""
    groups = vm.param_groups(model, lr=args.lr, vision_lr=args.vision_lr, merger_lr=args.merger_lr,
                             weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    total = max(1, int(total_steps))
    schedule = partial(warmup_cosine, warmup_steps=math.ceil(args.warmup_ratio * total), total_steps=total,
                       min_lr_ratio=args.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def as_dataclass(cls, value):
    """`value` as a `cls` instance: LightningCLI gives dataclasses, a checkpoint's hyper_parameters dicts."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


class StageModule(LightningModule):
    """The base of both stages; see the module docstring for what it does.

    Args:
        backbone: the checkpoint to start from and which of its parts train (`ModelConfig`).
        lora: LoRA / DoRA settings; None trains the unfrozen parts of the base model directly.
        optim: AdamW and its schedule.
        export: where the HF exports go.
        max_bad_steps: this many non-finite updates in a row stop the run (each one is skipped and counted).
    """

    stage_name = "training"  # in messages: "SFT", "GRPO"

    def __init__(self, backbone: ModelConfig, lora: LoraConfigArgs | None, optim: OptimizerArgs | None,
                 export: ExportArgs | None, max_bad_steps: int) -> None:
        super().__init__()
        self.backbone = as_dataclass(ModelConfig, backbone)
        self.lora = as_dataclass(LoraConfigArgs, lora)
        self.optim = as_dataclass(OptimizerArgs, optim) or OptimizerArgs()
        self.export_args = as_dataclass(ExportArgs, export) or ExportArgs()
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self.model: torch.nn.Module | None = None
        self.processor = None
        self.strict_loading = False  # lean checkpoints leave out the frozen base weights
        self.saving_on_exception = False
        self._base_fingerprint: str | None = None

    def plain_hparams(self) -> None:
        """Dataclass hyperparameters as dicts: checkpoints are loaded with weights_only=True."""
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value):
                self.hparams[key] = dataclasses.asdict(value)

    # ---- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        self.check_export_dir()  # before anything is built: fail in seconds, not at the end of the run
        if self.model is not None:  # Lightning may call this more than once (fit, then validate)
            return
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        model = vm.build_model(self.backbone, self.lora, dtype=vm.dtype_for_precision(precision))
        self._after_build(model)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            for m in self.models_to_shard(model):
                vm.fully_shard_model(m, self.device_mesh["data_parallel"])
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps the mode it finds
        self._base_fingerprint = vm.weights_fingerprint(self.backbone.name_or_path)
        self.processor = vm.load_processor(self.backbone.name_or_path)
        if self.global_rank == 0:
            rank_zero_info(f"{self.backbone.name_or_path}: {vm.trainable_summary(model)}")

    def _after_build(self, model: torch.nn.Module) -> None:
        """Hook: runs once the model is built, before it is sharded."""

    def models_to_shard(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules FSDP2 shards: the model (GRPO adds its frozen reference)."""
        return [model]

    def sharded(self) -> bool:
        """True under FSDP1 or FSDP2: gradients and weights are split over the ranks."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def configure_optimizers(self):
        return build_optimizer(self.model, self.trainer.estimated_stepping_batches, self.optim)

    def on_train_start(self) -> None:
        """After a resume the optimizer holds the rate the old run ended on (0 at the end of its cosine); set
        the rate of the current step from this run's schedule, so a longer `max_steps` continues at once."""
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)

    # ---- non-finite updates ------------------------------------------------------------------------

    def count_bad_update(self, what: str, ids: list) -> None:
        """A skipped non-finite update: count it, warn, and stop after `max_bad_steps` in a row."""
        self.bad_steps_in_a_row += 1
        self.bad_steps_total += 1
        rank_zero_warn(f"step {self.global_step}: skipped an update with non-finite {what} (samples {ids}); "
                       f"{self.bad_steps_in_a_row} in a row, {self.bad_steps_total} in total")
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise NonFiniteStepError(
                f"{self.bad_steps_in_a_row} {self.stage_name} updates in a row had a non-finite {what.split()[0]} "
                f"({self.bad_steps_total} in total; last samples {ids}); nothing is exported. Lower lr (now "
                f"{self.optim.lr}), check the precision (bf16-true with a tiny lr can underflow), or resume from "
                "the last good checkpoint with --ckpt_path."
            )

    # ---- checkpoints and the HF export -------------------------------------------------------------

    def _checkpoint_keeps_everything(self) -> bool:
        """Sharded (distributed) checkpoints are loaded key by key against the whole model: keep all keys."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            return True
        return isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded"

    def configure_callbacks(self):
        """A resumable checkpoint whenever the run dies (`checkpoints/on_exception.ckpt` under the log dir)."""
        if self._trainer is None or not self.trainer.log_dir:
            return []
        return [ResumableOnException(Path(self.trainer.log_dir) / "checkpoints")]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        skipped = getattr(getattr(self._trainer, "datamodule", None), "skipped", None)
        if skipped is not None:  # every rank's count, summed: bad samples are never only printed
            self.log("data/skipped_samples", float(skipped), on_step=True, on_epoch=False, reduce_fx="sum",
                     sync_dist=True, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained weights, record the base, and write the HF export of this step next to the logs."""
        if not self._checkpoint_keeps_everything():
            trainable = {"model." + vm.clean_name(n) for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if vm.clean_name(k) in trainable}
        checkpoint["video_r2_base"] = {"path": str(self.backbone.name_or_path), "fingerprint": self._base_fingerprint}
        if self.export_args.on_checkpoint and not self.saving_on_exception:
            self.export(Path(self.trainer.log_dir or ".") / "hf" / f"step-{self.global_step}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume onto other base weights: a lean checkpoint holds only what trained on top of them."""
        saved = checkpoint.get("video_r2_base") or {}
        now = self._base_fingerprint or vm.weights_fingerprint(self.backbone.name_or_path)
        if saved.get("fingerprint") and now and saved["fingerprint"] != now:
            raise BaseMismatchError(
                f"this checkpoint was trained from {saved['path']} (weights fingerprint {saved['fingerprint']}), "
                f"but backbone.name_or_path {self.backbone.name_or_path} now holds other weights (fingerprint "
                f"{now}). Point backbone.name_or_path at the model the run started from, or start a new run "
                "without --ckpt_path."
            )

    def check_export_dir(self) -> None:
        """Refuse an export dir that is, contains or lies inside the starting model's directory: the export
        would overwrite the weights a resume reloads the frozen parts and the reference from."""
        from video_r2.merge_lora import refuse_overlap

        if self.export_args.dir:
            refuse_overlap(Path(self.export_args.dir),
                           {"backbone (and reference)": Path(self.backbone.name_or_path)},
                           flag="--model.init_args.export.dir")

    def on_train_end(self) -> None:
        """The HF export of the final weights, and what to do with it next."""
        self.check_export_dir()
        out = self.export_args.dir or Path(self.trainer.log_dir or ".") / "hf" / "final"
        written = self.export(out)
        if written is None:
            return
        if vm.is_peft(self.model):
            print(f"HF export (adapter) in {written}\nnext: video-r2 merge-lora --base_model "
                  f"{self.backbone.name_or_path} --lora_model {written} --output_dir {written}-merged")
        else:
            print(f"HF export (full checkpoint) in {written}\nnext: use it as the model path of the next stage "
                  "or of `video-r2 evaluate`")

    def export(self, out_dir: str | Path) -> Path | None:
        """HF export of the current weights (collective under FSDP: every rank calls it)."""
        return vm.export_hf(self.model, self.processor, out_dir, rank=self.global_rank)
