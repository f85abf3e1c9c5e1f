"""GRPOModule: learning on a token reward, the KL leash, bad steps, and `video-r2 fit` with the real judge."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from video_r2.grpo import GRPOModule, LossArgs, NonFiniteStepError, RewardArgs, RolloutArgs
from video_r2.model import ModelConfig
from video_r2.stage import OptimizerArgs

CHOSEN = "7"  # digits are single tokens (the tokenizer splits them), so characters count tokens


def chosen_token_reward(completions, samples, context):
    """Fraction of the completion that is the chosen token: a reward only RL can teach the random model."""
    return [text.count(CHOSEN) / max(1, len(text)) for text in completions]


@pytest.fixture(autouse=True)
def token_rewards(register_rewards):
    """This file's rewards, registered for each test and removed afterwards."""
    register_rewards(chosen_token=chosen_token_reward, half_missing=half_missing_reward,
                     overflowing=overflowing_reward)


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


def train_token_reward(tiny_demo, seed: int, steps: int, beta: float = 0.0,
                       reward_funcs: tuple[str, ...] = ("chosen_token",)) -> tuple[GRPOModule, list[dict]]:
    seed_everything(seed)
    module = GRPOModule(
        backbone=ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_llm=False),
        rollout=RolloutArgs(num_generations=8, max_completion_length=16, temperature=1.0, top_k=None),
        loss=LossArgs(beta=beta), rewards=RewardArgs(funcs=list(reward_funcs)),
        optim=OptimizerArgs(lr=1e-2, min_lr_ratio=1.0), log_completions_every=0,
    )
    history: list[dict] = []

    from lightning.pytorch.callbacks import Callback

    class Keep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    from video_r2.model import load_processor

    batch = text_prompts(load_processor(tiny_demo / "model"), 4)[0]
    loader = torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[Keep()],
                      default_root_dir=tempfile.mkdtemp(prefix="grpo-test-"))  # the final HF export lands here
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
    from video_r2.grpo import completion_logps
    from video_r2.model import load_model, load_processor

    start = load_model(tiny_demo / "model").eval()
    batch = text_prompts(load_processor(tiny_demo / "model"), 4)[0]
    module.eval()
    rollout, _, _ = module.sample(batch)
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


def grpo_cli(tiny_demo, judge_url: str, root, *extra: str) -> list[str]:
    """`video-r2 fit` on the demo GRPO config, pointed at the test's checkpoint, data, judge and folders."""
    import sys
    from pathlib import Path

    video_r2 = str(Path(sys.executable).parent / "video-r2")
    data = tiny_demo / "data"
    return [
        video_r2, "fit", "--config", "configs/demo/grpo.yaml",
        "--model.init_args.backbone.name_or_path", str(tiny_demo / "model"),
        "--model.init_args.judge.init_args.base_url", judge_url,
        "--model.init_args.rollout.num_generations", "2", "--model.init_args.rollout.max_completion_length", "12",
        "--model.init_args.log_completions_every", "1",
        "--data.data_path", str(data / "video-r2-grpo-dataset.json"), "--data.video_folder", str(data / "videos"),
        "--data.subtitles_folder", str(data / "subtitles"), "--data.processor_path", str(tiny_demo / "model"),
        "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        *extra,
    ]


def _run(args, cwd, with_test_modules: bool = False):
    """Run a command as a user would; `with_test_modules` puts tests/ on its path (for fixed_rollout)."""
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if with_test_modules:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_fit_cli_runs_grpo_with_the_real_judge(tiny_demo, rules_judge, tmp_path):
    """3 GRPO steps through LightningCLI, TAR judged over HTTP by our LitServe server."""
    from pathlib import Path

    from video_r2.plot import read_scalars

    repo = Path(__file__).resolve().parents[1]
    out = _run(grpo_cli(tiny_demo, rules_judge.base_url, tmp_path, "--trainer.max_steps", "3"), cwd=repo)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    scalars = read_scalars(tmp_path / "demo-grpo")
    for tag in ("train/reward/mean", "train/rewards/tar/mean", "train/rewards/format/mean", "train/kl",
                "train/completions/mean_length", "train/time/rollout_s", "train/judge/requests"):
        assert len(scalars[tag]) == 3, (tag, sorted(scalars))
        assert all(math.isfinite(v) for _, v in scalars[tag])
    assert scalars["train/judge/failures"][-1][1] == 0
    final = tmp_path / "demo-grpo" / "hf" / "final"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()


