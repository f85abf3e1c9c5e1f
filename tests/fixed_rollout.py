"""A GRPOModule whose completions and rewards are fixed functions of (prompt id, completion index in its
group), so that runs with different rank layouts see the very same group and their updates can be compared.

Sampling itself cannot be compared across layouts (each rank draws from its own stream), and a random tiny
model earns no reward worth comparing; everything after the rollout (gathering, advantages, log-probs, loss,
gradient averaging, the optimizer step) is the real module's. Used by `video-r2 fit` in a subprocess
(`class_path: fixed_rollout.FixedRolloutGRPO`, with tests/ on PYTHONPATH).
"""

from __future__ import annotations

import zlib

import torch

from video_r2.grpo import GRPOModule
from video_r2.grpo.rollout import encode_visuals
from video_r2.grpo.types import Rollout, completion_mask


class FixedRolloutGRPO(GRPOModule):
    def sample(self, batch: dict):
        g, L = self.rollout_args.local_generations, self.rollout_args.max_completion_length
        prompt = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        eos = self.eos_token_ids[0]
        vocab = self.processor.tokenizer.vocab_size
        rows = []
        for sample in batch["samples"]:
            for i in range(g):
                c = self.groups.position * g + i  # this completion's index in its whole group
                gen = torch.Generator().manual_seed(zlib.crc32(f"{sample['id']}/{c}".encode()))
                ids = torch.randint(100, min(vocab, 1000), (L,), generator=gen)
                ids[min(L - 1, 2 + c)] = eos  # completion c has 3 + c tokens: lengths and rewards differ
                rows.append(ids)
        completion_ids = torch.stack(rows).to(self.device)  # [B*g, L]
        mask = completion_mask(completion_ids, self.eos_token_ids)
        completion_ids = completion_ids.masked_fill(mask == 0, self.pad_token_id)
        G = g
        rollout = Rollout(
            prompt_ids=prompt["input_ids"].repeat_interleave(G, 0), prompt_mask=prompt["attention_mask"].repeat_interleave(G, 0),
            completion_ids=completion_ids, completion_mask=mask, prompt_inputs=prompt,
            mm_token_type_ids=prompt["mm_token_type_ids"].repeat_interleave(G, 0) if "mm_token_type_ids" in prompt else None,
        )
        texts = [str(int(m.sum())) for m in mask]  # the completion's length, read by the reward below
        return rollout, encode_visuals(self.model, prompt), texts

    def compute_rewards(self, completions: list[str], samples: list[dict]) -> dict[str, list]:
        return {"length": [float(text) / 10 for text in completions]}


class ThinkingRolloutGRPO(FixedRolloutGRPO):
    """The fixed rollout, read as completions that reason with a time and answer, scored by the real rewards:
    TAR has something to ask the judge about (the random tiny model writes no <think> of its own)."""

    TEXT = "<think>At 00:01 a red circle fills the screen, so the answer is A.</think><answer>A</answer>"

    def sample(self, batch: dict):
        rollout, visuals, texts = super().sample(batch)
        return rollout, visuals, [self.TEXT] * len(texts)

    def compute_rewards(self, completions: list[str], samples: list[dict]) -> dict[str, list]:
        return GRPOModule.compute_rewards(self, completions, samples)
