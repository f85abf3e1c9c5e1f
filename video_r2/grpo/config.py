"""GRPOModule's settings, grouped as a config shows them (the original's flags in brackets).

`video_r2.stage.OptimizerArgs` and `ExportArgs` (shared with SFT) complete the list; TAR's judge client is
its own argument because LightningCLI builds it from a `class_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from video_r2.grpo.loss import LossType, ScaleRewards


@dataclass
class RolloutArgs:
    """How completions are sampled."""

    num_generations: int = 8  # G: completions per prompt, over all the ranks that share it (--num_generations)
    ranks_per_group: int = 1  # ranks sharing each prompt; each samples G / ranks_per_group of its completions
    max_completion_length: int = 1024  # new tokens per completion at most (--max_completion_length)
    temperature: float = 0.9  # sampling temperature; log-probs are taken at the same one (original: 0.9)
    top_p: float = 1.0  # nucleus sampling; 1.0 is off (--top_p)
    top_k: int | None = 50  # top-k sampling; None is off (original: 50)
    repetition_penalty: float = 1.0  # HF generate's; 1.0 is off (--repetition_penalty)
    mask_truncated_completions: bool = False  # completions without EOS add no gradient (DAPO); original: off
    seed: int | None = None  # sampling seed; None: the run's seed. Each step and rank samples from its own
    # stream derived from (seed, step, rank), so a resumed run samples what the uninterrupted one would have
    rollout_engine: Literal["hf", "vllm"] = "hf"  # "hf": HF generate; "vllm": an in-process vLLM engine per rank
    # (colocated, weights pushed after every optimizer step; `pip install video-r2[vllm]`, see README "vLLM rollouts")
    vllm_gpu_memory_utilization: float = 0.3  # vllm: share of the GPU's memory the engine may take (weights + KV)
    vllm_kv_cache_gb: float = 1.0  # vllm on the CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    vllm_sleep: bool = False  # vllm on GPUs: free the engine's memory (sleep level 1) between rollouts
    vllm_max_model_len: int | None = None  # vllm: longest prompt + completion; None: the checkpoint's own limit
    vllm_dtype: str = "auto"  # vllm: weight dtype; "auto" follows the policy's (fp32 on the CPU demo)
    # vllm: TRL's truncated importance sampling: each token's policy-gradient loss is weighted by
    # min(pi_policy / pi_vllm, cap) of the sampled token, correcting for the engine's numerics; None: off
    vllm_importance_sampling_cap: float | None = None

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"rollout.num_generations must be >= 2 (a group of 1 has no relative advantage), "
                             f"got {self.num_generations}")
        if self.ranks_per_group < 1 or self.num_generations % self.ranks_per_group:
            raise ValueError(f"rollout.ranks_per_group ({self.ranks_per_group}) must divide num_generations "
                             f"({self.num_generations}): each rank samples the same share of every group")
        if self.rollout_engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.rollout_engine must be 'hf' or 'vllm', got {self.rollout_engine!r}")
        if self.vllm_importance_sampling_cap is not None:
            if self.rollout_engine != "vllm":
                raise ValueError("rollout.vllm_importance_sampling_cap corrects vLLM's sampling: it needs "
                                 "rollout.rollout_engine: vllm")
            if not self.vllm_importance_sampling_cap >= 1:
                raise ValueError(f"rollout.vllm_importance_sampling_cap must be >= 1 (TRL uses 2), got "
                                 f"{self.vllm_importance_sampling_cap}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got "
                             f"{self.vllm_gpu_memory_utilization}")

    @property
    def local_generations(self) -> int:
        """Completions per prompt this rank samples."""
        return self.num_generations // self.ranks_per_group


@dataclass
class LossArgs:
    """How a rollout becomes updates: the clipped-ratio loss, its KL penalty and the update schedule."""

    beta: float = 0.04  # KL coefficient; 0 skips the reference entirely (--beta)
    epsilon_low: float = 0.2  # lower ratio clip, 1 - epsilon_low (--epsilon)
    epsilon_high: float = 0.2  # upper ratio clip, 1 + epsilon_high; larger is DAPO's clip-higher (--epsilon_high)
    loss_type: LossType = "grpo"  # "grpo" | "bnpo" | "dr_grpo" aggregation (see video_r2.grpo) (--loss_type)
    scale_rewards: ScaleRewards = "group"  # "group" | "batch" | "none" advantage scaling (--scale_rewards)
    num_iterations: int = 1  # mu: updates per rollout (--num_iterations)
    mini_batch_size: int | None = None  # completions per update; None: the rank's whole rollout at once
    max_grad_norm: float = 1.0  # global gradient-norm clip, applied here (manual optimization) (--max_grad_norm)
    logp_chunk_size: int = 4  # completions per float32 log-softmax chunk (bounds the [chunk, L, V] tensor)


@dataclass
class RewardArgs:
    """Which rewards, how they add up, and TAR's matching settings."""

    funcs: list[str] = field(default_factory=lambda: ["accuracy", "format", "tar"])  # (--reward_funcs)
    weights: list[float] | None = None  # one per reward; None: all 1
    buffer_seconds: float = 2.0  # TAR: both spans widen by this much before the overlap test (--buffer_seconds)
    similarity_threshold: float = 0.75  # TAR: least MiniLM cosine for a claim to match (--similarity_threshold)
    strict_format: bool = False  # format reward: ours (tags alone in their blocks) instead of the original's

    def __post_init__(self) -> None:
        self.funcs = list(self.funcs)
        self.weights = list(self.weights) if self.weights is not None else [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} rewards.weights for rewards.funcs {self.funcs}")
