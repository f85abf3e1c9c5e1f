"""What one GRPO step passes between its phases (shape legend in `video_r2.grpo`).

`Rollout` is what sampling returns and never changes afterwards; `ScoredRollout` is built once, from a
rollout and everything computed about it (rewards, advantages, old and reference log-probs), and is what
every policy update reads. `completion_mask` says which completion tokens count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rollout:
    """G sampled completions for each of a batch's prompts.

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
    # [N, L] float, detached: truncated importance weights min(pi_policy / pi_engine, cap) per sampled token,
    # when a rollout engine other than the policy sampled and the correction is on; None: weight 1
    importance_weights: Tensor | None = None

    @property
    def num_completions(self) -> int:  # N
        return self.completion_ids.shape[0]


@dataclass(frozen=True)
class ScoredRollout:
    """A rollout with what the loss needs about it, computed once per step and read by every update."""

    rollout: Rollout
    rewards: dict[str, Tensor]  # name -> [N] float, None-filled (combine_rewards)
    total_rewards: Tensor  # [N] float: weighted sum of `rewards`
    advantages: Tensor  # [N] float: group_advantages(total_rewards), on the policy's device
    old_logps: Tensor | None = None  # [N, L] float32: policy at rollout time; None when num_iterations == 1
    ref_logps: Tensor | None = None  # [N, L] float32: reference policy; None when beta == 0


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
