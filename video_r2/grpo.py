"""GRPO for Video-R2: the math as pure functions at the top, the LightningModule below.

Which GRPO this is
------------------
Group Relative Policy Optimization as introduced in DeepSeekMath (Shao et al., 2024), in the form the
Video-R2 recipe trains with (upstream flags: ``num_generations``, ``beta``, ``max_completion_length``):

* **Rollout.** Each of the B prompts is sampled G = ``num_generations`` times at the sampling
  ``temperature``. A completion ends at its first EOS; every token after it is masked out
  (:func:`completion_mask`). With ``mask_truncated_completions`` a completion that never emitted EOS is
  masked out entirely, so it adds no gradient (DAPO's overlong filtering) while still counting in the
  group statistics.
* **Rewards.** The weighted sum of the reward functions (:func:`combine_rewards`). A reward that could not
  be computed for one sample (``None``) is replaced by that reward's mean over the valid members of the
  same group, so it moves no advantage; a group with no valid value leaves that reward out.
* **Advantages** (outcome supervision: one scalar per completion, broadcast over its tokens,
  :func:`group_advantages`): ``A_i = (R_i - mean_group(R)) / (std + 1e-4)`` with the *unbiased* std of the
  group (``scale_rewards="group"``, DeepSeekMath), of the whole batch (``"batch"``), or no division
  (``"none"``, as Dr. GRPO proposes, which removes the bias toward low-variance, too easy/too hard groups).
* **Loss per token** (:func:`grpo_loss`)::

      r_t   = exp(logp_t - logp_old_t)                                     # importance ratio
      l_t   = -min(r_t * A, clip(r_t, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL_t
      KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                   # k3 estimator, >= 0

  The KL is a penalty inside the loss (as in DeepSeekMath), not a reward shaping term. ``epsilon_low``
  and ``epsilon_high`` default to the symmetric PPO 0.2; a larger ``epsilon_high`` is DAPO's clip-higher.
* **Aggregation** (``loss_type``): ``"grpo"`` averages each sequence over its own tokens, then over the N
  sequences (DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``, also across prompts); ``"bnpo"`` averages over
  all unmasked tokens of the batch (DAPO's token-level mean); ``"dr_grpo"`` divides the token sum by the
  constant ``N * max_completion_length`` (Dr. GRPO), so neither length nor batch fill rescales a token.
* **mu = num_iterations** optimizer updates per rollout. With mu = 1 (the default, and DeepSeekMath's
  "single update following each exploration stage") ``old_logps`` is the detached current log-prob:
  the ratio is exactly 1, nothing is ever clipped, and the gradient is the plain policy gradient
  ``-A * grad logp`` plus the KL term. With mu > 1 the old log-probs are computed once, right after the
  rollout, and the ratio and clipping take effect from the second update on.
* **Reference.** The policy with its LoRA adapters disabled (no second copy) or, without LoRA, a frozen
  copy of the starting weights. It is fixed for the whole run; DeepSeekMath's iterative variant resets
  it to the policy periodically, this one does not. With ``beta == 0`` it is never evaluated.
* **Log-probs** (:func:`completion_logps`) are taken from ``logits / temperature``, i.e. from the
  distribution the completions were sampled from, for the policy, the old policy and the reference alike.

Departures from DeepSeekMath GRPO, in one list: the 1e-4 in the advantage denominator and the unbiased
std; the asymmetric clip option; the ``bnpo`` / ``dr_grpo`` aggregations and ``"batch"`` / ``"none"``
scaling (opt-in); a reference that is never reset; the ``None``-reward rule; optional masking of
truncated completions.

Shape legend
------------
  B  prompts in the (per-device) batch
  G  completions per prompt (``num_generations``); a prompt's G completions are adjacent rows
  N  = B * G, rows of every per-completion tensor
  P  prompt tokens (left-padded), L completion tokens (right-padded), T = P + L
  V  vocabulary size
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from video_r2 import model as vm
from video_r2.judge import JudgeClient
from video_r2.model import LoraConfigArgs, ModelConfig
from video_r2.rewards import RewardContext, compute_rewards, get_reward
from video_r2.training import (as_dataclass, build_optimizer, check_export_dir, export_final, plain_hparams,
                               save_trainable_checkpoint)

__all__ = [
    "Rollout",
    "group_advantages",
    "grpo_loss",
    "completion_logps",
    "combine_rewards",
    "completion_mask",
    "reward_stats",
    "completion_length_stats",
]

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo"]

ADVANTAGE_EPS = 1e-4  # added to the std so an (almost) all-equal group gives ~0 advantages, never NaN/inf


# ---- rollout container ---------------------------------------------------------------------------


@dataclass
class Rollout:
    """One step's rollout: everything the loss needs, produced once and read by every update.

    Row ``i`` of every ``[N, ...]`` tensor is completion ``i % G`` of prompt ``i // G``.
    """

    prompt_ids: Tensor  # [N, P] long: each prompt repeated G times, left-padded
    prompt_mask: Tensor  # [N, P] long: 1 on real prompt tokens
    completion_ids: Tensor  # [N, L] long: sampled tokens, right-padded after the first EOS
    completion_mask: Tensor  # [N, L] long: 1 up to and including the first EOS (see completion_mask)
    # The batch's own prompt tensors, per prompt (B rows, not repeated): input_ids, attention_mask,
    # mm_token_type_ids [B, P], pixel_values_videos [sum of the B videos' patches, C*t*p*p], video_grid_thw
    # [videos, 3], second_per_grid_ts [videos]. Read again only to re-encode the video when the vision
    # tower trains; otherwise the features encoded once at rollout time (PromptVisuals) serve every pass.
    prompt_inputs: dict[str, Tensor] = field(default_factory=dict)
    mm_token_type_ids: Tensor | None = None  # [N, P]: 0 text, 1 image, 2 video (the 3-D rope needs it)
    rewards: dict[str, Tensor] = field(default_factory=dict)  # name -> [N] float, None-filled (combine_rewards)
    total_rewards: Tensor | None = None  # [N] float: weighted sum of `rewards`
    advantages: Tensor | None = None  # [N] float: group_advantages(total_rewards)
    old_logps: Tensor | None = None  # [N, L] float32: policy at rollout time; None when num_iterations == 1
    ref_logps: Tensor | None = None  # [N, L] float32: reference policy; None when beta == 0

    @property
    def num_completions(self) -> int:  # N
        return self.completion_ids.shape[0]


# ---- advantages ----------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group") -> Tensor:
    """Group-relative advantages ``(R - group mean) / (std + 1e-4)``; ``[N] -> [N]``.

    ``std`` is the unbiased standard deviation of the group (``"group"``) or of the whole batch
    (``"batch"``); ``"none"`` only centres. A group whose rewards are all equal gets advantage 0.
    """
    G = num_generations
    if G < 2:
        raise ValueError(f"num_generations must be >= 2 (a group of 1 has no relative advantage), got {G}")
    if rewards.ndim != 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be [B*G] with G={G}, got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()  # [N]
    grouped = rewards.view(-1, G)  # [B, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # [N]
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand(-1, G).reshape(-1)  # [N], unbiased per group
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)  # [N], unbiased over all N
    elif scale_rewards == "none":
        return centred  # [N]
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred / (std + ADVANTAGE_EPS)  # [N]


# ---- loss ----------------------------------------------------------------------------------------


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio GRPO loss with a k3 KL penalty, aggregated per ``loss_type`` (module docstring).

    Args:
        logps: ``[N, L]`` log-probs of the completion tokens under the policy being trained (with grad).
        old_logps: ``[N, L]`` log-probs at rollout time, or None for ``logps.detach()`` (ratio 1).
        ref_logps: ``[N, L]`` reference log-probs; may be None only when ``beta == 0``.
        advantages: ``[N]``, one per completion.
        mask: ``[N, L]`` 1 on tokens that count (bool, int or float).
        max_completion_length: the constant of ``"dr_grpo"`` (required for it, ignored otherwise).

    Returns:
        ``(loss, metrics)``: a scalar loss, and 0-dim detached tensors ``clip_ratio/low_mean`` (fraction of
        tokens with ``r < 1 - epsilon_low`` and ``A < 0``, where the clip removes the gradient),
        ``clip_ratio/high_mean`` (``r > 1 + epsilon_high`` and ``A > 0``), ``clip_ratio/region_mean`` (either)
        and, when ``ref_logps`` is given, ``kl`` (the mean k3 KL over unmasked tokens).
    """
    if ref_logps is None and beta != 0:
        raise ValueError("ref_logps is required when beta != 0")
    if old_logps is None:
        old_logps = logps.detach()  # [N, L]: mu = 1, ratio is exactly 1
    keep = mask.bool()  # [N, L]
    maskf = keep.to(logps.dtype)  # [N, L]
    # Masked positions get log-ratio 0 so that garbage log-probs after EOS cannot overflow exp() and
    # send inf * 0 = NaN into the loss or the gradient.
    log_ratio = torch.where(keep, logps - old_logps, 0.0)  # [N, L]
    ratio = torch.exp(log_ratio)  # [N, L]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, L]
    A = advantages.to(logps.dtype).unsqueeze(1)  # [N, 1]
    per_token = -torch.min(ratio * A, clipped * A)  # [N, L]

    metrics: dict[str, Tensor] = {}
    if ref_logps is not None:
        delta = torch.where(keep, ref_logps - logps, 0.0)  # [N, L]: log(pi_ref / pi)
        kl = torch.exp(delta) - delta - 1  # [N, L]: k3, unbiased for KL(pi || pi_ref), >= 0
        if beta != 0:
            per_token = per_token + beta * kl  # [N, L]
        metrics["kl"] = _masked_mean(kl.detach(), maskf)  # []

    if loss_type == "grpo":
        per_seq = (per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1)  # [N]: mean over own tokens
        loss = per_seq.mean()  # []
    elif loss_type == "bnpo":
        loss = _masked_mean(per_token, maskf)  # []: mean over all tokens of the batch
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser)")
        loss = (per_token * maskf).sum() / (logps.shape[0] * max_completion_length)  # []
    else:
        raise ValueError(f"loss_type must be 'grpo', 'bnpo' or 'dr_grpo', got {loss_type!r}")

    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (A < 0)  # [N, L]: clip active on the low side
        high = (ratio > 1 + epsilon_high) & (A > 0)  # [N, L]: clip active on the high side
        metrics["clip_ratio/low_mean"] = _masked_mean(low.to(maskf.dtype), maskf)  # []
        metrics["clip_ratio/high_mean"] = _masked_mean(high.to(maskf.dtype), maskf)  # []
        metrics["clip_ratio/region_mean"] = _masked_mean((low | high).to(maskf.dtype), maskf)  # []
    return loss, metrics


