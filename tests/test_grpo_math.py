"""The GRPO math of video_r2/grpo.py against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from video_r2.grpo import (
    combine_rewards,
    completion_length_stats,
    completion_logps,
    completion_mask,
    group_advantages,
    grpo_loss,
    reward_stats,
)

E = math.e


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ---- group_advantages ----------------------------------------------------------------------------

# Two groups of G=3: [1, 1, 0] (a tie) and [2, 2, 2] (all equal).
# Group 0: mean 2/3, deviations [1/3, 1/3, -2/3], unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3.
# Batch: mean 4/3, squared deviations 1/9, 1/9, 16/9, 4/9, 4/9, 4/9 = 30/9, unbiased var 30/9/5 = 2/3.
REWARDS = torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0, 2.0])


def test_group_scaling_with_ties_and_an_all_equal_group():
    s = math.sqrt(1 / 3) + 1e-4
    close(group_advantages(REWARDS, 3), [1 / 3 / s, 1 / 3 / s, -2 / 3 / s, 0, 0, 0])


def test_all_equal_rewards_give_zero_not_nan():
    adv = group_advantages(torch.tensor([5.0, 5.0, 5.0, 5.0]), 4)
    assert torch.equal(adv, torch.zeros(4))


def test_batch_scaling_centres_per_group_divides_by_batch_std():
    s = math.sqrt(2 / 3) + 1e-4
    close(group_advantages(REWARDS, 3, "batch"), [1 / 3 / s, 1 / 3 / s, -2 / 3 / s, 0, 0, 0])


def test_none_scaling_only_centres():
    close(group_advantages(REWARDS, 3, "none"), [1 / 3, 1 / 3, -2 / 3, 0, 0, 0])


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4)  # 6 is not a multiple of 4
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 1)
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3, "mean")


# ---- grpo_loss: clipping -------------------------------------------------------------------------

# Ratios [1.5, 0.5, 1.1] in both rows; row 0 has A = +1, row 1 has A = -1; epsilon 0.2 -> clip to [0.8, 1.2].
# per token -min(rA, clip(r)A) and d/dlogp (r = exp(logp - old), so dr/dlogp = r):
#   row 0 (A=+1): r=1.5 -> -1.2 (clipped high, grad 0); r=0.5 -> -0.5 (grad -0.5); r=1.1 -> -1.1 (grad -1.1)
#   row 1 (A=-1): r=1.5 -> +1.5 (grad +1.5); r=0.5 -> +0.8 (clipped low, grad 0); r=1.1 -> +1.1 (grad +1.1)
# bnpo over 6 tokens: loss (-1.2 - 0.5 - 1.1 + 1.5 + 0.8 + 1.1) / 6 = 0.1, grads / 6.
def _ratio_example():
    old = torch.full((2, 3), -1.0)
    logps = (old + torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]))).requires_grad_()
    return logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3)


def test_clipping_both_sides_values_gradients_and_fractions():
    logps, old, adv, mask = _ratio_example()
    loss, m = grpo_loss(logps, old, None, adv, mask, beta=0.0, loss_type="bnpo")
    close(loss, 0.1)
    loss.backward()
    close(logps.grad, torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]]) / 6)
    assert logps.grad[0, 0] == 0 and logps.grad[1, 1] == 0  # exactly zero where clipped
    close(m["clip_ratio/low_mean"], 1 / 6)
    close(m["clip_ratio/high_mean"], 1 / 6)
    close(m["clip_ratio/region_mean"], 2 / 6)
    assert "kl" not in m  # no reference given
    assert all(not v.requires_grad and v.ndim == 0 for v in m.values())


def test_asymmetric_clip_higher():
    # epsilon_high 0.6 -> clip to [0.8, 1.6]: row 0's r=1.5 is no longer clipped (loss -1.5, grad -1.5).
    logps, old, adv, mask = _ratio_example()
    loss, m = grpo_loss(logps, old, None, adv, mask, beta=0.0, epsilon_high=0.6, loss_type="bnpo")
    close(loss, (-1.5 - 0.5 - 1.1 + 1.5 + 0.8 + 1.1) / 6)
    loss.backward()
    close(logps.grad, torch.tensor([[-1.5, -0.5, -1.1], [1.5, 0.0, 1.1]]) / 6)
    close(m["clip_ratio/high_mean"], 0.0)
    close(m["clip_ratio/low_mean"], 1 / 6)


# ---- grpo_loss: aggregation, mask, KL ------------------------------------------------------------

# A = [2, -1], mask [[1, 1, 0], [1, 0, 0]]; masked positions hold garbage that must not leak.
ADV = torch.tensor([2.0, -1.0])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
LOGPS = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -5.0, -5.0]])
REF = torch.tensor([[-1.0, -1.0, 100.0], [-2.0, 100.0, 100.0]])  # exp(100 + 5) overflows float32


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # ratio 1, beta 0: per token -A -> row 0 [-2, -2], row 1 [1]
        ("grpo", (-2 + 1) / 2),  # sequence means -2 and 1, then their mean
        ("bnpo", (-2 - 2 + 1) / 3),  # mean over the 3 unmasked tokens
        ("dr_grpo", (-2 - 2 + 1) / (2 * 4)),  # token sum / (N * max_completion_length = 2 * 4)
    ],
)
def test_old_logps_none_gives_ratio_one_and_minus_mean_advantage(loss_type, expected):
    logps = LOGPS.clone().requires_grad_()
    loss, m = grpo_loss(logps, None, None, ADV, MASK, beta=0.0, loss_type=loss_type, max_completion_length=4)
    close(loss, expected)
    close(m["clip_ratio/region_mean"], 0.0)
    if loss_type == "grpo":  # d loss / d logp = -A / |o_i| / N on unmasked tokens
        loss.backward()
        close(logps.grad, [[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0]])


# With the reference: delta = ref - logp on unmasked tokens is row 0 [0, 1], row 1 [-1];
# k3 = e^d - d - 1 -> [0, e - 2], [e^-1]. beta 0.5 -> per token row 0 [-2, -2 + (e - 2)/2], row 1 [1 + e^-1/2].
ROW0 = [-2.0, -2.0 + 0.5 * (E - 2)]
ROW1 = [1.0 + 0.5 / E]


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (sum(ROW0) / 2 + ROW1[0]) / 2),
        ("bnpo", (sum(ROW0) + ROW1[0]) / 3),
        ("dr_grpo", (sum(ROW0) + ROW1[0]) / 8),
    ],
)
def test_each_loss_type_with_kl_and_mask(loss_type, expected):
    logps = LOGPS.clone().requires_grad_()
    loss, m = grpo_loss(logps, None, REF, ADV, MASK, beta=0.5, loss_type=loss_type, max_completion_length=4)
    close(loss, expected)
    close(m["kl"], (0 + (E - 2) + 1 / E) / 3)
    loss.backward()
    assert torch.isfinite(logps.grad).all() and (logps.grad[MASK == 0] == 0).all()


def test_garbage_after_eos_does_not_reach_loss_or_gradient():
    # Old log-probs of -200 on masked tokens: exp(-5 + 200) overflows float32 unless masked before exp().
    old = torch.where(MASK.bool(), LOGPS, -200.0)
    logps = LOGPS.clone().requires_grad_()
    loss, m = grpo_loss(logps, old, REF, ADV, MASK, beta=0.5, loss_type="bnpo")
    close(loss, (sum(ROW0) + ROW1[0]) / 3)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    close(m["clip_ratio/region_mean"], 0.0)


def test_kl_is_zero_when_policy_equals_reference():
    logps = LOGPS.clone().requires_grad_()
    loss, m = grpo_loss(logps, None, LOGPS.clone(), ADV, MASK, beta=0.5, loss_type="bnpo")
    close(m["kl"], 0.0)
    close(loss, (-2 - 2 + 1) / 3)


def test_importance_weights_scale_each_tokens_policy_term_not_the_kl():
    """TRL's truncated importance sampling: weights multiply the clipped-ratio term per token, before the KL."""
    from video_r2.grpo.vllm_engine import importance_weights

    logps, old, adv, mask = _ratio_example()
    ref = logps.detach() - 0.3
    plain, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.0, loss_type="bnpo")
    ones, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.0, loss_type="bnpo", importance_weights=torch.ones(2, 3))
    close(ones, plain)
    halved, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.0, loss_type="bnpo",
                          importance_weights=torch.full((2, 3), 0.5))
    close(halved, 0.5 * plain)
    # With beta the KL part is not reweighted: loss(w=0) is beta * KL alone.
    kl_only, m = grpo_loss(logps, old, ref, adv, mask, beta=0.1, loss_type="bnpo",
                           importance_weights=torch.zeros(2, 3))
    close(kl_only, 0.1 * m["kl"])
    # The weights: exp(policy - engine), truncated at the cap, 1 where masked; never a gradient path.
    policy = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    engine = torch.tensor([[-0.5, -1.0, -0.1]])
    w = importance_weights(policy, engine, torch.tensor([[1, 1, 0]]), cap=1.5)
    close(w, torch.tensor([[1.5, 1.0, 1.0]]))  # e^0.5 = 1.65 capped; equal; masked
    assert not w.requires_grad


