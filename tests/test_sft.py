"""Stage 1 (SFT): model.py helpers, SFTModule, the configs, checkpoints and distribution, on the tiny demo.

Run as a script (`python tests/test_sft.py --dist MODE DEMO OUT`) it is the body of the 2-process tests:
Lightning's own launcher starts the second process by running this file again.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def data_module(demo: Path, batch_size: int = 2):
    """The real data pipeline on the tiny demo, sized like configs/demo/sft.yaml (16 frames at 2 fps)."""
    from video_r2.data import Sampling, VideoDataModule

    dm = VideoDataModule(
        data_path=str(demo / "data" / "video-r2-sft-dataset.json"), video_folder=str(demo / "data" / "videos"),
        subtitles_folder=str(demo / "data" / "subtitles"), processor_path=str(demo / "model"), stage="sft",
        sampling=Sampling(fps=2.0, max_frames=16, video_min_pixels=56 * 56, video_max_pixels=56 * 56), batch_size=batch_size,
    )
    dm.setup("fit")
    return dm


def equal_length_items(dm, n: int) -> list[dict]:
    """n samples with the same number of answer tokens, so that a mean over each rank's tokens averaged over
    ranks equals the mean over all tokens (what the 1-process run computes)."""
    items = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    counts = [int((it["labels"] != -100).sum()) for it in items]
    common = max(set(counts), key=counts.count)
    chosen = [it for it, c in zip(items, counts) if c == common][:n]
    assert len(chosen) == n, f"need {n} samples with equal answer lengths, got counts {counts}"
    return chosen


def sft_module(demo: Path, lora: bool, lr: float = 1e-5, export_dir: str | None = None, min_lr_ratio: float = 0.0,
               warmup_ratio: float = 0.0, **kwargs):
    from video_r2.model import LoraConfigArgs, ModelConfig
    from video_r2.sft import SFTModule
    from video_r2.stage import ExportArgs, OptimizerArgs

    # LoRA: adapter + a trained merger (both export paths); else full fine-tuning, as the demo config.
    backbone = ModelConfig(name_or_path=str(demo / "model"), freeze_vision_tower=lora, freeze_merger=False,
                           freeze_llm=lora)
    adapter = LoraConfigArgs(r=4, alpha=8, dropout=0.0) if lora else None
    return SFTModule(backbone=backbone, lora=adapter, optim=OptimizerArgs(lr=lr, min_lr_ratio=min_lr_ratio, warmup_ratio=warmup_ratio),
                     export=ExportArgs(dir=export_dir, on_checkpoint=False), **kwargs)


def quiet_trainer(tmp_path: Path, **kwargs):
    import lightning as L

    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kwargs)


def recorder():
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self):
            self.losses, self.lrs, self.start = [], [], None

        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            self.start = {
                "step": trainer.global_step,
                "lrs": [g["lr"] for g in opt.param_groups],
                "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                          for k, s in opt.state_dict()["state"].items()},
            }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    return Recorder()


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------------------------------
# model.py
# --------------------------------------------------------------------------------------------------


def test_lora_targets_the_language_model_only(tiny_demo):
    from video_r2 import model as vm

    model = vm.build_model(vm.ModelConfig(name_or_path=str(tiny_demo / "model")), vm.LoraConfigArgs(r=4, alpha=8))
    lora_modules = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora_modules and all(".language_model.layers." in n for n in lora_modules)
    assert len(lora_modules) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(vm.is_lora_name(n) for n in trainable)  # everything else frozen

    with_vision = vm.apply_lora(vm.load_model(tiny_demo / "model"), r=4, alpha=8, lora_vision=True)
    names = {n for n, _ in with_vision.named_parameters() if ".lora_A." in n}
    assert any(".visual.blocks." in n for n in names)
    assert not any("merger" in n or "lm_head" in n or "embed_tokens" in n for n in names)


def test_param_groups_lrs_and_no_decay(tiny_demo):
    from video_r2 import model as vm

    config = vm.ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_vision_tower=False, freeze_merger=False,
                            freeze_llm=False)
    model = vm.build_model(config, None)
    groups = {g["name"]: g for g in vm.param_groups(model, lr=1e-3, vision_lr=2e-4, merger_lr=5e-4, weight_decay=0.1)}
    assert set(groups) == {"llm", "llm_no_decay", "merger", "merger_no_decay", "vision", "vision_no_decay"}
    assert [groups[k]["lr"] for k in ("llm", "merger", "vision")] == [1e-3, 5e-4, 2e-4]
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        for p in group["params"]:
            decays = group["weight_decay"] > 0
            is_norm_or_bias = names[id(p)].endswith(".bias") or "norm" in names[id(p)] or "ln_q" in names[id(p)]
            assert decays != is_norm_or_bias, (name, names[id(p)])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_flash_attention_without_package_says_how_to_install(tiny_demo, monkeypatch):
    import importlib.util

    from video_r2 import model as vm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install video-r2\[gpu\]"):
        vm.load_model(tiny_demo / "model", attn_implementation="flash_attention_2")


def test_warmup_cosine_schedule():
    from video_r2.stage import warmup_cosine

    f = [warmup_cosine(s, warmup_steps=3, total_steps=13) for s in range(13)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[3] == pytest.approx(1.0) and f[8] == pytest.approx(0.5) and f[12] == pytest.approx(0.0239, abs=1e-3)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert warmup_cosine(100, 0, 10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_wrap_classes_are_the_qwen_blocks():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q

    from video_r2 import model as vm

    assert vm.decoder_layer_classes() == {q.Qwen2_5_VLDecoderLayer, q.Qwen2_5_VLVisionBlock}
    assert vm.fsdp_wrap_policy()._module_classes == vm.decoder_layer_classes()


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["configs/sft.yaml", "configs/demo/sft.yaml"])
def test_every_config_key_has_a_comment(config):
    for number, line in enumerate((REPO / config).read_text().splitlines(), 1):
        if re.match(r"^\s*(- )?[A-Za-z_][\w.]*:", line):
            assert "#" in line, f"{config}:{number} has no comment: {line.strip()}"


def test_recipe_config_values():
    cfg = yaml.safe_load((REPO / "configs/sft.yaml").read_text())
    t, m, d = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]
    assert t["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert t["devices"] * t["accumulate_grad_batches"] * d["batch_size"] == 32 and t["devices"] == 8
    assert t["precision"].startswith("bf16") and t["max_epochs"] == 1
    assert m["backbone"]["name_or_path"] == d["processor_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert all(m["backbone"][k] for k in ("freeze_vision_tower", "freeze_merger", "freeze_llm"))
    assert (m["lora"]["r"], m["lora"]["alpha"], m["lora"]["dropout"]) == (64, 64, 0.05)
    o = m["optim"]
    assert (o["lr"], o["merger_lr"], o["vision_lr"], o["weight_decay"], o["warmup_ratio"]) == (1e-5, 1e-5, 2e-6, 0.1, 0.03)
    assert (d["sampling"]["fps"], d["sampling"]["max_frames"], d["sampling"]["video_max_pixels"]) == (1.0, 128, 360 * 420)
    assert d["draw_timestamps"] and d["draw_subtitles"]
    assert "TensorBoardLogger" in t["logger"]["class_path"]


def test_recipe_strategy_parses_to_the_qwen_wrap_classes():
    """jsonargparse turns the YAML's class names into the classes FSDP wraps (no GPU or model needed)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from video_r2.model import decoder_layer_classes

    cfg = yaml.safe_load((REPO / "configs/sft.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": cfg})).strategy
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == decoder_layer_classes()
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == decoder_layer_classes()