def _masked_mean(x: Tensor, maskf: Tensor) -> Tensor:
    return (x * maskf).sum() / maskf.sum().clamp(min=1)  # []


# ---- log-probabilities ---------------------------------------------------------------------------


def completion_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1,
    **model_inputs: Tensor,
) -> Tensor:
    """Log-probs of the last ``logits_to_keep`` tokens of each row, ``[N, T] -> [N, L]`` (float32).

    The model computes logits for the last ``L + 1`` positions only (``logits_to_keep``), which predict
    the L completion tokens. The float32 log-softmax then runs ``chunk_size`` rows at a time as
    ``logit[token] - logsumexp(logits)``, so no full ``[N, L, V]`` float32 log-softmax is materialised
    (one row at Qwen's V = 152k and L = 1024 is ~0.6 GB in float32).

    ``model_inputs`` go to the forward unchanged: the vision inputs (repeated to N rows), and for
    Qwen2.5-VL ``mm_token_type_ids`` ``[N, T]``: without it the 3-D rope positions of the video tokens are
    wrong and the log-probs stop matching those of ``generate``.
    """
    L = logits_to_keep
    if L < 1 or chunk_size < 1:
        raise ValueError(f"logits_to_keep and chunk_size must be >= 1, got {L} and {chunk_size}")
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=L + 1, use_cache=False, **model_inputs
    )
    # Slicing again also covers a model that ignores logits_to_keep and returns all T positions.
    logits = out.logits[:, -(L + 1) : -1, :]  # [N, L, V]: position t predicts token t + 1
    targets = input_ids[:, -L:]  # [N, L]
    rows = []
    for start in range(0, logits.shape[0], chunk_size):
        lg = logits[start : start + chunk_size].float()  # [c, L, V]
        if temperature != 1.0:
            lg = lg / temperature  # [c, L, V]: the distribution the completions were sampled from
        tok = lg.gather(-1, targets[start : start + chunk_size].unsqueeze(-1)).squeeze(-1)  # [c, L]
        rows.append(tok - torch.logsumexp(lg, dim=-1))  # [c, L]
    return torch.cat(rows, dim=0)  # [N, L]