def test_loss_argument_errors():
    with pytest.raises(ValueError):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.04)  # reference needed
    with pytest.raises(ValueError):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.0, loss_type="dr_grpo")  # constant needed
    with pytest.raises(ValueError):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.0, loss_type="dapo")


# ---- completion_logps on a tiny real Qwen2.5-VL --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        image_token_id=297, video_token_id=298, vision_start_token_id=295, vision_end_token_id=296,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("chunk_size", [2, 3, 7])  # none divides N = 5
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_matches_naive_log_softmax(tiny_model, chunk_size, temperature):
    g = torch.Generator().manual_seed(1)
    N, T, L = 5, 12, 4
    input_ids = torch.randint(3, 290, (N, T), generator=g)
    attention_mask = torch.ones(N, T, dtype=torch.long)
    attention_mask[1, :3] = 0  # a left-padded prompt
    attention_mask[3, -1] = 0  # a completion masked after its EOS
    extra = {"mm_token_type_ids": torch.zeros(N, T, dtype=torch.int)}  # passed through to the forward

    with torch.no_grad():
        full = tiny_model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits  # [N, T, V]
    naive = torch.log_softmax(full[:, T - L - 1 : T - 1].float() / temperature, dim=-1)
    naive = naive.gather(-1, input_ids[:, T - L :, None]).squeeze(-1)  # [N, L]

    got = completion_logps(tiny_model, input_ids, attention_mask, L, temperature=temperature,
                           chunk_size=chunk_size, **extra)
    assert got.shape == (N, L) and got.dtype == torch.float32
    close(got, naive)
    got.sum().backward()  # differentiable through the chunks
    assert tiny_model.lm_head.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)