def test_print_config_validates_the_recipe_without_building_anything():
    out = subprocess.run([PYTHON, "-m", "video_r2.cli", "fit", "--config", "configs/sft.yaml", "--print_config"],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["init_args"]["backbone"]["name_or_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert "Loading weights" not in out.stderr + out.stdout  # nothing was loaded (and HF_HUB_OFFLINE=1)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def test_answer_loss_is_the_models_own_loss_and_gradient(tiny_demo):
    """The LM head runs only where an answer token is predicted, yet loss and gradients are the full loss's."""
    from video_r2.model import load_model
    from video_r2.sft import answer_loss, model_inputs

    dm = data_module(tiny_demo, batch_size=3)
    batch = dm.collator()([dm.train_dataset[i] for i in range(3)])  # different lengths: right padding
    model = load_model(tiny_demo / "model").float()
    full = model(**model_inputs(batch)).loss
    full_grads = torch.autograd.grad(full, [model.lm_head.weight, model.model.language_model.embed_tokens.weight])
    ours = answer_loss(model, batch)
    our_grads = torch.autograd.grad(ours, [model.lm_head.weight, model.model.language_model.embed_tokens.weight])
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    labels = batch["labels"]
    assert 0 < int((labels != -100).sum()) < labels.numel() / 2  # the test has positions to skip


def test_loss_halves_in_20_steps_on_one_repeated_batch(tiny_demo, tmp_path):
    dm = data_module(tiny_demo)
    batch = dm.collator()([dm.train_dataset[i] for i in range(2)])
    batch.pop("num_skipped")
    module = sft_module(tiny_demo, lora=False, lr=5e-3, min_lr_ratio=1.0)  # constant lr: 20 steps, no decay
    rec = recorder()
    trainer = quiet_trainer(tmp_path, max_steps=20, callbacks=[rec])
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 20, batch_size=None))
    assert len(rec.losses) == 20 and all(map(torch.isfinite, torch.tensor(rec.losses)))
    assert rec.losses[-1] <= 0.5 * rec.losses[0], rec.losses


