"""Qwen2.5-VL for training: loading, freezing, LoRA, parameter groups, FSDP wrap classes and the HF export.

This is the one file that knows transformers and peft internals; `stage.py`, `sft.py`, `grpo/` and `merge_lora.py`
call the functions below and never reach into the model's attribute names themselves.

Parameter names of Qwen2.5-VL in transformers 5 (peft adds `base_model.model.` in front, FSDP1 adds
`_fsdp_wrapped_module.` and activation checkpointing `_checkpoint_wrapped_module.` in between):

    model.visual.patch_embed / model.visual.blocks.N       the vision tower       (`freeze_vision_tower`)
    model.visual.merger                                    the vision->text merger (`freeze_merger`)
    model.language_model.{embed_tokens,layers.N,norm}      the language model      (`freeze_llm`)
    lm_head                                                 the output head         (`freeze_llm`)

The HF export of a run (`export_hf`) is a directory that both `merge_lora` and `from_pretrained` read:
    with LoRA:    adapter_config.json + adapter_model.safetensors (PEFT's own format),
                  non_lora_trainables.safetensors (base-model names; only if some base weight was trained),
                  processor files
    without LoRA: a full HF checkpoint (config.json, model*.safetensors, generation_config.json) + processor
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# LoRA targets: the language model's attention and MLP projections. The vision tower also has
# gate_proj/up_proj/down_proj, so the pattern must name the language model (a plain list would hit both).
# lm_head and embed_tokens never match.
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"

# Tokens that only the processor may place; one sampled into a completion breaks the next forward ("video
# features and video tokens do not match"), so generation never emits them (GRPO rollouts, the HF judge).
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

NON_LORA_FILE = "non_lora_trainables.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# Wrapper prefixes FSDP1 and activation checkpointing put into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class LoraConfigArgs:
    """LoRA / DoRA settings (the original `--lora_enable True` run; set `lora: null` to train without LoRA)."""

    r: int = 64  # rank (`--lora_rank`)
    alpha: int = 64  # scaling numerator; the update is scaled by alpha / r (`--lora_alpha`)
    dropout: float = 0.05  # dropout on the LoRA input (`--lora_dropout`)
    use_dora: bool = False  # weight-decomposed LoRA (`--use_dora`)
    target_modules: str = LANGUAGE_MODEL_TARGETS  # regex (full match) of the Linear layers to adapt
    lora_vision: bool = False  # also adapt the vision tower's attention and MLP (not the merger)


@dataclass
class ModelConfig:
    """Which checkpoint to load and what of it to train."""

    name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # hub id or local directory (`--model_id`)
    attn_implementation: str = "sdpa"  # "sdpa" | "flash_attention_2" (needs `pip install video-r2[gpu]`) | "eager"
    freeze_vision_tower: bool = True  # (`--freeze_vision_tower`)
    freeze_merger: bool = True  # (`--freeze_merger`)
    freeze_llm: bool = True  # the language model's own weights and lm_head (`--freeze_llm`)
    gradient_checkpointing: bool = False  # HF activation checkpointing (leave off when the strategy does it)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def load_processor(path: str | Path):
    """The Qwen2.5-VL processor (tokenizer, chat template, video processor) of a hub id or directory."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


def dtype_for_precision(precision: str | int | None) -> torch.dtype:
    """The dtype the weights are loaded in for a Lightning precision setting.

    "*-true" precisions keep the weights in that dtype; mixed precisions keep fp32 weights and let autocast
    (or FSDP's MixedPrecision) compute in half precision.
    """
    p = str(precision)
    if p.startswith("bf16-true"):
        return torch.bfloat16
    if p in ("16-true", "fp16-true"):
        return torch.float16
    return torch.float32


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, attn_implementation: str = "sdpa") -> nn.Module:
    """Load Qwen2.5-VL (`...ForConditionalGeneration`) from a hub id or a local directory."""
    from transformers import AutoModelForImageTextToText

    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed: "
            "pip install video-r2[gpu] (CUDA only), or use attn_implementation='sdpa'"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # The forward builds no KV cache unless asked (use_cache=None), so the config stays as saved.
    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)


def build_model(config: ModelConfig, lora: LoraConfigArgs | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """load -> LoRA -> freeze -> gradient checkpointing: the trainable model SFT and GRPO start from."""
    model = load_model(config.name_or_path, dtype=dtype, attn_implementation=config.attn_implementation)
    if lora is not None:
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, use_dora=lora.use_dora,
                           target_modules=lora.target_modules, lora_vision=lora.lora_vision)
    set_trainable(model, freeze_vision_tower=config.freeze_vision_tower, freeze_merger=config.freeze_merger,
                  freeze_llm=config.freeze_llm)
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: LoRA is off and the vision tower, merger and LLM are all frozen")
    return model


