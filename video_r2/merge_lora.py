"""`video-r2 merge-lora`: fold a LoRA adapter into its base model and save a standalone HF checkpoint.

The adapter may be our SFT export (adapter + `non_lora_trainables.safetensors` + processor) or any
standard PEFT LoRA/DoRA adapter directory. Weights are read with safetensors (or `torch.load(weights_only=True)`
for an old `adapter_model.bin`); nothing is unpickled. Merging runs in float32; the result is saved in `dtype`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from video_r2.model import NonFiniteWeightsError  # noqa: F401  (raised here; importable from this command)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model."""


def merge_lora(
    base_model: str,
    lora_model: str,
    output_dir: str,
    overwrite: bool = False,
    dtype: str = "auto",
) -> Path:
    """Fold a LoRA adapter (and any trained non-LoRA weights) into its base model; save a standalone checkpoint.

    Args:
        base_model: hub id or directory of the model the adapter was trained on.
        lora_model: adapter directory: an SFT export (`<log_dir>/hf/final`) or any PEFT LoRA adapter.
        output_dir: where the merged checkpoint (safetensors, config, processor) is written.
        overwrite: replace the contents of a non-empty output_dir.
        dtype: dtype of the saved weights: auto (the base checkpoint's), float32, bfloat16 or float16.
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor

    from video_r2 import model as vm

    lora_dir, out = Path(lora_model), Path(output_dir)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    refuse_overlap(out, {"adapter": lora_dir, "base model": Path(base_model)})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"output_dir {out} is not empty; pass --overwrite true to replace its contents")
    adapter_cfg = vm.read_adapter_config(lora_dir)
    if adapter_cfg.get("peft_type") != "LORA":
        raise AdapterMismatchError(f"{lora_dir} holds a {adapter_cfg.get('peft_type')} adapter; only LoRA/DoRA merge")

    save_dtype = _DTYPES.get(dtype) or _config_dtype(AutoConfig.from_pretrained(base_model))
    print(f"[1/4] loading base model {base_model} (float32 for the merge)")
    base = vm.load_model(base_model, dtype=torch.float32)

    non_lora_path = lora_dir / vm.NON_LORA_FILE
    if non_lora_path.is_file():
        print(f"[2/4] loading trained non-LoRA weights from {non_lora_path.name}")
        _load_non_lora(base, load_file(str(non_lora_path)), non_lora_path)
    else:
        print("[2/4] no non-LoRA weights in the adapter directory (only the adapter was trained)")

    print(f"[3/4] applying adapter {lora_dir} (r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('lora_alpha')})")
    config = PeftConfig.from_pretrained(str(lora_dir))
    config.inference_mode = True
    try:
        peft_model = PeftModel(base, config)
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise AdapterMismatchError(f"adapter {lora_dir} does not fit base {base_model}: {e}") from e
    weights = load_peft_weights(str(lora_dir), device="cpu")
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as e:  # size mismatch for ...lora_A.weight: copying a param with shape ...
        raise AdapterMismatchError(
            f"adapter {lora_dir} does not fit base {base_model} (shape mismatch): {_size_mismatches(str(e))}"
        ) from e
    missing = [k for k in result.missing_keys if vm.is_lora_name(k)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        lines = []
        if unexpected:
            lines.append(f"adapter weights for modules the base does not have: {_preview(unexpected)}")
        if missing:
            lines.append(f"modules the adapter config targets but has no weights for: {_preview(missing)}")
        raise AdapterMismatchError(f"adapter {lora_dir} does not fit base {base_model}:\n  " + "\n  ".join(lines))
    merged = peft_model.merge_and_unload()
    vm.check_finite(merged.state_dict(), f"merging {lora_dir} into {base_model}")

    print(f"[4/4] saving the merged model ({str(save_dtype).removeprefix('torch.')}) to {out}")
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    merged.to(save_dtype).save_pretrained(str(out))
    processor_source = lora_dir if _has_processor(lora_dir) else base_model
    AutoProcessor.from_pretrained(str(processor_source)).save_pretrained(str(out))
    print(f"merged checkpoint in {out} (processor from {processor_source})")
    print(f"next: use {out} as the model path of stage 2 (configs/grpo.yaml) or of `video-r2 evaluate`")
    return out


def refuse_overlap(out: Path, inputs: dict[str, Path], flag: str = "--output_dir") -> None:
    """Refuse an output directory that is, contains or lies inside an input: --overwrite would delete it.

    Only local inputs count; a hub id that is not a directory here cannot be overwritten.
    """
    target = out.resolve()
    for role, path in inputs.items():
        if not path.exists():
            continue
        source = path.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ValueError(
                f"{flag.lstrip('-')} {out} overlaps the {role} directory {path} (it is, contains or lies inside "
                f"it); writing there would destroy an input, even with --overwrite. Choose a separate {flag}."
            )


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_non_lora(base: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    own = base.state_dict()
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise AdapterMismatchError(f"{path} has weights the base model does not have: {_preview(unknown)}")
    wrong = [f"{k}: {tuple(t.shape)} vs base {tuple(own[k].shape)}" for k, t in tensors.items()
             if tuple(t.shape) != tuple(own[k].shape)]
    if wrong:
        raise AdapterMismatchError(f"{path} does not fit the base model (shape mismatch): {_preview(wrong)}")
    base.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()}, strict=False)


def _size_mismatches(message: str) -> str:
    """`name: adapter (4, 32) vs base (4, 64)` for each of torch's "size mismatch for ..." lines."""
    found = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                       r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)", message)
    if not found:
        return message
    return _preview([f"{name.replace('.default.', '.')}: adapter ({a}) vs base ({b})" for name, a, b in found])


def _has_processor(path: Path) -> bool:
    return any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"))


def _preview(items: list[str], n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