def test_logged_completions_show_in_video_r2_inspect(tiny_demo, rules_judge, tmp_path):
    """Every logged step writes completions/step-N.json with TAR's reasons; `video-r2 inspect` reads it."""
    import json
    from pathlib import Path

    from test_inspect import Report

    from video_r2.inspect import inspect
    from video_r2.synthetic import Segment

    repo = Path(__file__).resolve().parents[1]
    out = _run(grpo_cli(tiny_demo, rules_judge.base_url, tmp_path, "--trainer.max_steps", "2",
                        "--model", "fixed_rollout.ThinkingRolloutGRPO"), cwd=repo, with_test_modules=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = sorted((tmp_path / "demo-grpo" / "completions").glob("step-*.json"))
    assert [p.name for p in logs] == ["step-000001.json", "step-000002.json"]
    log = json.loads(logs[-1].read_text())
    assert log["step"] == 2 and log["num_samples"] == 4  # 2 prompts x 2 completions
    records = {r["id"]: r for r in json.loads((tiny_demo / "data" / "video-r2-grpo-dataset.json").read_text())}
    for row in log["samples"]:
        assert row["completion"] == "<think>At 00:01 a red circle fills the screen, so the answer is A.</think><answer>A</answer>"
        record = records[row["id"].split(" #")[0]]
        assert row["video"] == record["video"]
        # TAR's reasons are the step's own: one claim at 00:01, matched iff a red circle fills the screen then.
        details = row["tar_details"]
        assert details["claims"] and [m["start"] for m in details["matches"]] == [1]
        at_one = next(Segment(**s) for s in record["segments"] if s["start"] <= 1 < s["end"])
        assert (details["matches"][0]["event"] is not None) == (at_one.name == "red circle")
        assert row["tar"] == details["reward"]
    report = Report()
    report.feed(inspect(logs[-1], num_samples=4).read_text())
    assert len(report.samples) == 4 and len(report.images) == 4  # frames found again from the log alone
    assert [s["rewards"]["tar"] for s in report.samples.values()] == [r["tar"] for r in log["samples"]]


TWO_PROCESS_STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    # FSDP2 (fully_shard in configure_model); generate and the vision encoders are registered FSDP methods
    "fsdp2": ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"],
}


