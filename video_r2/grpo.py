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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Rollout",
    "group_advantages",
    "grpo_loss",
    "completion_logps",
    "combine_rewards",
    "completion_mask",
    "repeat_prompt_inputs",
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
    # Extra model inputs of the prompts, per prompt (not yet repeated G times), e.g.
    # pixel_values_videos [sum of the B videos' patches, C*t*p*p], video_grid_thw [B, 3],
    # second_per_grid_ts [B], mm_token_type_ids [B, P]. repeat_prompt_inputs(...) expands them to N rows;
    # a token-aligned one (mm_token_type_ids) must also be padded with zeros over the L completion tokens.
    vision_inputs: dict[str, Tensor] = field(default_factory=dict)
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


def repeat_prompt_inputs(inputs: Mapping[str, Tensor], num_generations: int) -> dict[str, Tensor]:
    """Repeat each prompt's model inputs G times (adjacent), ``B`` rows -> ``N`` rows.

    Row-aligned tensors (``[B, ...]``: ids, masks, ``mm_token_type_ids``) repeat their rows. The packed
    vision tensors repeat each prompt's block of patches, which needs exactly one video (and/or one image)
    per prompt: ``pixel_values_videos [sum patches, D]`` with ``video_grid_thw [B, 3]`` and
    ``second_per_grid_ts [B]``; likewise ``pixel_values`` with ``image_grid_thw``.
    """
    G = num_generations
    packed = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}
    rows = next((v.shape[0] for k, v in inputs.items() if k in ("input_ids", "attention_mask")), None)
    out: dict[str, Tensor] = {}
    for key, value in inputs.items():
        if key in packed:
            grid = inputs[packed[key]]  # [B, 3]: (t, h, w) patches of each prompt's one video/image
            if rows is not None and grid.shape[0] != rows:
                raise ValueError(f"{key}: expected one visual per prompt ({rows}), got {grid.shape[0]}")
            blocks = value.split(grid.prod(dim=-1).tolist(), dim=0)  # B x [patches_b, D]
            out[key] = torch.cat([b for b in blocks for _ in range(G)], dim=0)  # [G * sum patches, D]
        else:
            out[key] = value.repeat_interleave(G, dim=0)  # [N, ...]
    return out


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