def test_resume_continues_step_optimizer_state_and_lr(tiny_demo, tmp_path):
    """LoRA + a trained merger, so the checkpoint holds only trainable weights and the rest is reloaded."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = data_module(tiny_demo, batch_size=2)
    collate = dm.collator()
    items = [dm.train_dataset[i] for i in range(6)]
    loader = lambda: torch.utils.data.DataLoader(items, batch_size=2, shuffle=False, collate_fn=collate)  # noqa: E731

    # Run A: 6 steps (2 epochs of 3 batches), checkpoint at step 3 = the end of epoch 1.
    ckpt_dir = tmp_path / "ckpt"
    rec_a = recorder()
    trainer = quiet_trainer(tmp_path / "a", max_steps=6, callbacks=[rec_a, ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")], enable_checkpointing=True)
    trainer.fit(sft_module(tiny_demo, lora=True, lr=1e-2, warmup_ratio=0.5), loader())
    ckpt_path = ckpt_dir / "step=3.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")  # plain tensors and primitives only
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"] and all("lora_" in k or "visual.merger" in k for k in ckpt["state_dict"])

    # Run B: a fresh module resumed from step 3 (Lightning's own loading: torch.load with weights_only=True).
    rec_b = recorder()
    trainer = quiet_trainer(tmp_path / "b", max_steps=6, callbacks=[rec_b])
    trainer.fit(sft_module(tiny_demo, lora=True, lr=1e-2, warmup_ratio=0.5), loader(), ckpt_path=str(ckpt_path))
    assert rec_b.start["step"] == 3
    assert rec_b.start["lrs"] == pytest.approx(ckpt["lr_schedulers"][0]["_last_lr"])
    saved_state = ckpt["optimizer_states"][0]["state"]
    assert saved_state.keys() == rec_b.start["state"].keys()
    for key, state in saved_state.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(rec_b.start["state"][key][name])), (key, name)
    # Same weights, moments, lr and data: the resumed steps 4-6 repeat run A's.
    assert rec_b.losses == pytest.approx(rec_a.losses[3:], abs=1e-6)
    assert rec_b.lrs == pytest.approx(rec_a.lrs[3:])


@pytest.mark.slow
def test_fit_cli_writes_tensorboard_and_hf_export_then_resumes(tiny_demo, tmp_path):
    """`video-r2 fit --config configs/demo/sft.yaml --trainer.max_steps 5`, then `--ckpt_path` from step 3."""
    runs = tmp_path / "runs"
    data = tiny_demo / "data"
    common = [
        PYTHON, "-m", "video_r2.cli", "fit", "--config", str(REPO / "configs/demo/sft.yaml"),
        "--model.init_args.backbone.name_or_path", str(tiny_demo / "model"),
        "--data.processor_path", str(tiny_demo / "model"),
        "--data.data_path", str(data / "video-r2-sft-dataset.json"), "--data.video_folder", str(data / "videos"),
        "--data.subtitles_folder", str(data / "subtitles"),
        "--data.val_data_path", str(data / "video-r2-eval-dataset.json"),
        "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs),
        "--trainer.log_every_n_steps", "1", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "1", "--trainer.callbacks.init_args.every_n_train_steps", "3",
        "--trainer.val_check_interval", "2",  # the epoch (32 records) is longer than the run
    ]
    out = subprocess.run(common + ["--trainer.max_steps", "5", "--trainer.logger.init_args.version", "first"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    version = runs / "demo-sft" / "first"
    scalars = tb_scalars(version)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2, 3, 4]
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"])

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from video_r2.merge_lora import merge_lora

    # The demo config trains a LoRA adapter and (the random model being worth nothing frozen) the base weights.
    final = version / "hf" / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors"):
        assert (final / name).is_file(), name
    assert (version / "hf" / "step-3" / "adapter_model.safetensors").is_file()  # exported with the step-3 checkpoint
    merge_lora(str(tiny_demo / "model"), str(final), str(tmp_path / "merged"))
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    base = AutoModelForImageTextToText.from_pretrained(tiny_demo / "model")
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)
    AutoProcessor.from_pretrained(final)

    ckpt = next((version / "checkpoints").glob("*step=3.ckpt"))
    out = subprocess.run(common + ["--trainer.max_steps", "5", "--ckpt_path", str(ckpt),
                                   "--trainer.logger.init_args.version", "resumed"], cwd=tmp_path,
                         env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    resumed = tb_scalars(runs / "demo-sft" / "resumed")
    assert [s for s, _ in resumed["train/loss"]] == [3, 4]  # continues at global step 3


# --------------------------------------------------------------------------------------------------
# distribution: 1 process vs 2-process DDP vs 2-process FSDP2, same 4 samples
# --------------------------------------------------------------------------------------------------


def _dist_main(mode: str, demo: Path, out: Path) -> None:
    """2 optimizer steps over the same 4 samples: 1 process x batch 2, or 2 processes x batch 1."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    L.seed_everything(0)
    dm = data_module(demo)
    items = equal_length_items(dm, 4)
    world = 1 if mode == "single" else 2
    strategy = {
        "single": "auto",
        "ddp": DDPStrategy(process_group_backend="gloo"),
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[mode]
    losses: list[float] = []
    sharded: list[bool] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
            sharded.append(any(type(p).__name__ == "DTensor" for p in pl_module.model.parameters()))

    module = sft_module(demo, lora=True, lr=1e-2, export_dir=str(out / "hf"))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record()], default_root_dir=str(out))
    loader = torch.utils.data.DataLoader(items, batch_size=2 // world, shuffle=False, collate_fn=dm.collator())
    trainer.fit(module, loader)
    if trainer.global_rank == 0:
        (out / "losses.json").write_text(json.dumps({"losses": losses, "sharded": all(sharded)}))


def _run_dist(mode: str, demo: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([PYTHON, __file__, "--dist", mode, str(demo), str(out)], cwd=out, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{mode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process(tiny_demo, tmp_path):
    from safetensors.torch import load_file

    runs = {mode: _run_dist(mode, tiny_demo, tmp_path / mode) for mode in ("single", "ddp", "fsdp2")}
    single, ddp, fsdp2 = (runs[m]["losses"] for m in ("single", "ddp", "fsdp2"))
    assert len(single) == 2 and single[0] != single[1]
    assert runs["fsdp2"]["sharded"] and not runs["ddp"]["sharded"]  # FSDP2 really holds DTensor shards
    assert ddp == pytest.approx(single, abs=1e-5)  # step 1: same loss; step 2: same averaged update
    assert fsdp2 == pytest.approx(single, abs=1e-5)
    # The HF export gathers the sharded FSDP2 weights into the same adapter the single process wrote.
    reference = load_file(tmp_path / "single" / "hf" / "adapter_model.safetensors")
    for mode in ("ddp", "fsdp2"):
        exported = load_file(tmp_path / mode / "hf" / "adapter_model.safetensors")
        assert exported.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.allclose(exported[key], value, atol=1e-5), (mode, key)
        assert (tmp_path / mode / "hf" / "non_lora_trainables.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy needs a CUDA GPU")
def test_fsdp_strategy_on_gpu(tiny_demo, tmp_path):
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    from video_r2.model import decoder_layer_classes

    dm = data_module(tiny_demo)
    strategy = FSDPStrategy(auto_wrap_policy=decoder_layer_classes(),
                            activation_checkpointing_policy=decoder_layer_classes())
    rec = recorder()
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=3,
                        logger=False, enable_checkpointing=False, callbacks=[rec], default_root_dir=str(tmp_path))
    trainer.fit(sft_module(tiny_demo, lora=True, lr=1e-2, export_dir=str(tmp_path / "hf")), dm.train_dataloader())
    assert len(rec.losses) == 3 and all(map(torch.isfinite, torch.tensor(rec.losses)))
    assert (tmp_path / "hf" / "adapter_model.safetensors").is_file()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--dist":
    _dist_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