# ---- rewards -------------------------------------------------------------------------------------


def combine_rewards(
    rewards: Mapping[str, Sequence[float | None]],
    weights: Mapping[str, float] | Sequence[float],
    num_generations: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the reward functions, with the ``None`` rule; returns ``(total [N], filled)``.

    A ``None`` (the reward could not be computed for that sample) becomes that reward's mean over the
    valid members of its group, so it adds nothing to the group's advantages. If no member of a group
    has a valid value, the reward is left out of that group's total (adds 0 to every member, so again no
    advantage) and ``filled[name]`` is NaN there; :func:`reward_stats` counts such groups. Never a silent 0
    for a group that has valid values.

    ``weights``: by name, or a sequence in the order of ``rewards``. ``filled``: name -> ``[N]`` float32.
    """
    names = list(rewards)
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"reward weights {sorted(weights)} do not match rewards {sorted(names)}")
        w = {name: float(weights[name]) for name in names}
    else:
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} reward weights for {len(names)} rewards {names}")
        w = {name: float(x) for name, x in zip(names, weights)}
    G = num_generations
    sizes = {len(v) for v in rewards.values()}
    if len(sizes) != 1 or next(iter(sizes)) % G:
        raise ValueError(f"every reward needs the same B*G values (G={G}); got lengths {sorted(sizes)}")
    N = sizes.pop()

    total = torch.zeros(N)  # [N]
    filled: dict[str, Tensor] = {}
    for name in names:
        raw = torch.tensor([float("nan") if x is None else float(x) for x in rewards[name]])  # [N]
        grouped = raw.view(-1, G)  # [B, G]
        valid = ~torch.isnan(grouped)  # [B, G]
        count = valid.sum(1, keepdim=True)  # [B, 1]
        group_mean = torch.where(valid, grouped, 0.0).sum(1, keepdim=True) / count  # [B, 1]: NaN if count 0
        values = torch.where(valid, grouped, group_mean).reshape(-1)  # [N]: None -> valid-member mean
        filled[name] = values  # [N]
        total += w[name] * torch.nan_to_num(values, nan=0.0)  # [N]: fully-missing groups add 0
    return total, filled


# ---- masks ---------------------------------------------------------------------------------------


def _eos_positions(completion_ids: Tensor, eos_token_ids: int | Iterable[int] | Tensor) -> tuple[Tensor, Tensor]:
    """``(has_eos [N] bool, first [N] long)``; ``first`` is L for a row without EOS."""
    if isinstance(eos_token_ids, Tensor):
        eos = eos_token_ids.reshape(-1).to(completion_ids.device)  # [E]
    else:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        eos = torch.tensor(ids, dtype=torch.long, device=completion_ids.device)  # [E]
    is_eos = torch.isin(completion_ids, eos)  # [N, L]
    has_eos = is_eos.any(dim=1)  # [N]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1])  # [N]
    return has_eos, first


def completion_mask(
    completion_ids: Tensor, eos_token_ids: int | Iterable[int] | Tensor, mask_truncated: bool = False
) -> Tensor:
    """``[N, L]`` long mask: 1 up to and including the first EOS, 0 after it.

    A row with no EOS (truncated at ``max_completion_length``) is all 1, or all 0 with ``mask_truncated``.
    """
    has_eos, first = _eos_positions(completion_ids, eos_token_ids)  # [N], [N]
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # [L]
    mask = positions.unsqueeze(0) <= first.unsqueeze(1)  # [N, L]
    if mask_truncated:
        mask = mask & has_eos.unsqueeze(1)  # [N, L]
    return mask.long()  # [N, L]


# ---- logging helpers -----------------------------------------------------------------------------


def reward_stats(
    rewards: Mapping[str, Sequence[float | None]], total: Tensor, num_generations: int
) -> dict[str, float]:
    """Reward metrics for logging, as plain floats.

    Per reward (over its valid, non-None values): ``rewards/<name>/mean``, ``/std``, ``/none_frac`` and
    ``/missing_groups`` (groups left out by :func:`combine_rewards`). Of the total ``[N]``: ``reward/mean``,
    ``reward/std``, ``reward/group_std_mean`` (mean within-group std: the signal GRPO learns from) and
    ``reward/frac_groups_all_equal`` (groups with zero advantage, i.e. no learning signal).
    All stds are unbiased (0 where fewer than 2 values).
    """
    G = num_generations
    stats: dict[str, float] = {}
    for name, values in rewards.items():
        raw = torch.tensor([float("nan") if x is None else float(x) for x in values])  # [N]
        valid = raw[~torch.isnan(raw)]  # [n_valid]
        stats[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
        stats[f"rewards/{name}/std"] = _std(valid)
        stats[f"rewards/{name}/none_frac"] = torch.isnan(raw).float().mean().item()
        stats[f"rewards/{name}/missing_groups"] = float(torch.isnan(raw).view(-1, G).all(dim=1).sum())
    total = total.detach().float().cpu()  # [N]
    grouped = total.view(-1, G)  # [B, G]
    stats["reward/mean"] = total.mean().item()
    stats["reward/std"] = _std(total)
    stats["reward/group_std_mean"] = grouped.std(dim=1).mean().item()  # G >= 2, so defined
    stats["reward/frac_groups_all_equal"] = (grouped == grouped[:, :1]).all(dim=1).float().mean().item()
    return stats


def _std(x: Tensor) -> float:
    return x.std().item() if x.numel() >= 2 else 0.0


def completion_length_stats(completion_ids: Tensor, eos_token_ids: int | Iterable[int] | Tensor) -> dict[str, float]:
    """Completion lengths (tokens up to and including the first EOS; L if none) as plain floats:
    ``completions/mean_length``, ``/min_length``, ``/max_length`` and ``/truncated_frac`` (rows without EOS).
    Measured from the ids, so it is the same whether or not truncated completions are masked.
    """
    has_eos, first = _eos_positions(completion_ids, eos_token_ids)  # [N], [N]
    lengths = torch.where(has_eos, first + 1, completion_ids.shape[1]).float()  # [N]
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/truncated_frac": (~has_eos).float().mean().item(),
    }


# ---- GRPOModule below ----

# Tokens that may only come from the processor; one sampled into a completion breaks the next forward
# ("video features and video tokens do not match"), so generation never emits them.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# modality -> (pixel key, grid key, token type in mm_token_type_ids)
VISUALS = {"image": ("pixel_values", "image_grid_thw", 1), "video": ("pixel_values_videos", "video_grid_thw", 2)}


class NonFiniteStepError(RuntimeError):
    """Raised after `max_bad_steps` consecutive updates whose loss or gradients were not finite."""


# ---- vision features: encoded once per prompt, shared by the G completions -------------------------


def visuals_per_row(mm_token_type_ids: Tensor, token_type: int) -> list[int]:
    """How many images (1) or videos (2) each row holds: runs of that token type. ``[B, P] -> B ints``."""
    is_type = mm_token_type_ids == token_type  # [B, P]
    starts = is_type & ~torch.nn.functional.pad(is_type, (1, 0))[:, :-1]  # [B, P]: first token of each run
    return starts.sum(dim=1).tolist()


@dataclass
class PromptVisuals:
    """Per-prompt vision features and the grid inputs the 3-D rope needs, to be spread over N rows."""

    features: dict[str, list[list[Tensor]]]  # modality -> per prompt -> its visuals' [tokens, hidden] features
    grids: dict[str, list[Tensor]]  # modality -> per prompt -> [its visuals, 3]
    seconds: list[Tensor]  # per prompt -> [its videos] second_per_grid_ts

    def for_rows(self, rows: range, G: int) -> dict[str, Any]:
        """Model kwargs for completion rows `rows` (row i belongs to prompt i // G)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        prompts = [i // G for i in rows]
        kwargs: dict[str, Any] = {"mm_encoder_outputs": {}}
        for modality, per_prompt in self.features.items():
            pixel_key, grid_key, _ = VISUALS[modality]
            pooled = tuple(f for p in prompts for f in per_prompt[p])
            if not pooled:
                continue
            kwargs["mm_encoder_outputs"][modality] = BaseModelOutputWithPooling(pooler_output=pooled)
            kwargs[grid_key] = torch.cat([self.grids[modality][p] for p in prompts])  # [visuals, 3]
            if modality == "video":
                kwargs["second_per_grid_ts"] = torch.cat([self.seconds[p] for p in prompts])  # [videos]
        return kwargs


def encode_visuals(model: torch.nn.Module, prompt: Mapping[str, Tensor]) -> PromptVisuals:
    """Run the vision tower once over the batch's prompts (``[B]`` prompts, not ``[N]`` completions)."""
    B = prompt["input_ids"].shape[0]
    features: dict[str, list[list[Tensor]]] = {}
    grids: dict[str, list[Tensor]] = {}
    seconds: list[Tensor] = [torch.zeros(0)] * B
    for modality, (pixel_key, grid_key, token_type) in VISUALS.items():
        if prompt.get(pixel_key) is None:
            continue
        grid = prompt[grid_key]  # [visuals, 3]
        encode = model.get_video_features if modality == "video" else model.get_image_features
        pooled = list(encode(prompt[pixel_key], grid, return_dict=True).pooler_output)  # visuals x [tok, H]
        counts = visuals_per_row(prompt["mm_token_type_ids"], token_type)  # B ints
        bounds = [0, *accumulate(counts)]  # prompt b's visuals are pooled[bounds[b]:bounds[b + 1]]
        features[modality] = [pooled[bounds[b]:bounds[b + 1]] for b in range(B)]
        grids[modality] = [grid[bounds[b]:bounds[b + 1]] for b in range(B)]
        if modality == "video":
            sec = prompt["second_per_grid_ts"]  # [videos]
            seconds = [sec[bounds[b]:bounds[b + 1]] for b in range(B)]
    return PromptVisuals(features, grids, seconds)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt: Mapping[str, Tensor],
    num_generations: int,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    suppress_tokens: list[int],
    mask_truncated: bool = False,
    **generate_kwargs: Any,
) -> tuple[Rollout, PromptVisuals]:
    """G completions for each of the B prompts, the vision tower run once per prompt (not per completion).

    ``prompt``: the left-padded prompt tensors of a GRPO batch. ``generate_kwargs`` go to HF ``generate``
    (sampling settings, ``max_new_tokens``, ``synced_gpus``). Vision placeholder tokens are suppressed: one
    sampled into a completion would break every later forward. Tokens after the first EOS become padding.
    """
    G = num_generations
    visuals = encode_visuals(model, prompt)
    N = prompt["input_ids"].shape[0] * G
    prompt_ids = prompt["input_ids"].repeat_interleave(G, dim=0)  # [N, P]
    prompt_mask = prompt["attention_mask"].repeat_interleave(G, dim=0)  # [N, P]
    extra = visuals.for_rows(range(N), G)
    if "mm_token_type_ids" in prompt:  # transformers 5 drops the 3-D rope without it
        extra["mm_token_type_ids"] = prompt["mm_token_type_ids"].repeat_interleave(G, dim=0)  # [N, P]
    was_training = model.training
    model.eval()  # no dropout while sampling
    sequences = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, **extra, suppress_tokens=suppress_tokens,
        eos_token_id=eos_token_ids, pad_token_id=pad_token_id, use_cache=True, **generate_kwargs,
    )  # [N, P + L]
    model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]  # [N, L]
    up_to_eos = completion_mask(completion_ids, eos_token_ids)  # [N, L]
    completion_ids = completion_ids.masked_fill(up_to_eos == 0, pad_token_id)  # [N, L]
    mask = completion_mask(completion_ids, eos_token_ids, mask_truncated)  # [N, L]
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, mask, prompt_inputs=dict(prompt),
                      mm_token_type_ids=extra.get("mm_token_type_ids"))
    return rollout, visuals