def weights_fingerprint(path: str | Path, blocks: int = 17, block_bytes: int = 4096) -> str | None:
    """A cheap fingerprint of a local checkpoint's weights, or None for a hub id / a directory without weights.

    Per weight file: its name, its size and `blocks` evenly spaced 4 KiB blocks (hashing every byte of a 7B
    model would take a minute at every start). Two models of the same architecture with other weights differ
    in nearly every block, so a resume onto a replaced base is caught; a change confined to bytes between the
    sampled blocks would not be.
    """
    directory = Path(path)
    files = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")]) if directory.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            for i in range(blocks):
                handle.seek(max(0, (size - block_bytes) * i // max(1, blocks - 1)))
                digest.update(handle.read(block_bytes))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# names and parts
# --------------------------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """A parameter name without FSDP1/checkpointing/compile wrapper parts."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def base_name(name: str) -> str:
    """The base model's own name of a (possibly peft-wrapped) parameter: `...q_proj.base_layer.weight` ->
    `...q_proj.weight`, without `base_model.model.` in front."""
    name = clean_name(name)
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def part_of(name: str) -> str:
    """"vision" | "merger" | "llm" for a parameter name (LoRA weights belong to the part they adapt)."""
    name = clean_name(name)
    if ".visual.merger." in f".{name}":
        return "merger"
    if ".visual." in f".{name}":
        return "vision"
    return "llm"


def is_lora_name(name: str) -> bool:
    return "lora_" in name  # lora_A, lora_B, lora_magnitude_vector (DoRA), lora_embedding_*


def _no_decay(name: str) -> bool:
    # By name, not by p.ndim: FSDP1 (use_orig_params) shows sharded parameters as flat 1-D views.
    name = clean_name(name)
    return name.endswith(".bias") or "norm" in name or "ln_q" in name or "lora_magnitude_vector" in name


# --------------------------------------------------------------------------------------------------
# LoRA, freezing, checkpointing
# --------------------------------------------------------------------------------------------------


def apply_lora(
    model: nn.Module,
    r: int = 64,
    alpha: int = 64,
    dropout: float = 0.05,
    use_dora: bool = False,
    target_modules: str | list[str] = LANGUAGE_MODEL_TARGETS,
    lora_vision: bool = False,
) -> nn.Module:
    """Wrap `model` in a PEFT LoRA (or DoRA) model; only the LoRA weights are trainable afterwards.

    `target_modules` is a regex matched against full module names (or a list of module-name suffixes, PEFT's
    other form). `lora_vision` adds the vision tower's attention and MLP projections.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules
    if lora_vision:
        if not isinstance(targets, str):
            raise ValueError("lora_vision needs target_modules as a regex string")
        targets = f"(?:{targets})|(?:{VISION_TARGETS})"
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype=False: adapters take the base weights' dtype, so that every FSDP unit holds one
    # dtype (FSDP1 flattens a unit into a single tensor); use a mixed precision to train in fp32.
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def set_trainable(model: nn.Module, freeze_vision_tower: bool = True, freeze_merger: bool = True,
                  freeze_llm: bool = True) -> None:
    """requires_grad per part; LoRA weights always train. Call after `apply_lora`."""
    frozen = {"vision": freeze_vision_tower, "merger": freeze_merger, "llm": freeze_llm}
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name) or not frozen[part_of(name)])


def freeze_vision_tower(model: nn.Module, frozen: bool = True) -> None:
    _set_part(model, "vision", not frozen)


def freeze_merger(model: nn.Module, frozen: bool = True) -> None:
    _set_part(model, "merger", not frozen)


def freeze_llm(model: nn.Module, frozen: bool = True) -> None:
    _set_part(model, "llm", not frozen)


def _set_part(model: nn.Module, part: str, trainable: bool) -> None:
    for name, p in model.named_parameters():
        if part_of(name) == part and not is_lora_name(name):
            p.requires_grad_(trainable)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """HF activation checkpointing (non-reentrant, so frozen embeddings need no input-grad hook)."""
    hf = model.get_base_model() if is_peft(model) else model
    if enabled:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model without its LoRA update, e.g. for GRPO's reference log-probs (no second copy)."""
    if not is_peft(model):
        raise ValueError("adapters_disabled needs a LoRA model; without LoRA keep a separate frozen reference")
    with model.disable_adapter():
        yield model


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    by_part: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "lora" if is_lora_name(name) else part_of(name)
            by_part[key] = by_part.get(key, 0) + p.numel()
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(by_part.items()))
    return f"trainable {sum(by_part.values()):,} of {total:,} parameters ({parts})"


# --------------------------------------------------------------------------------------------------
# optimizer groups
# --------------------------------------------------------------------------------------------------


def param_groups(
    model: nn.Module,
    lr: float,
    vision_lr: float | None = None,
    merger_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """AdamW groups: (llm | merger | vision) x (decay | no decay); only trainable parameters.

    `vision_lr` / `merger_lr` default to `lr`. Biases, norms and DoRA magnitudes get no weight decay. Each
    group carries a `name` (e.g. "llm", "vision_no_decay") for logging; empty groups are left out.
    """
    lrs = {"llm": lr, "merger": lr if merger_lr is None else merger_lr, "vision": lr if vision_lr is None else vision_lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), _no_decay(name)), []).append(p)
    out = []
    for part in ("llm", "merger", "vision"):
        for no_decay in (False, True):
            params = groups.get((part, no_decay))
            if params:
                out.append({
                    "params": params, "lr": lrs[part], "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": part + ("_no_decay" if no_decay else ""),
                })
    return out


