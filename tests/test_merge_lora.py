"""`video-r2 merge-lora`: merged logits equal base + adapter, for our export and for a plain PEFT adapter;
refusals of adapters that do not fit and of a non-empty output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


def video_batch(demo: Path) -> dict:
    """Two real samples (video + text) from the data pipeline, as model inputs."""
    from video_r2.data import Sampling, VideoDataModule

    dm = VideoDataModule(
        data_path=str(demo / "data" / "video-r2-sft-dataset.json"), video_folder=str(demo / "data" / "videos"),
        processor_path=str(demo / "model"), stage="sft",
        sampling=Sampling(fps=2.0, max_frames=16, video_min_pixels=56 * 56, video_max_pixels=56 * 56),
    )
    dm.setup("fit")
    batch = dm.collator()([dm.train_dataset[0], dm.train_dataset[1]])
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


def perturb_(tensors, seed: int) -> None:
    """Stand-in for training: move the (zero-initialised) LoRA B and the trained weights away from init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(0.05 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def batch(tiny_demo):
    return video_batch(tiny_demo)


@pytest.fixture(scope="module")
def our_export(tiny_demo, tmp_path_factory):
    """An SFT export with an adapter and a trained merger, and the in-memory model that wrote it."""
    from video_r2 import model as vm

    config = vm.ModelConfig(name_or_path=str(tiny_demo / "model"), freeze_merger=False)
    model = vm.build_model(config, vm.LoraConfigArgs(r=4, alpha=8, dropout=0.0))
    perturb_([p for _, p in model.named_parameters() if p.requires_grad], seed=0)
    out = tmp_path_factory.mktemp("export") / "hf"
    vm.export_hf(model, vm.load_processor(tiny_demo / "model"), out)
    return out, model


def test_export_layout(our_export):
    out, _ = our_export
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file

    non_lora = load_file(out / "non_lora_trainables.safetensors")
    assert non_lora and all(k.startswith("model.visual.merger.") for k in non_lora)


def test_merge_our_export_equals_base_plus_adapter(tiny_demo, our_export, batch, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from video_r2.cli import main

    export, trained = our_export
    merged_dir = tmp_path / "merged"
    # The real command line, flags with dashes as the seed's script spells them.
    main(["merge-lora", "--base-model", str(tiny_demo / "model"), "--lora-model", str(export),
          "--output-dir", str(merged_dir)])
    assert "next:" in capsys.readouterr().out
    assert list(merged_dir.glob("*.safetensors")) and not list(merged_dir.glob("*.bin"))
    AutoProcessor.from_pretrained(merged_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diff = (logits(merged, batch) - logits(trained, batch)).abs().max().item()
    assert diff <= 1e-4, diff


def test_merge_adapter_saved_by_peft(tiny_demo, batch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from video_r2.merge_lora import merge_lora

    base = AutoModelForImageTextToText.from_pretrained(tiny_demo / "model", dtype=torch.float32)
    # init_lora_weights=False: random A and B, so the adapter changes the logits.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]

    merge_lora(str(tiny_demo / "model"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    reference = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_demo / "model", dtype=torch.float32), tmp_path / "adapter")
    base_only = AutoModelForImageTextToText.from_pretrained(tiny_demo / "model", dtype=torch.float32)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    expected = logits(reference, batch)
    assert (expected - logits(base_only, batch)).abs().max() > 1e-3  # the adapter does something
    diff = (logits(merged, batch) - expected).abs().max().item()
    assert diff <= 1e-4, diff


def test_refuses_adapter_of_another_shape(tiny_demo, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from video_r2.merge_lora import AdapterMismatchError, merge_lora
    from video_r2.synthetic import build_model

    torch.manual_seed(1)
    other = build_model(AutoTokenizer.from_pretrained(tiny_demo / "model"), text_hidden=32, text_layers=2,
                        vision_hidden=32, vision_depth=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    get_peft_model(other, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match=r"does not fit .* \(shape mismatch\)") as err:
        merge_lora(str(tiny_demo / "model"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert "layers.0.self_attn.q_proj.lora_A.weight: adapter (4, 32) vs base (4, 64)" in str(err.value)
    assert not (tmp_path / "merged").exists()


def test_refuses_adapter_whose_targets_are_missing(tiny_demo, our_export, tmp_path):
    from video_r2.merge_lora import AdapterMismatchError, merge_lora

    export, _ = our_export
    bad = tmp_path / "adapter"
    shutil.copytree(export, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_fused_proj"]  # a module this architecture does not have
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="qkv_fused_proj"):
        merge_lora(str(tiny_demo / "model"), str(bad), str(tmp_path / "merged"))

    # Weights for modules the config no longer targets: named as unexpected.
    config["target_modules"] = r".*language_model.*\.(q_proj)"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="base does not have.*(k_proj|v_proj|o_proj|mlp)"):
        merge_lora(str(tiny_demo / "model"), str(bad), str(tmp_path / "merged"))


def test_refuses_non_lora_weights_that_do_not_fit(tiny_demo, our_export, tmp_path):
    from safetensors.torch import save_file

    from video_r2.merge_lora import AdapterMismatchError, merge_lora

    export, _ = our_export
    bad = tmp_path / "adapter"
    shutil.copytree(export, bad)
    save_file({"model.visual.merger.mlp.0.weight": torch.zeros(3, 3)}, bad / "non_lora_trainables.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"merger\.mlp\.0\.weight: \(3, 3\)"):
        merge_lora(str(tiny_demo / "model"), str(bad), str(tmp_path / "merged"))


def test_refuses_a_directory_without_adapter(tiny_demo, tmp_path):
    from video_r2.merge_lora import merge_lora

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora(str(tiny_demo / "model"), str(tmp_path / "empty"), str(tmp_path / "merged"))


def test_refuses_non_empty_output_dir_without_overwrite(tiny_demo, our_export, tmp_path):
    from video_r2.merge_lora import merge_lora

    export, _ = our_export
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_lora(str(tiny_demo / "model"), str(export), str(out))
    assert (out / "keep.txt").read_text() == "user data"
    merge_lora(str(tiny_demo / "model"), str(export), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_merge_lora_help(capsys):
    from video_r2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["merge-lora", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--base_model", "--lora_model", "--output_dir", "--overwrite"))


@pytest.mark.parametrize("where", ["adapter", "inside_adapter", "parent_of_base", "base"])
def test_refuses_output_that_overlaps_an_input_even_with_overwrite(tiny_demo, our_export, tmp_path, where):
    from video_r2.merge_lora import merge_lora

    export, _ = our_export
    adapter, base = tmp_path / "adapter", tmp_path / "inputs" / "base"
    shutil.copytree(export, adapter)
    shutil.copytree(tiny_demo / "model", base)
    out = {"adapter": adapter, "inside_adapter": adapter / "merged", "parent_of_base": base.parent,
           "base": base}[where]
    before = {p: p.read_bytes() for p in [*adapter.rglob("*"), *base.rglob("*")] if p.is_file()}
    with pytest.raises(ValueError, match="overlaps the .* directory .* Choose a separate --output_dir"):
        merge_lora(str(base), str(adapter), str(out), overwrite=True)
    assert {p: p.read_bytes() for p in before} == before  # every input file is still there, unchanged


def test_refuses_to_write_a_non_finite_merge(tiny_demo, our_export, tmp_path):
    from safetensors.torch import load_file, save_file

    from video_r2.merge_lora import NonFiniteWeightsError, merge_lora

    export, _ = our_export
    bad = tmp_path / "adapter"
    shutil.copytree(export, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))  # what a diverged SFT run exports
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(NonFiniteWeightsError, match=r"merging .* NaN/inf .*lower the learning rate"):
        merge_lora(str(tiny_demo / "model"), str(bad), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