# ---- combine_rewards and reward_stats ------------------------------------------------------------

# G = 3, three groups. acc: group 0 partial, group 1 all None, group 2 complete. fmt: groups 1, 2 partial.
RAW = {
    "acc": [1.0, None, 0.0, None, None, None, 1.0, 1.0, 0.0],
    "fmt": [1.0, 1.0, 1.0, 0.0, 1.0, None, None, 0.5, 1.0],
}
# acc filled: [1, (1+0)/2, 0], group 1 left out (NaN, adds 0), [1, 1, 0]
# fmt filled: [1, 1, 1], [0, 1, (0+1)/2], [(0.5+1)/2, 0.5, 1]
# total = acc + 0.5 * fmt: [1.5, 1.0, 0.5], [0, 0.5, 0.25], [1.375, 1.25, 0.5]
TOTAL = [1.5, 1.0, 0.5, 0.0, 0.5, 0.25, 1.375, 1.25, 0.5]
NAN = float("nan")


@pytest.mark.parametrize("weights", [{"acc": 1.0, "fmt": 0.5}, [1.0, 0.5]])
def test_combine_rewards_none_rule(weights):
    total, filled = combine_rewards(RAW, weights, 3)
    close(total, TOTAL)
    torch.testing.assert_close(filled["acc"], torch.tensor([1, 0.5, 0, NAN, NAN, NAN, 1, 1, 0]), equal_nan=True)
    close(filled["fmt"], [1, 1, 1, 0, 1, 0.5, 0.75, 0.5, 1])
    # The filled sample sits at its group's mean, so it adds nothing to that reward's advantage.
    assert filled["acc"][1] == filled["acc"][:3].mean()