@pytest.mark.parametrize("strategy", sorted(TWO_PROCESS_STRATEGIES))
def test_fit_cli_runs_grpo_on_two_processes(tiny_demo, rules_judge, tmp_path, strategy):
    """Every rank samples, scores and updates; under FSDP2 the ranks generate in lockstep (synced_gpus)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = grpo_cli(tiny_demo, rules_judge.base_url, tmp_path, "--trainer.max_steps", "2",
                    "--trainer.devices", "2", *TWO_PROCESS_STRATEGIES[strategy])
    out = _run(args, cwd=repo)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "demo-grpo" / "hf" / "final" / "model.safetensors").exists()


def half_missing_reward(completions, samples, context):
    """A reward that cannot be computed for every other completion (like TAR when the judge fails)."""
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def test_none_rewards_are_filled_from_their_group_not_zero(tiny_demo):
    _, history = train_token_reward(tiny_demo, 0, steps=2, reward_funcs=("half_missing", "chosen_token"))
    last = history[-1]
    assert last["train/rewards/half_missing/none_frac"] == 0.5
    assert last["train/rewards/half_missing/mean"] == 1.0  # the valid values only
    # Filled with the group mean (1.0), the missing reward moves no advantage: the total's spread is
    # the chosen-token reward's alone, as if half_missing were a constant.
    assert last["train/reward/mean"] == pytest.approx(1.0 + last["train/rewards/chosen_token/mean"], abs=1e-6)


def overflowing_reward(completions, samples, context):
    """A broken reward (inf), which makes the advantages, the loss and the gradients NaN."""
    return [float("inf")] * len(completions)


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_demo):
    """No optimizer step is taken on a non-finite loss, and 3 such updates in a row stop the run."""
    from video_r2.model import load_processor

    seed_everything(0)
    module = GRPOModule(backbone=ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_llm=False),
                        rollout=RolloutArgs(num_generations=2, max_completion_length=4), loss=LossArgs(beta=0.0),
                        rewards=RewardArgs(funcs=["overflowing"]), optim=OptimizerArgs(lr=1e-2),
                        log_completions_every=0, max_bad_steps=3)
    batch = text_prompts(load_processor(tiny_demo / "model"), 2)[0]
    loader = torch.utils.data.DataLoader(Repeat(batch, 10), batch_size=None)
    trainer = Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tempfile.mkdtemp(prefix="grpo-test-"))
    start = {}
    module.on_train_start = lambda: start.update({n: p.detach().clone() for n, p in module.model.named_parameters()})
    with pytest.raises(NonFiniteStepError, match="3 GRPO updates in a row"):
        trainer.fit(module, train_dataloaders=loader)
    assert module.bad_steps_total == 3
    assert all(torch.equal(p, start[n]) for n, p in module.model.named_parameters())  # never stepped


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tiny_demo, tmp_path):
    """8 steps in one go == 4 steps, a checkpoint, a fresh process's resume to 8: the same rewards and weights,
    each step logged once. Sampling draws from (seed, step, rank), so nothing else needs restoring."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from video_r2.model import load_processor
    from video_r2.plot import read_scalars

    batch = text_prompts(load_processor(tiny_demo / "model"), 2)[0]

    def module():
        return GRPOModule(backbone=ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_llm=False),
                          rollout=RolloutArgs(num_generations=4, max_completion_length=8, seed=7),
                          loss=LossArgs(beta=0.04), rewards=RewardArgs(funcs=["chosen_token"]),
                          optim=OptimizerArgs(lr=1e-2), export=None, log_completions_every=0)

    class Rewards(Callback):
        def __init__(self):
            self.values, self.lrs = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(trainer.callback_metrics["train/reward/mean"]))
            self.lrs.append(float(trainer.callback_metrics["train/lr"]))

    def fit(root, steps, ckpt=None, every=None):
        seed_everything(0)
        rewards = Rewards()
        callbacks = [rewards] + ([ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                                  filename="{step}")] if every else [])
        trainer = Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                          logger=TensorBoardLogger(root, name="tb", version=""), callbacks=callbacks, log_every_n_steps=1,
                          default_root_dir=str(root))
        m = module()
        trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None),
                    ckpt_path=ckpt)
        return m, rewards

    whole, whole_rewards = fit(tmp_path / "whole", 8)
    _, first = fit(tmp_path / "split", 8, every=4)  # runs on; only its step-4 checkpoint is used
    resumed, rest = fit(tmp_path / "resumed", 8, ckpt=str(tmp_path / "split" / "ckpt" / "step=4.ckpt"))
    assert first.values[:4] == whole_rewards.values[:4]
    assert rest.values == whole_rewards.values[4:]
    assert rest.lrs == whole_rewards.lrs[4:]
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    steps = [s for s, _ in read_scalars(tmp_path / "resumed" / "tb")["train/reward/mean"]]
    assert len(steps) == len(set(steps)) == 4, steps  # each resumed step logged once


def test_resuming_with_more_steps_continues_at_the_new_schedules_rate(tiny_demo, tmp_path):
    """A run that ended (lr 0 at the end of its cosine) resumed with a larger max_steps does not take a step at
    lr 0: the rate of its first new step is the new schedule's."""
    from lightning.pytorch.callbacks import Callback

    from video_r2.model import load_processor
    from video_r2.stage import warmup_cosine

    batch = text_prompts(load_processor(tiny_demo / "model"), 2)[0]
    lrs = []

    class Lr(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lrs.append(float(trainer.callback_metrics["train/lr"]))

    def fit(steps, ckpt=None):
        trainer = Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                          logger=False, callbacks=[Lr()], default_root_dir=str(tmp_path))
        trainer.fit(GRPOModule(backbone=ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_llm=False),
                               rollout=RolloutArgs(num_generations=2, max_completion_length=4),
                               loss=LossArgs(beta=0.0), rewards=RewardArgs(funcs=["chosen_token"]),
                               optim=OptimizerArgs(lr=1e-3), log_completions_every=0),
                    train_dataloaders=torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None),
                    ckpt_path=ckpt)
        return trainer

    first = fit(2)
    first.save_checkpoint(tmp_path / "end.ckpt")
    fit(4, ckpt=str(tmp_path / "end.ckpt"))
    assert lrs[2] == pytest.approx(1e-3 * warmup_cosine(2, 0, 4)) and lrs[2] > 0


