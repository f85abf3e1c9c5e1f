"""GRPOModule: learning on a token reward, the KL leash, bad steps, and `video-r2 fit` with the real judge."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from video_r2.grpo import GRPOModule, NonFiniteStepError
from video_r2.model import ModelConfig
from video_r2.rewards import register_reward

CHOSEN = "7"  # digits are single tokens (the tokenizer splits them), so characters count tokens


@register_reward("chosen_token")
def chosen_token_reward(completions, samples, context):
    """Fraction of the completion that is the chosen token: a reward only RL can teach the random model."""
    return [text.count(CHOSEN) / max(1, len(text)) for text in completions]


def text_prompts(processor, n: int) -> list[dict]:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    questions = [f"Question {i}: say something." for i in range(n)]
    texts = [processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "mm_token_type_ids": torch.zeros_like(enc["input_ids"]),
             "samples": [{"id": f"q{i}", "question": q} for i, q in enumerate(questions)]}
    return [batch]


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def train_token_reward(tiny_demo, seed: int, steps: int, **overrides) -> tuple[GRPOModule, list[dict]]:
    seed_everything(seed)
    settings = dict(
        backbone=ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_llm=False),
        num_generations=8, max_completion_length=16, temperature=1.0, beta=0.0, lr=1e-2,
        reward_funcs=["chosen_token"], warmup_ratio=0.0, min_lr_ratio=1.0, log_completions_every=0,
    )
    module = GRPOModule(**{**settings, **overrides})
    history: list[dict] = []

    from lightning.pytorch.callbacks import Callback

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    from video_r2.model import load_processor

    batch = text_prompts(load_processor(tiny_demo / "model"), 4)[0]
    loader = torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[Keep()])
    trainer.fit(module, train_dataloaders=loader)
    return module, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_learns_a_token_reward(tiny_demo, seed):
    """30 steps of GRPO raise the reward for emitting one chosen token far above chance (1/vocab)."""
    module, history = train_token_reward(tiny_demo, seed, steps=30)
    chance = 1 / len(module.processor.tokenizer)
    rewards = [h["train/reward/mean"] for h in history]
    assert len(rewards) == 30 and all(math.isfinite(r) for r in rewards)
    best_late = max(sum(rewards[i:i + 3]) / 3 for i in range(20, 28))
    assert best_late > 0.5, rewards
    assert best_late > 3 * chance


@torch.no_grad()
def kl_to_start(module: GRPOModule, tiny_demo) -> float:
    """Mean per-token k3 KL(policy || starting model) on fresh completions of the trained policy."""
    from video_r2.grpo import Rollout, completion_logps
    from video_r2.model import load_model, load_processor

    start = load_model(tiny_demo / "model").eval()
    batch = text_prompts(load_processor(tiny_demo / "model"), 4)[0]
    module.eval()
    rollout, _, _ = module.rollout(batch)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], 1)
    L = rollout.completion_ids.shape[1]
    logps = completion_logps(module.model, ids, mask, L)
    ref = completion_logps(start, ids, mask, L)
    delta = ref - logps
    kl = (torch.exp(delta) - delta - 1) * rollout.completion_mask
    return (kl.sum() / rollout.completion_mask.sum()).item()


def test_beta_keeps_the_policy_near_the_reference(tiny_demo):
    free, free_history = train_token_reward(tiny_demo, 0, steps=30, beta=0.0)
    leashed, leashed_history = train_token_reward(tiny_demo, 0, steps=30, beta=100.0)
    assert "train/kl" not in free_history[-1]  # beta 0: the reference is never evaluated
    assert leashed_history[-1]["train/kl"] < 0.1, [h["train/kl"] for h in leashed_history]
    # Measured the same way for both runs, outside the module:
    assert kl_to_start(free, tiny_demo) > 1.0
    assert kl_to_start(leashed, tiny_demo) < 0.1
