"""What both training stages share: the learning-rate schedule, lean checkpoints and the HF export.

`SFTModule` and `GRPOModule` each hold their model as `self.model` and their processor as
`self.processor`; the functions below work on either.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from video_r2 import model as vm


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, total_steps: int, lr: float, vision_lr: float | None = None, merger_lr: float | None = None,
                    weight_decay: float = 0.0, warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> dict:
    """AdamW over `vm.param_groups` with linear warmup then cosine, stepped once per optimizer step.

    Returns Lightning's `configure_optimizers` dict.
    """
    groups = vm.param_groups(model, lr=lr, vision_lr=vision_lr, merger_lr=merger_lr, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    total = max(1, int(total_steps))
    schedule = partial(warmup_cosine, warmup_steps=math.ceil(warmup_ratio * total), total_steps=total,
                       min_lr_ratio=min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def as_dataclass(cls, value):
    """`value` as a `cls` instance: LightningCLI gives dataclasses, a checkpoint's hyper_parameters dicts."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def plain_hparams(module) -> None:
    """Turn dataclass hyperparameters into dicts: checkpoints are loaded with weights_only=True."""
    for key, value in list(module.hparams.items()):
        if dataclasses.is_dataclass(value):
            module.hparams[key] = dataclasses.asdict(value)


def _checkpoint_keeps_everything(module) -> bool:
    """Sharded (distributed) checkpoints are loaded key by key against the whole model: keep all keys."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = module.trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        return True
    return isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded"


def save_trainable_checkpoint(module, checkpoint: dict[str, Any]) -> None:
    """`on_save_checkpoint`: keep only trained weights (the frozen base is reloaded from its checkpoint on
    resume), and write the HF export of this step next to the logs."""
    if not _checkpoint_keeps_everything(module):
        trainable = {"model." + vm.clean_name(n) for n, p in module.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if vm.clean_name(k) in trainable}
    if module.hparams.get("export_on_checkpoint", True):
        module.export(Path(module.trainer.log_dir or ".") / "hf" / f"step-{module.global_step}")


def check_export_dir(module) -> None:
    """Refuse an `export_dir` that is, contains or lies inside the starting model's directory: the export
    would overwrite the weights a resume reloads the frozen parts and the reference from."""
    from video_r2.merge_lora import refuse_overlap

    if module.hparams.get("export_dir"):
        refuse_overlap(Path(module.hparams["export_dir"]), {"backbone (and reference)": Path(module.backbone.name_or_path)},
                       flag="--model.init_args.export_dir")


def export_final(module) -> Path | None:
    """`on_train_end`: the HF export of the final weights, and what to do with it next."""
    check_export_dir(module)
    out = module.hparams.get("export_dir") or Path(module.trainer.log_dir or ".") / "hf" / "final"
    written = module.export(out)
    if written is not None:
        base = module.backbone.name_or_path
        if vm.is_peft(module.model):
            print(f"HF export (adapter) in {written}\nnext: video-r2 merge-lora --base_model {base} "
                  f"--lora_model {written} --output_dir {written}-merged")
        else:
            print(f"HF export (full checkpoint) in {written}\nnext: use it as the model path of the next stage "
                  "or of `video-r2 evaluate`")
    return written