GROUP_LAYOUTS = {
    # name: (processes, ranks_per_group, strategy arguments)
    "one_process": (1, 1, []),
    "ddp_shared_group": (2, 2, ["--trainer.strategy", "ddp"]),
    "fsdp2_shared_group": (2, 2, ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                                  "--trainer.strategy.data_parallel_size", "2",
                                  "--trainer.strategy.tensor_parallel_size", "1"]),
}


def test_a_group_spanning_two_ranks_makes_the_update_of_one_process_holding_it(tiny_demo, tmp_path):
    """1 prompt x 4 completions per step: one process holding the group, or 2 ranks with 2 completions each
    (DDP, FSDP2). The rewards are gathered, so the advantages and the first update are the same."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    data = tiny_demo / "data"
    one = tmp_path / "one-record.json"
    one.write_text(json.dumps(json.loads((data / "video-r2-grpo-dataset.json").read_text())[:1]))
    weights = {}
    for name, (devices, ranks_per_group, strategy) in GROUP_LAYOUTS.items():
        root = tmp_path / name
        args = grpo_cli(tiny_demo, "http://127.0.0.1:9/v1", root, "--trainer.max_steps", "1",
                        "--trainer.devices", str(devices), *strategy,
                        "--model", "fixed_rollout.FixedRolloutGRPO",
                        "--model.init_args.rollout.num_generations", "4",
                        "--model.init_args.rollout.ranks_per_group", str(ranks_per_group),
                        "--model.init_args.rollout.max_completion_length", "8",
                        "--model.init_args.rewards.funcs", "[format]", "--model.init_args.rewards.weights", "[1.0]",
                        "--model.init_args.optim.lr", "1e-3", "--model.init_args.export.on_checkpoint", "false",
                        "--data.data_path", str(one), "--data.batch_size", "1",
                        "--data.ranks_per_group", str(ranks_per_group))
        out = _run(args, cwd=repo, with_test_modules=True)
        assert out.returncode == 0, name + "\n" + out.stdout[-3000:] + out.stderr[-3000:]
        weights[name] = load_file(root / "demo-grpo" / "hf" / "final" / "model.safetensors")
    from video_r2.model import load_model

    start = load_model(tiny_demo / "model").state_dict()  # the names the export writes
    reference = weights["one_process"]
    shared = start.keys() & reference.keys()
    assert len(shared) == len(reference), sorted(reference.keys() - start.keys())[:5]
    step = max((reference[k] - start[k]).abs().max().item() for k in shared)
    assert step > 5e-4  # Adam's first step moves weights by up to lr = 1e-3
    # Equal up to float summation order: 6e-6 measured, where an advantage or normaliser taken over half a
    # group would move weights by a sizeable part of the step.
    for name in ("ddp_shared_group", "fsdp2_shared_group"):
        for key, value in reference.items():
            torch.testing.assert_close(weights[name][key], value, atol=2e-5, rtol=0,
                                       msg=lambda message, name=name, key=key: f"{name}, {key}: {message}")


def test_a_judge_outage_stops_grpo_with_a_resumable_checkpoint_and_the_command(tiny_demo, tmp_path):
    """The judge is down (nothing listens on its port): the run stops with the URL, after writing
    checkpoints/on_exception.ckpt and saying how to resume from it."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # Completions that reason with a time, so TAR must ask the judge.
    out = _run(grpo_cli(tiny_demo, "http://127.0.0.1:9/v1", tmp_path, "--trainer.max_steps", "3",
                        "--model", "fixed_rollout.ThinkingRolloutGRPO",
                        "--model.init_args.judge.init_args.retries", "0"), cwd=repo, with_test_modules=True)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "127.0.0.1:9" in text  # the error names the judge's URL
    ckpt = tmp_path / "demo-grpo" / "checkpoints" / "on_exception.ckpt"
    assert ckpt.exists(), text[-3000:]
    assert f"--ckpt_path {ckpt}" in text
