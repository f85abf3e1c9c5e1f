"""The policy's weights as HF-named chunks, one layer at a time: what a rollout engine is sent after each step.

`hf_weights` walks the policy and yields ``[(HF name, tensor), ...]`` per decoder layer / vision block (other
tensors in groups of at most `_CHUNK_TENSORS`), with LoRA layers merged on the fly (``W + scale * B @ A``;
DoRA's magnitude applied) so that the engine, which knows nothing of adapters, gets plain weights and the
policy is never modified. Under sharding no rank ever holds the whole model:

* FSDP2 (`ModelParallelStrategy`): each parameter is a DTensor, all-gathered when its chunk is built;
* FSDP1 (`FSDPStrategy`, wrapping per decoder layer): each FSDP unit is unsharded on its own
  (``summon_full_params(unit, recurse=False)``) while its parameters are read, then resharded.

Both gathers are collectives: every rank must iterate the same chunks in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor

from video_r2.model import base_name, is_lora_name

# Parameters per chunk when nothing marks a layer boundary (the embeddings, the vision tower's patch embed).
_CHUNK_TENSORS = 64
# Path components FSDP1 and activation checkpointing insert; the HF names have neither.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def hf_weights(model: torch.nn.Module, trainable_only: bool,
               fsdp_root: torch.nn.Module | None = None) -> Iterator[list[tuple[str, Tensor]]]:
    """The model's weights as ``(HF name, tensor)`` chunks, one decoder layer / vision block per chunk.

    ``trainable_only`` keeps the tensors that can change during training: trainable ones and the base
    weights of layers whose adapters train. ``fsdp_root``: under FSDP1, the root FSDP unit that wraps
    ``model`` from above (Lightning's wrapped LightningModule), which owns the parameters no nested unit
    holds (embeddings, final norm, LM head); None when ``model`` is the root or FSDP1 is not in use.
    """
    if _fsdp1_units(model) or _is_fsdp1(model) or fsdp_root is not None:
        yield from _fsdp1_chunks(model, fsdp_root, trainable_only)
        return
    modules = dict(model.named_modules())
    yield from _chunks(model.named_parameters(), modules, trainable_only, gather=_full)


def _chunks(named: Iterable[tuple[str, Tensor]], modules: dict[str, torch.nn.Module], trainable_only: bool,
            gather) -> Iterator[list[tuple[str, Tensor]]]:
    """Chunks of ``named`` (clean module paths), each tensor made whole by ``gather`` and LoRA-merged."""
    chunk: list[tuple[str, Tensor]] = []
    unit = None
    for name, param in named:
        if is_lora_name(name):
            continue
        owner_name = name.rsplit(".", 1)[0]
        lora_owner = None
        if owner_name.endswith(".base_layer"):
            lora_owner = modules.get(owner_name.removesuffix(".base_layer"))
        if trainable_only:  # a LoRA layer's merged weight changes when its adapters train; its bias does not
            adapters_train = lora_owner is not None and name.endswith(".weight") and any(
                p.requires_grad for n, p in lora_owner.named_parameters() if is_lora_name(n))
            if not (param.requires_grad or adapters_train):
                continue
        hf_name = base_name(name)
        layer = _layer_of(hf_name)
        if chunk and (layer != unit or len(chunk) >= _CHUNK_TENSORS):
            yield chunk
            chunk = []
        unit = layer
        tensor = gather(param.detach())
        if lora_owner is not None and name.endswith(".weight"):
            tensor = _merged_lora_weight(lora_owner, tensor, gather)
        chunk.append((hf_name, tensor.contiguous()))
    if chunk:
        yield chunk


def _full(tensor: Tensor) -> Tensor:
    """A parameter as one whole tensor: an FSDP2 DTensor is all-gathered (collective), others pass."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _layer_of(name: str) -> str:
    """The unit a parameter is pushed with: ``...layers.N`` / ``...blocks.N``, else its module path."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1])


def _merged_lora_weight(module: torch.nn.Module, base: Tensor, gather=_full) -> Tensor:
    """``W + scale * B @ A`` for a peft LoRA Linear (DoRA: then scaled by magnitude / row norm)."""
    weight = base.float()
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        A = gather(module.lora_A[adapter].weight).float()  # [r, in]
        B = gather(module.lora_B[adapter].weight).float()  # [out, r]
        delta = (B @ A) * module.scaling[adapter]  # [out, in]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is not None and adapter in magnitudes:  # DoRA
            magnitude = gather(magnitudes[adapter].weight).float()  # [out]
            merged = weight + delta
            weight = merged * (magnitude / merged.norm(p=2, dim=1)).unsqueeze(1)
        else:
            weight = weight + delta
    return weight.to(base.dtype)


# ---- FSDP1: one unit unsharded at a time ---------------------------------------------------------------


def _is_fsdp1(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _fsdp1_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if m is not model and _is_fsdp1(m)]


def _clean(path: str) -> str:
    return ".".join(p for p in path.split(".") if p not in _WRAPPER_PARTS)


def _own_parameters(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """``module``'s parameters that no nested FSDP unit holds, with clean paths (wrappers removed)."""
    for name, param in module.named_parameters(recurse=False):
        yield _clean(prefix + name), param
    for name, child in module.named_children():
        if not _is_fsdp1(child):
            yield from _own_parameters(child, f"{prefix}{name}.")


def _fsdp1_chunks(model: torch.nn.Module, root: torch.nn.Module | None,
                  trainable_only: bool) -> Iterator[list[tuple[str, Tensor]]]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # (unit to unshard, where its own parameters start, that place's path in `model`)
    units: list[tuple[torch.nn.Module | None, torch.nn.Module, str]] = []
    if _is_fsdp1(model):
        units.append((model, model, ""))
    else:
        units.append((root, model, ""))  # the parameters above every nested unit belong to the root
    units += [(m, m, name + ".") for name, m in model.named_modules() if m is not model and _is_fsdp1(m)]
    modules = {_clean(name): m for name, m in model.named_modules()}
    for unit, top, prefix in units:
        # The unit's own parameters only (read inside the context: they are full views there); the nested
        # units stay sharded until their turn.
        with FSDP.summon_full_params(unit, recurse=False, writeback=False) if unit is not None else nullcontext():
            named = list(_own_parameters(top, prefix))
            for chunk in _chunks(named, modules, trainable_only, gather=lambda t: t):
                yield [(name, tensor.clone()) for name, tensor in chunk]  # a copy: the full view is freed on exit


__all__ = ["hf_weights"]
