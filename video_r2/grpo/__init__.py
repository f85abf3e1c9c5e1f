"""GRPO for Video-R2, in one package: `types` (what a step passes on), `rollout` (sampling), `loss` (the math
as pure functions), `groups` (groups that span ranks), `stats` (what is logged), `module` (`GRPOModule`).

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
     (with ``ranks_per_group`` k > 1 a rank holds g = G / k of them: see `video_r2.grpo.groups`)
  N  = B * G (B * g per rank), rows of every per-completion tensor
  P  prompt tokens (left-padded), L completion tokens (right-padded), T = P + L
  V  vocabulary size
"""
from video_r2.grpo.config import LossArgs, RewardArgs, RolloutArgs
from video_r2.grpo.loss import combine_rewards, completion_logps, group_advantages, grpo_loss
from video_r2.grpo.module import GRPOModule
from video_r2.grpo.rollout import sample_completions
from video_r2.grpo.stats import completion_length_stats, reward_stats
from video_r2.grpo.types import Rollout, ScoredRollout, completion_mask
from video_r2.stage import NonFiniteStepError

__all__ = [
    "GRPOModule", "RolloutArgs", "LossArgs", "RewardArgs", "NonFiniteStepError",
    "Rollout", "ScoredRollout", "completion_mask",
    "group_advantages", "grpo_loss", "completion_logps", "combine_rewards",
    "sample_completions", "reward_stats", "completion_length_stats",
]