# --------------------------------------------------------------------------------------------------
# FSDP
# --------------------------------------------------------------------------------------------------


def decoder_layer_classes() -> set[type[nn.Module]]:
    """The blocks FSDP wraps (and checkpoints) one by one: the text decoder layer and the vision block."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    return {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}


def fsdp_wrap_policy():
    """An FSDP1 auto-wrap policy over `decoder_layer_classes()` (Lightning's FSDPStrategy also takes the set)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(decoder_layer_classes())


def fully_shard_model(model: nn.Module, mesh, **kwargs) -> nn.Module:
    """FSDP2: shard each decoder layer / vision block, then the rest as the root unit.

    FSDP2 gathers a module's shards around `forward` only; `generate` and the vision encoders are called
    directly (GRPO's rollout), so they are registered too (else "mixed torch.Tensor and DTensor").
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    classes = tuple(decoder_layer_classes())
    for module in model.modules():
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    for method in ("generate", "get_video_features", "get_image_features"):
        register_fsdp_forward_method(model, method)
    return model


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict with clean names; collective under FSDP, so every rank must call it.

    Under FSDP1/FSDP2 only rank 0 receives tensors (the others get an empty dict).
    """
    if _is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(model, options=options)
    else:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad} if trainable_only else model.state_dict()
    out = {}
    for name, tensor in state.items():
        if hasattr(tensor, "full_tensor"):  # a DTensor that was not gathered (should not happen)
            tensor = tensor.full_tensor()
        out[clean_name(name)] = tensor.detach().to("cpu").contiguous()
    return out


class NonFiniteWeightsError(ValueError):
    """Weights that hold NaN or infinity: a diverged run. They are never exported or merged."""


def check_finite(state: dict, what: str) -> None:
    """Raise `NonFiniteWeightsError` naming the tensors of `state` that hold NaN or infinity."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(
            f"{what}: {len(bad)} tensors hold NaN/inf ({', '.join(bad[:5])}{more}); nothing was written. "
            "Training diverged: lower the learning rate and resume from an earlier checkpoint or train again."
        )


def export_hf(model: nn.Module, processor, out_dir: str | Path, rank: int = 0) -> Path | None:
    """Write the HF export of `model` (see the module docstring). Collective: call on every rank.

    Returns the directory on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if is_peft(model):
        state = gather_state_dict(model, trainable_only=True)
        if rank != 0:
            return None
        check_finite(state, f"HF export to {out_dir}")
        out_dir.mkdir(parents=True, exist_ok=True)
        # PEFT's own writer: adapter_config.json + adapter_model.safetensors, from the gathered tensors.
        model.save_pretrained(str(out_dir), state_dict=state)
        non_lora = {base_name(n): t for n, t in state.items() if not is_lora_name(n)}
        if non_lora:
            save_file(non_lora, str(out_dir / NON_LORA_FILE), metadata={"format": "pt"})
        elif (out_dir / NON_LORA_FILE).exists():
            (out_dir / NON_LORA_FILE).unlink()
    else:
        state = gather_state_dict(model, trainable_only=False)
        if rank != 0:
            return None
        check_finite(state, f"HF export to {out_dir}")
        from huggingface_hub import save_torch_state_dict

        out_dir.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(state, str(out_dir))  # model.safetensors (+ index when sharded)
        model.config.save_pretrained(str(out_dir))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(out_dir))
    if processor is not None:
        processor.save_pretrained(str(out_dir))
    return out_dir


def read_adapter_config(lora_dir: str | Path) -> dict:
    path = Path(lora_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{lora_dir} is not a PEFT adapter directory: no {ADAPTER_CONFIG_FILE}")
    return json.loads(path.read_text())
