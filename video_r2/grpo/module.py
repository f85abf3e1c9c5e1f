"""`GRPOModule`: one GRPO step as numbered phases over the pure functions of `loss.py` and `rollout.py`."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from video_r2 import model as vm
from video_r2.grpo.config import LossArgs, RewardArgs, RolloutArgs
from video_r2.grpo.groups import RankGroups
from video_r2.grpo.loss import combine_rewards, completion_logps, group_advantages, grpo_loss
from video_r2.grpo.rollout import PromptVisuals, encode_visuals, generation_token_ids, sample_completions
from video_r2.grpo.stats import completion_length_stats, completion_log, reward_stats
from video_r2.grpo.types import Rollout, ScoredRollout, completion_mask
from video_r2.judge import JudgeClient
from video_r2.model import LoraConfigArgs, ModelConfig
from video_r2.rewards import RewardContext, compute_rewards, get_reward
from video_r2.stage import ExportArgs, OptimizerArgs, StageModule, as_dataclass


class StepTimer:
    """Wall time of each named phase of a step, for the `time/*` logs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start


class GRPOModule(StageModule):
    """Stage 2: GRPO with accuracy, format and TAR rewards (the variant is described in `video_r2.grpo`).

    Batches come from ``VideoDataModule(stage="grpo")``: left-padded prompt tensors plus ``samples``, the
    records' answers, questions and ``temporal_grounding`` the rewards read. Optimization is manual because
    one batch of prompts becomes ``num_iterations`` x mini-batches optimizer updates of its rollout.

    Args:
        backbone: the checkpoint to start from (the SFT-merged one) and which of its parts train.
        lora: LoRA settings; with LoRA the reference is the policy with its adapters off (no second copy).
        rollout: how completions are sampled (`RolloutArgs`).
        loss: the loss and the update schedule (`LossArgs`).
        rewards: which rewards and TAR's settings (`RewardArgs`).
        judge: TAR's judge client; None reads OPENAI_API_BASE / SERVED_MODEL / OPENAI_API_KEY.
        optim: AdamW and its schedule (GRPO's default: lr 1e-6, weight decay 0.01, no warmup).
        export: where the HF exports go.
        max_bad_steps: this many non-finite updates in a row stop the run.
        log_completions_every: every this many steps, a TensorBoard text table of prompts, completions, rewards,
            and `<log_dir>/completions/step-N.json` with TAR's reasons (`video-r2 inspect` reads it).
    """

    stage_name = "GRPO"

    def __init__(
        self,
        backbone: ModelConfig,
        lora: LoraConfigArgs | None = None,
        rollout: RolloutArgs | None = None,
        loss: LossArgs | None = None,
        rewards: RewardArgs | None = None,
        judge: JudgeClient | None = None,
        optim: OptimizerArgs | None = None,
        export: ExportArgs | None = None,
        max_bad_steps: int = 3,
        log_completions_every: int = 10,
    ) -> None:
        super().__init__(backbone, lora, optim or OptimizerArgs(lr=1e-6, weight_decay=0.01), export, max_bad_steps)
        self.save_hyperparameters(ignore=["judge"])
        self.plain_hparams()
        self.automatic_optimization = False  # mu updates per rollout, clipping and skipping happen here
        self.rollout_args = as_dataclass(RolloutArgs, rollout) or RolloutArgs()
        self.loss_args = as_dataclass(LossArgs, loss) or LossArgs()
        self.reward_args = as_dataclass(RewardArgs, rewards) or RewardArgs()
        self.log_completions_every = log_completions_every
        for name in self.reward_args.funcs:
            get_reward(name)  # an unknown name fails now, listing the known ones, not after the first rollout
        if "tar" in self.reward_args.funcs and judge is None:
            judge = JudgeClient.from_env()  # the original recipe's environment variables
        r = self.reward_args
        self.reward_context = RewardContext(judge=judge, buffer_seconds=r.buffer_seconds,
                                            similarity_threshold=r.similarity_threshold, strict_format=r.strict_format)
        self.ref_model: torch.nn.Module | None = None  # a frozen copy, only without LoRA and with beta != 0
        self.eos_token_ids: list[int] | None = None
        self.vllm_engine = None  # rollout_engine "vllm": this rank's engine, built at first use (grpo.vllm_engine)

    # ---- model -------------------------------------------------------------------------------------

    def _after_build(self, model: torch.nn.Module) -> None:
        if self.loss_args.beta != 0 and not vm.is_peft(model):
            # Without adapters there is nothing to switch off: keep a frozen copy of the starting weights.
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        # The vision features can be shared by rollout, reference and update only if nothing in the
        # vision tower or merger trains (the recipe); otherwise the update re-encodes with gradients.
        self.vision_trains = any(p.requires_grad for n, p in model.named_parameters() if vm.part_of(n) != "llm")

    def models_to_shard(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [m for m in (model, self.ref_model) if m is not None]

    def configure_model(self) -> None:
        super().configure_model()
        if self.eos_token_ids is None:
            self.eos_token_ids, self.pad_token_id, self.suppressed_tokens = generation_token_ids(
                self.model, self.processor.tokenizer
            )

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        self.groups = RankGroups(self.rollout_args.ranks_per_group, world, rank)
        self._share_prompts_in_groups()
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.rollout_args.rollout_engine == "vllm" and hasattr(data, "keep_frames"):
            data.keep_frames = True  # the engine is fed the frames the data pipeline drew
        if self.rollout_args.seed is None:
            self.rollout_args.seed = torch.initial_seed()  # seed_everything's seed, the same on every rank

    def _share_prompts_in_groups(self) -> None:
        """Ranks of one group must read the same prompts: tell the data module (one setting, not two)."""
        k = self.rollout_args.ranks_per_group
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(data, "hparams", {})
        if k == 1 or "ranks_per_group" not in hparams:
            return
        if hparams["ranks_per_group"] not in (1, k):
            raise ValueError(f"data.ranks_per_group={hparams['ranks_per_group']} but "
                             f"model.init_args.rollout.ranks_per_group={k}: set one of them (the data module "
                             "follows the model when left at 1)")
        hparams["ranks_per_group"] = k

    # ---- the training step -------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        timer = StepTimer()
        with timer("rollout"):  # 1. this rank's share of G completions per prompt, the video encoded once
            rollout, visuals, completions = self.sample(batch)
        with timer("rewards"):  # 2. every reward; the judge calls of the whole step go out concurrently
            g = self.rollout_args.local_generations
            samples = [s for s in batch["samples"] for _ in range(g)]
            raw = self.compute_rewards(completions, samples)
        with timer("reference"):  # 3. rewards of whole groups -> advantages; 4. old and reference log-probs
            ids = [s.get("id") for s in batch["samples"]]
            scored, group_raw, group_total = self.score(rollout, visuals, raw, ids)
        with timer("policy_update"):  # 5. mu clipped-ratio updates with the KL penalty
            update = self.policy_update(scored, visuals, batch)
        if self.vllm_engine is not None:
            with timer("vllm_push"):  # the engine samples the next rollout with the updated weights
                self.vllm_engine.push_weights(self.model, fsdp_root=self.fsdp1_root())
        # 6. logging
        self.log_step(scored, group_raw, group_total, completions, batch, update, timer)

    def sampling_seed(self) -> int:
        """The seed of this step's rollout on this rank: a function of (seed, step, rank) only."""
        return (self.rollout_args.seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % (2**63 - 1)

    def sample(self, batch: dict) -> tuple[Rollout, PromptVisuals, list[str]]:
        """1. Sample this rank's completions per prompt; returns the rollout, the prompts' visuals and the texts."""
        r = self.rollout_args
        if r.rollout_engine == "vllm":
            return self.sample_with_vllm(batch)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG (dropout) is left where it was
            torch.manual_seed(self.sampling_seed())
            rollout, visuals = sample_completions(
                self.model,
                {k: v for k, v in batch.items() if isinstance(v, Tensor)},
                r.local_generations,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.suppressed_tokens,
                mask_truncated=r.mask_truncated_completions,
                synced_gpus=self.sharded() and self.trainer.world_size > 1,  # all ranks step together under FSDP
                do_sample=True,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                repetition_penalty=r.repetition_penalty,
                max_new_tokens=r.max_completion_length,
            )
        texts = self.processor.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return rollout, visuals, texts

    def sample_with_vllm(self, batch: dict) -> tuple[Rollout, PromptVisuals, list[str]]:
        """1, with ``rollout_engine: vllm``: this rank's in-process engine samples; the mean and max gap
        between its log-probs and the policy's own is logged (``train/vllm/logp_gap_*``)."""
        from video_r2.grpo.vllm_engine import VLLMEngine, importance_weights, logp_gap

        if self.vllm_engine is None:
            self.vllm_engine = VLLMEngine.for_module(self)
        r = self.rollout_args
        rollout, visuals, engine_logps = self.vllm_engine.sample(
            self.model, {k: v for k, v in batch.items() if isinstance(v, Tensor)}, batch.get("samples"),
            r.local_generations, seed=self.sampling_seed(), mask_truncated=r.mask_truncated_completions,
        )
        with torch.no_grad():
            policy_logps = self.sequence_logps(self.model, rollout, range(rollout.num_completions), visuals)
        up_to_eos = completion_mask(rollout.completion_ids, self.eos_token_ids)  # every sampled token
        metrics = logp_gap(engine_logps, policy_logps, up_to_eos)
        if r.vllm_importance_sampling_cap is not None:  # TRL's truncated importance sampling, per token
            weights = importance_weights(policy_logps, engine_logps, up_to_eos, r.vllm_importance_sampling_cap)
            rollout = dataclasses.replace(rollout, importance_weights=weights)
            counted = up_to_eos.bool()
            metrics["vllm/is_weight_mean"] = weights[counted].mean().item() if counted.any() else 1.0
        if self._trainer is not None:
            self.log_dict({f"train/{k}": v for k, v in metrics.items()},
                          on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        texts = self.processor.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return rollout, visuals, texts

    def compute_rewards(self, completions: list[str], samples: list[dict]) -> dict[str, list]:
        """2. ``{reward name: [value or None per completion]}`` for this rank's completions."""
        return compute_rewards(self.reward_args.funcs, completions, samples, self.reward_context)

    def score(self, rollout: Rollout, visuals: PromptVisuals, raw: dict,
              prompt_ids: list) -> tuple[ScoredRollout, dict, Tensor]:
        """3-4. Advantages over whole groups (gathered from the ranks that share them), then the old-policy
        and reference log-probs. Returns the scored rollout and the group-level rewards for logging."""
        G = self.rollout_args.num_generations
        group_raw = self.groups.gather_rewards(raw, self.device, G, prompt_ids)  # name -> [B*G], the whole groups
        total, filled = combine_rewards(group_raw, self.reward_args.weights, G)  # [B*G]
        advantages = group_advantages(total, G, self.loss_args.scale_rewards)  # [B*G]
        mine = self.groups.local_rows(advantages.numel(), G)  # this rank's rows, in its rollout's order
        old_logps, ref_logps = self.old_and_reference_logps(rollout, visuals)
        scored = ScoredRollout(
            rollout=rollout,
            rewards={name: values[mine] for name, values in filled.items()},
            total_rewards=total[mine],
            advantages=advantages[mine].to(self.device),
            old_logps=old_logps,
            ref_logps=ref_logps,
        )
        return scored, group_raw, total

    def sequence_logps(self, model, rollout: Rollout, rows: range, visuals: PromptVisuals) -> Tensor:
        """Log-probs ``[n, L]`` of the completion tokens of ``rows`` under ``model`` (policy or reference)."""
        sl = slice(rows.start, rows.stop)
        completion = rollout.completion_ids[sl]  # [n, L]
        ids = torch.cat([rollout.prompt_ids[sl], completion], dim=1)  # [n, T]
        # Every completion position is attended to: tokens after EOS are padding that only the mask hides.
        mask = torch.cat([rollout.prompt_mask[sl], torch.ones_like(completion)], dim=1)  # [n, T]
        kwargs = visuals.for_rows(rows, self.rollout_args.local_generations)
        if rollout.mm_token_type_ids is not None:
            types = rollout.mm_token_type_ids[sl]  # [n, P]
            kwargs["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, completion.shape[1]))  # [n, T]
        return completion_logps(
            model, ids, mask, completion.shape[1],
            temperature=self.rollout_args.temperature, chunk_size=self.loss_args.logp_chunk_size, **kwargs,
        )

    @torch.no_grad()
    def old_and_reference_logps(self, rollout: Rollout, visuals: PromptVisuals) -> tuple[Tensor | None, Tensor | None]:
        """4. ``old_logps`` (only when mu > 1: with mu = 1 the ratio is 1 by construction) and ``ref_logps``."""
        everything = range(rollout.num_completions)
        old = None
        if self.loss_args.num_iterations > 1:
            old = self.sequence_logps(self.model, rollout, everything, visuals)
        if self.loss_args.beta == 0:
            return old, None
        if self.ref_model is not None:
            ref_visuals = encode_visuals(self.ref_model, rollout.prompt_inputs) if self.vision_trains else visuals
            return old, self.sequence_logps(self.ref_model, rollout, everything, ref_visuals)
        with vm.adapters_disabled(self.model) as reference:
            ref_visuals = encode_visuals(reference, rollout.prompt_inputs) if self.vision_trains else visuals
            return old, self.sequence_logps(reference, rollout, everything, ref_visuals)

    def policy_update(self, scored: ScoredRollout, visuals: PromptVisuals, batch: dict) -> dict[str, float]:
        """5. ``num_iterations`` passes over the rollout in mini-batches: loss, backward, clip, step."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        a, rollout = self.loss_args, scored.rollout
        N = rollout.num_completions
        size = a.mini_batch_size or N
        metrics: dict[str, list[float]] = defaultdict(list)
        for _ in range(a.num_iterations):
            for start in range(0, N, size):
                rows = range(start, min(start + size, N))
                sl = slice(rows.start, rows.stop)
                if self.vision_trains:  # the vision tower learns: its features need gradients
                    visuals = encode_visuals(self.model, rollout.prompt_inputs)
                logps = self.sequence_logps(self.model, rollout, rows, visuals)  # [n, L]
                loss, loss_metrics = grpo_loss(
                    logps,
                    None if scored.old_logps is None else scored.old_logps[sl],
                    None if scored.ref_logps is None else scored.ref_logps[sl],
                    scored.advantages[sl],
                    rollout.completion_mask[sl],
                    epsilon_low=a.epsilon_low,
                    epsilon_high=a.epsilon_high,
                    beta=a.beta,
                    loss_type=a.loss_type,
                    max_completion_length=self.rollout_args.max_completion_length,
                    bnpo_normalizer=self.groups.bnpo_normalizer(rollout.completion_mask[sl], self.device)
                    if a.loss_type == "bnpo" else None,
                    importance_weights=None if rollout.importance_weights is None else rollout.importance_weights[sl],
                )
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                grad_norm = self.clip_and_measure_gradients()
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    ids = [s.get("id") for s in batch.get("samples", [])]
                    metrics["bad_updates"].append(1.0)
                    self.count_bad_update(f"loss {loss.item()} or grad norm {grad_norm.item()}", ids)
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

    def fsdp1_root(self) -> torch.nn.Module | None:
        """Under Lightning's FSDPStrategy, the root FSDP unit (the wrapped LightningModule), else None."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            return self.trainer.strategy.model
        return None

    def clip_and_measure_gradients(self) -> Tensor:
        """Clip the global gradient norm to ``max_grad_norm``; returns the norm before clipping."""
        from lightning.pytorch.strategies import FSDPStrategy

        max_norm = self.loss_args.max_grad_norm or float("inf")
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            return self.fsdp1_root().clip_grad_norm_(max_norm)  # FSDP1 reduces across shards
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor

    # ---- logging -----------------------------------------------------------------------------------

    def log_step(self, scored: ScoredRollout, group_raw: dict, group_total: Tensor, completions: list[str],
                 batch: dict, update: dict[str, float], timer: StepTimer) -> None:
        metrics: dict[str, float] = {}
        metrics.update(reward_stats(group_raw, group_total, self.rollout_args.num_generations))
        metrics.update(completion_length_stats(scored.rollout.completion_ids, self.eos_token_ids))
        metrics.update(update)
        metrics.update({k: float(v) for k, v in self.reward_context.metrics().items()})
        metrics.update({f"time/{phase}_s": s for phase, s in timer.seconds.items()})
        metrics["bad_updates_total"] = float(self.bad_steps_total)
        batch_size = len(batch["samples"])
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)},
                      on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/reward", metrics["reward/mean"], prog_bar=True, on_step=True, batch_size=batch_size)
        every = self.log_completions_every
        if every and self.global_step % every == 0:
            self.log_completions(completions, batch, scored)
            self.write_completions(completions, batch, scored)

    def log_completions(self, completions: list[str], batch: dict, scored: ScoredRollout) -> None:
        """A TensorBoard text table: prompt, completion and each reward, one row per completion."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        g = self.rollout_args.local_generations
        names = list(scored.rewards)
        header = "| prompt | completion | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2) + "\n"
        lines = []
        for i, text in enumerate(completions):
            question = str(batch["samples"][i // g].get("question", ""))[:120]
            values = " | ".join(f"{float(scored.rewards[n][i]):.2f}" for n in names)
            lines.append(f"| {_cell(question)} | {_cell(text)} | {values} |")
        experiment.add_text("completions", header + "\n".join(lines), self.global_step)

    def write_completions(self, completions: list[str], batch: dict, scored: ScoredRollout) -> None:
        """`<log_dir>/completions/step-N.json` (`step-N.rankR.json` on several ranks): the logged step's
        completions, rewards and TAR's reasons, in `video-r2 evaluate`'s layout: `video-r2 inspect FILE` shows
        why TAR scored each one."""
        # Beside the run's other logs; a run without a logger keeps no completion logs either.
        log_dir = self.trainer.log_dir if self._trainer is not None and self.logger is not None else None
        if not log_dir:
            return
        g = self.rollout_args.local_generations
        samples = [s for s in batch["samples"] for _ in range(g)]
        details = self.reward_context.last_tar_details if "tar" in scored.rewards else None
        if details is not None and len(details) != len(completions):
            details = None  # not this step's TAR call (a custom reward replaced it)
        data = getattr(self.trainer, "datamodule", None)
        hp = getattr(data, "hparams", {})
        source = {"model": str(self.backbone.name_or_path), "data_path": str(hp.get("data_path")),
                  "video_folder": hp.get("video_folder") and str(hp["video_folder"]),
                  "subtitles_folder": hp.get("subtitles_folder") and str(hp["subtitles_folder"]),
                  "sampling": dataclasses.asdict(data.sampling) if hasattr(data, "sampling") else None,
                  "draw_timestamps": hp.get("draw_timestamps", True), "draw_subtitles": hp.get("draw_subtitles", True)}
        log = completion_log(completions, samples, scored.rewards, details, self.global_step, source)
        suffix = f".rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        path = Path(log_dir) / "completions" / f"step-{self.global_step:06d}{suffix}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(log, indent=1))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
