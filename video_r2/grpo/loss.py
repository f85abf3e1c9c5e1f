"""The GRPO math as pure functions: rewards -> advantages -> loss (the variant is described in `video_r2.grpo`).

Nothing here knows Lightning or a process group; `completion_logps` is the one function that runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo"]

ADVANTAGE_EPS = 1e-4  # added to the std so an (almost) all-equal group gives ~0 advantages, never NaN/inf


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
    bnpo_normalizer: Tensor | float | None = None,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-ratio GRPO loss with a k3 KL penalty, aggregated per ``loss_type`` (module docstring).

    Args:
        logps: ``[N, L]`` log-probs of the completion tokens under the policy being trained (with grad).
        old_logps: ``[N, L]`` log-probs at rollout time, or None for ``logps.detach()`` (ratio 1).
        ref_logps: ``[N, L]`` reference log-probs; may be None only when ``beta == 0``.
        advantages: ``[N]``, one per completion.
        mask: ``[N, L]`` 1 on tokens that count (bool, int or float).
        max_completion_length: the constant of ``"dr_grpo"`` (required for it, ignored otherwise).
        bnpo_normalizer: what ``"bnpo"`` divides the token sum by; None: this batch's unmasked tokens. Groups
            spanning ranks pass the group's mean per rank, so the ranks' averaged gradient is the group's.
        importance_weights: ``[N, L]`` detached weights of each token's policy-gradient term (not of the KL
            penalty), as TRL's truncated importance sampling applies them; None: 1.

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
    if importance_weights is not None:  # the sampler was not the policy: reweight what it sampled
        per_token = per_token * importance_weights.to(per_token.dtype)  # [N, L]

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
        if bnpo_normalizer is None:
            loss = _masked_mean(per_token, maskf)  # []: mean over all tokens of the batch
        else:
            loss = (per_token * maskf).sum() / torch.as_tensor(bnpo_normalizer).to(per_token).clamp(min=1)  # []
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