def generation_token_ids(model: torch.nn.Module, tokenizer) -> tuple[list[int], int, list[int]]:
    """(EOS ids, pad id, suppressed vision-token ids) for ``sample_completions``."""
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []), tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    return eos_ids, pad, [i for i in ids if i is not None and i >= 0 and i != tokenizer.unk_token_id]


# ---- the module ------------------------------------------------------------------------------------


class StepTimer:
    """Wall time of each named phase of a step, for the `time/*` logs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start


class GRPOModule(LightningModule):
    """Stage 2: GRPO with accuracy, format and TAR rewards (the variant is described at the top of this file).

    Batches come from ``VideoDataModule(stage="grpo")``: left-padded prompt tensors plus ``samples``, the
    records' answers, questions and ``temporal_grounding`` the rewards read. Optimization is manual because
    one batch of prompts becomes ``num_iterations`` x mini-batches optimizer updates of its rollout.

    Args:
        backbone: the checkpoint to start from (the SFT-merged one) and which of its parts train.
        lora: LoRA settings; with LoRA the reference is the policy with its adapters off (no second copy).
        num_generations: G, completions sampled per prompt (`--num_generations`).
        max_completion_length: new tokens per completion at most (`--max_completion_length`).
        temperature: sampling temperature; log-probs are taken at the same temperature.
        top_p: nucleus sampling.
        top_k: top-k sampling (None: off).
        repetition_penalty: HF generate's repetition penalty (1.0: off).
        mask_truncated_completions: completions without EOS add no gradient.
        beta: KL coefficient (`--beta`); 0 skips the reference entirely.
        epsilon_low: lower clip of the ratio, 1 - epsilon_low.
        epsilon_high: upper clip of the ratio, 1 + epsilon_high.
        loss_type: "grpo" | "bnpo" | "dr_grpo" aggregation (module docstring).
        scale_rewards: "group" | "batch" | "none" advantage scaling.
        num_iterations: mu, optimizer updates per rollout.
        mini_batch_size: completions per update (None: all B*G of the device's rollout at once).
        reward_funcs: reward names from `video_r2.rewards.REWARDS`.
        reward_weights: one weight per reward (default all 1).
        judge: TAR's judge client; None reads OPENAI_API_BASE / SERVED_MODEL / OPENAI_API_KEY.
        buffer_seconds: TAR: both spans are widened by this much before the overlap test.
        similarity_threshold: TAR: least MiniLM cosine for a claim to match an event.
        lr: peak learning rate of the language model (LoRA weights included).
        vision_lr: of the vision tower (default lr).
        merger_lr: of the merger (default lr).
        weight_decay: AdamW weight decay (not on norms and biases).
        warmup_ratio: fraction of the steps warming up linearly.
        min_lr_ratio: the cosine ends at min_lr_ratio * lr.
        max_grad_norm: global gradient-norm clip (manual optimization clips here, not in the Trainer).
        max_bad_steps: this many non-finite updates in a row stop the run.
        log_completions_every: every this many steps, a TensorBoard text table of prompts, completions, rewards.
        logp_chunk_size: completions per log-softmax chunk (bounds the float32 [chunk, L, V] tensor).
        export_dir: where the final HF export goes (default `<log_dir>/hf/final`).
        export_on_checkpoint: also export to `<log_dir>/hf/step-N` at each checkpoint.
    """

    def __init__(
        self,
        backbone: ModelConfig,
        lora: LoraConfigArgs | None = None,
        num_generations: int = 8,
        max_completion_length: int = 1024,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        mask_truncated_completions: bool = False,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: LossType = "grpo",
        scale_rewards: ScaleRewards = "group",
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        reward_funcs: list[str] | None = None,
        reward_weights: list[float] | None = None,
        judge: JudgeClient | None = None,
        buffer_seconds: float = 2.0,
        similarity_threshold: float = 0.75,
        lr: float = 1e-6,
        vision_lr: float | None = None,
        merger_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        min_lr_ratio: float = 0.0,
        max_grad_norm: float = 1.0,
        max_bad_steps: int = 3,
        log_completions_every: int = 10,
        logp_chunk_size: int = 4,
        export_dir: str | None = None,
        export_on_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["judge"])
        plain_hparams(self)
        self.automatic_optimization = False  # mu updates per rollout, clipping and skipping happen here
        self.backbone = as_dataclass(ModelConfig, backbone)
        self.lora = as_dataclass(LoraConfigArgs, lora)
        self.reward_funcs = list(reward_funcs or ["accuracy", "format", "tar"])
        self.reward_weights = list(reward_weights or [1.0] * len(self.reward_funcs))
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for reward_funcs {self.reward_funcs}")
        for name in self.reward_funcs:
            get_reward(name)  # an unknown name fails now, listing the known ones, not after the first rollout
        if "tar" in self.reward_funcs and judge is None:
            judge = JudgeClient.from_env()  # the original recipe's environment variables
        self.reward_context = RewardContext(
            judge=judge, buffer_seconds=buffer_seconds, similarity_threshold=similarity_threshold
        )
        self.model: torch.nn.Module | None = None  # the policy
        self.ref_model: torch.nn.Module | None = None  # a frozen copy, only without LoRA and with beta != 0
        self.processor = None
        self.strict_loading = False  # checkpoints may leave out frozen weights (as in SFT)
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0

    # ---- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build policy (and reference) here, not in __init__, so FSDP can shard them as they are built."""
        check_export_dir(self)  # before anything is built: fail in seconds, not at the end of the run
        if self.model is not None:
            return
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        dtype = vm.dtype_for_precision(precision)
        model = vm.build_model(self.backbone, self.lora, dtype=dtype)
        if self.hparams.beta != 0 and not vm.is_peft(model):
            # Without adapters there is nothing to switch off: keep a frozen copy of the starting weights.
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            for m in filter(None, (model, self.ref_model)):
                vm.fully_shard_model(m, self.device_mesh["data_parallel"])
                _register_fsdp_methods(m)
        self.model = model.train()
        self.processor = vm.load_processor(self.backbone.name_or_path)
        self.eos_token_ids, self.pad_token_id, self.suppressed_tokens = generation_token_ids(
            self.model, self.processor.tokenizer
        )
        # The vision features can be shared by rollout, reference and update only if nothing in the
        # vision tower or merger trains (the recipe); otherwise the update re-encodes with gradients.
        self.vision_trains = any(p.requires_grad for n, p in model.named_parameters() if vm.part_of(n) != "llm")
        if self.global_rank == 0:
            rank_zero_info(f"{self.backbone.name_or_path}: {vm.trainable_summary(model)}")

    def configure_optimizers(self):
        h = self.hparams  # one scheduler step per rollout step, however many updates it makes
        return build_optimizer(self.model, self.trainer.estimated_stepping_batches, h.lr, h.vision_lr, h.merger_lr,
                               h.weight_decay, h.warmup_ratio, h.min_lr_ratio)

    def _sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    # ---- the training step -------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        G = self.hparams.num_generations
        timer = StepTimer()
        with timer("rollout"):  # 1. G completions per prompt, the video encoded once per prompt
            rollout, visuals, completions = self.rollout(batch)
        with timer("rewards"):  # 2. every reward; the judge calls of the whole step go out concurrently
            samples = [s for s in batch["samples"] for _ in range(G)]
            raw = compute_rewards(self.reward_funcs, completions, samples, self.reward_context)
            rollout.total_rewards, rollout.rewards = combine_rewards(raw, self.reward_weights, G)
        # 3. advantages, relative to the other completions of the same prompt
        rollout.advantages = group_advantages(rollout.total_rewards, G, self.hparams.scale_rewards).to(self.device)
        with timer("reference"):  # 4. old-policy and reference log-probs, without gradients
            self.score_old_and_reference(rollout, visuals)
        with timer("policy_update"):  # 5. mu clipped-ratio updates with the KL penalty
            update = self.policy_update(rollout, visuals, batch)
        # 6. logging
        self.log_step(rollout, raw, completions, batch, update, timer)

    def rollout(self, batch: dict) -> tuple[Rollout, PromptVisuals, list[str]]:
        """1. Sample G completions per prompt; returns the rollout, the prompts' visuals and the texts."""
        rollout, visuals = sample_completions(
            self.model,
            {k: v for k, v in batch.items() if isinstance(v, Tensor)},
            self.hparams.num_generations,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppressed_tokens,
            mask_truncated=self.hparams.mask_truncated_completions,
            synced_gpus=self._sharded() and self.trainer.world_size > 1,  # all ranks step together under FSDP
            do_sample=True,
            temperature=self.hparams.temperature,
            top_p=self.hparams.top_p,
            top_k=self.hparams.top_k,
            repetition_penalty=self.hparams.repetition_penalty,
            max_new_tokens=self.hparams.max_completion_length,
        )
        texts = self.processor.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return rollout, visuals, texts

    def sequence_logps(self, model, rollout: Rollout, rows: range, visuals: PromptVisuals) -> Tensor:
        """Log-probs ``[n, L]`` of the completion tokens of ``rows`` under ``model`` (policy or reference)."""
        sl = slice(rows.start, rows.stop)
        completion = rollout.completion_ids[sl]  # [n, L]
        ids = torch.cat([rollout.prompt_ids[sl], completion], dim=1)  # [n, T]
        # Every completion position is attended to: tokens after EOS are padding that only the mask hides.
        mask = torch.cat([rollout.prompt_mask[sl], torch.ones_like(completion)], dim=1)  # [n, T]
        kwargs = visuals.for_rows(rows, self.hparams.num_generations)
        if rollout.mm_token_type_ids is not None:
            types = rollout.mm_token_type_ids[sl]  # [n, P]
            kwargs["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, completion.shape[1]))  # [n, T]
        return completion_logps(
            model, ids, mask, completion.shape[1],
            temperature=self.hparams.temperature, chunk_size=self.hparams.logp_chunk_size, **kwargs,
        )

    @torch.no_grad()
    def score_old_and_reference(self, rollout: Rollout, visuals: PromptVisuals) -> None:
        """4. ``old_logps`` (only when mu > 1: with mu = 1 the ratio is 1 by construction) and ``ref_logps``."""
        everything = range(rollout.num_completions)
        if self.hparams.num_iterations > 1:
            rollout.old_logps = self.sequence_logps(self.model, rollout, everything, visuals)
        if self.hparams.beta == 0:
            return
        if self.ref_model is not None:
            ref_visuals = encode_visuals(self.ref_model, rollout.prompt_inputs) if self.vision_trains else visuals
            rollout.ref_logps = self.sequence_logps(self.ref_model, rollout, everything, ref_visuals)
        else:
            with vm.adapters_disabled(self.model) as reference:
                ref_visuals = encode_visuals(reference, rollout.prompt_inputs) if self.vision_trains else visuals
                rollout.ref_logps = self.sequence_logps(reference, rollout, everything, ref_visuals)

    def policy_update(self, rollout: Rollout, visuals: PromptVisuals, batch: dict) -> dict[str, float]:
        """5. ``num_iterations`` passes over the rollout in mini-batches: loss, backward, clip, step."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        N = rollout.num_completions
        size = self.hparams.mini_batch_size or N
        metrics: dict[str, list[float]] = defaultdict(list)
        for _ in range(self.hparams.num_iterations):
            for start in range(0, N, size):
                rows = range(start, min(start + size, N))
                sl = slice(rows.start, rows.stop)
                if self.vision_trains:  # the vision tower learns: its features need gradients
                    visuals = encode_visuals(self.model, rollout.prompt_inputs)
                logps = self.sequence_logps(self.model, rollout, rows, visuals)  # [n, L]
                loss, loss_metrics = grpo_loss(
                    logps,
                    None if rollout.old_logps is None else rollout.old_logps[sl],
                    None if rollout.ref_logps is None else rollout.ref_logps[sl],
                    rollout.advantages[sl],
                    rollout.completion_mask[sl],
                    epsilon_low=self.hparams.epsilon_low,
                    epsilon_high=self.hparams.epsilon_high,
                    beta=self.hparams.beta,
                    loss_type=self.hparams.loss_type,
                    max_completion_length=self.hparams.max_completion_length,
                )
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                grad_norm = self.clip_and_measure_gradients()
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    self.skip_bad_update(loss, grad_norm, batch)
                    metrics["bad_updates"].append(1.0)
                    continue
                self.bad_steps_in_a_row = 0
                optimizer.step()
                metrics["loss"].append(loss.item())
                metrics["grad_norm"].append(grad_norm.item())
                for key, value in loss_metrics.items():
                    metrics[key].append(float(value))
        metrics["lr"].append(optimizer.param_groups[0]["lr"])  # the rate these updates used
        scheduler.step()
        return {key: sum(values) / len(values) for key, values in metrics.items()}

    def clip_and_measure_gradients(self) -> Tensor:
        """Clip the global gradient norm to ``max_grad_norm``; returns the norm before clipping."""
        from lightning.pytorch.strategies import FSDPStrategy

        max_norm = self.hparams.max_grad_norm or float("inf")
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            return self.trainer.strategy.model.clip_grad_norm_(max_norm)  # FSDP1 reduces across shards
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor

    def skip_bad_update(self, loss: Tensor, grad_norm: Tensor, batch: dict) -> None:
        """A non-finite loss or gradient: drop this update, count it, and stop after too many in a row."""
        self.bad_steps_in_a_row += 1
        self.bad_steps_total += 1
        ids = [s.get("id") for s in batch.get("samples", [])]
        rank_zero_warn(
            f"step {self.global_step}: skipped an update with loss {loss.item()} and grad norm {grad_norm.item()} "
            f"(prompts {ids}); {self.bad_steps_in_a_row} in a row, {self.bad_steps_total} in total"
        )
        if self.bad_steps_in_a_row >= self.hparams.max_bad_steps:
            raise NonFiniteStepError(
                f"{self.bad_steps_in_a_row} updates in a row had a non-finite loss or gradient (last prompts: {ids}). "
                "Lower lr, check the precision (bf16-true with a tiny lr can underflow), or resume from the last "
                "good checkpoint with --ckpt_path."
            )

    # ---- logging -----------------------------------------------------------------------------------

    def log_step(self, rollout: Rollout, raw: dict, completions: list[str], batch: dict,
                 update: dict[str, float], timer: StepTimer) -> None:
        G = self.hparams.num_generations
        metrics: dict[str, float] = {}
        metrics.update(reward_stats(raw, rollout.total_rewards, G))
        metrics.update(completion_length_stats(rollout.completion_ids, self.eos_token_ids))
        metrics.update(update)
        metrics.update({k: float(v) for k, v in self.reward_context.metrics().items()})
        metrics.update({f"time/{phase}_s": s for phase, s in timer.seconds.items()})
        metrics["bad_updates_total"] = float(self.bad_steps_total)
        batch_size = len(batch["samples"])
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)},
                      on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/reward", metrics["reward/mean"], prog_bar=True, on_step=True, batch_size=batch_size)
        every = self.hparams.log_completions_every
        if every and self.global_step % every == 0:
            self.log_completions(completions, batch, rollout)

    def log_completions(self, completions: list[str], batch: dict, rollout: Rollout) -> None:
        """A TensorBoard text table: prompt, completion and each reward, one row per completion."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        G = self.hparams.num_generations
        names = list(rollout.rewards)
        header = "| prompt | completion | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2) + "\n"
        lines = []
        for i, text in enumerate(completions):
            question = str(batch["samples"][i // G].get("question", ""))[:120]
            values = " | ".join(f"{float(rollout.rewards[n][i]):.2f}" for n in names)
            lines.append(f"| {_cell(question)} | {_cell(text)} | {values} |")
        experiment.add_text("completions", header + "\n".join(lines), self.global_step)

    # ---- checkpoints and the HF export (shared with SFT) ----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_trainable_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        export_final(self)

    def export(self, out_dir) -> Any:
        return vm.export_hf(self.model, self.processor, out_dir, rank=self.global_rank)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _register_fsdp_methods(model: torch.nn.Module) -> None:
    """FSDP2 gathers a module's shards around `forward` only; generate and the vision encoders are called
    directly, so they must be registered too (else "mixed torch.Tensor and DTensor")."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ("generate", "get_video_features", "get_image_features"):
        register_fsdp_forward_method(model, method)