def test_combine_rewards_rejects_mismatched_weights_and_lengths():
    with pytest.raises(ValueError):
        combine_rewards(RAW, {"acc": 1.0}, 3)
    with pytest.raises(ValueError):
        combine_rewards(RAW, [1.0], 3)
    with pytest.raises(ValueError):
        combine_rewards({"acc": [1.0, 0.0]}, [1.0], 3)


def test_reward_stats():
    s = reward_stats(RAW, torch.tensor(TOTAL), 3)
    # acc valid values [1, 0, 1, 1, 0]: mean 0.6, squared deviations 3*0.16 + 2*0.36 = 1.2, unbiased var 0.3
    close(s["rewards/acc/mean"], 0.6)
    close(s["rewards/acc/std"], math.sqrt(0.3))
    close(s["rewards/acc/none_frac"], 4 / 9)
    assert s["rewards/acc/missing_groups"] == 1 and s["rewards/fmt/missing_groups"] == 0
    close(s["rewards/fmt/none_frac"], 2 / 9)
    close(s["reward/mean"], sum(TOTAL) / 9)
    assert s["reward/frac_groups_all_equal"] == 0
    # totals [1, 1, 1] and [0, 1, 0]: stds 0 and sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3)
    s = reward_stats({"r": [1, 1, 1, 0, 1, 0]}, torch.tensor([1.0, 1, 1, 0, 1, 0]), 3)
    close(s["reward/frac_groups_all_equal"], 0.5)
    close(s["reward/group_std_mean"], math.sqrt(1 / 3) / 2)
    assert all(isinstance(v, float) for v in s.values())


# ---- completion_mask and lengths -----------------------------------------------------------------

IDS = torch.tensor([
    [5, 2, 9, 2],  # EOS at 1 -> [1, 1, 0, 0]
    [2, 4, 4, 4],  # EOS first -> [1, 0, 0, 0]
    [5, 6, 8, 9],  # no EOS (truncated) -> all 1, or all 0 with mask_truncated
    [5, 6, 8, 2],  # EOS last -> all 1 either way
])


def test_completion_mask():
    expected = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert completion_mask(IDS, 2).tolist() == expected
    expected[2] = [0, 0, 0, 0]
    assert completion_mask(IDS, 2, mask_truncated=True).tolist() == expected
    # several EOS ids: the first of any of them ends the completion
    assert completion_mask(torch.tensor([[5, 7, 2, 1]]), [2, 7]).tolist() == [[1, 1, 0, 0]]
    assert completion_mask(torch.tensor([[5, 7, 2, 1]]), torch.tensor([2])).tolist() == [[1, 1, 1, 0]]


def test_completion_length_stats():
    s = completion_length_stats(IDS, 2)  # lengths 2, 1, 4 (truncated), 4
    assert s == {"completions/mean_length": 2.75, "completions/min_length": 1.0,
                 "completions/max_length": 4.0, "completions/truncated_frac": 0.25}




def test_rollout_args_refuse_what_cannot_work():
    from video_r2.grpo import RolloutArgs

    with pytest.raises(ValueError, match="ranks_per_group"):
        RolloutArgs(num_generations=8, ranks_per_group=3)
    with pytest.raises(ValueError, match="needs rollout.rollout_engine: vllm"):
        RolloutArgs(vllm_importance_sampling_cap=2.0)  # HF generate is the policy: nothing to correct
    with pytest.raises(ValueError, match=">= 1"):
        RolloutArgs(rollout_engine="vllm", vllm_importance_sampling_cap=0.5)
    assert RolloutArgs(rollout_engine="vllm", vllm_importance_sampling_cap=2.0).vllm_importance_sampling_cap == 2.0
