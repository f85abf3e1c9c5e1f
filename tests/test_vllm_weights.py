"""What the vLLM rollout engine is sent and fed, checked without vLLM (so in the main `make test`).

`hf_weights` (HF names, LoRA merged, one layer per chunk, FSDP2 gathered), `collapse_runs` (vision
placeholders as vLLM expects them) and `logp_gap`. The engine itself is tested in tests/test_vllm.py.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from video_r2.grpo.vllm_engine import collapse_runs, logp_gap
from video_r2.grpo.weights import hf_weights
from video_r2.model import apply_lora, load_model


def test_hf_weight_names_cover_the_checkpoint(tiny_demo):
    """Every tensor of the checkpoint is pushed once, under its HF name, never two decoder layers in a chunk."""
    model = load_model(tiny_demo / "model")
    chunks = list(hf_weights(model, trainable_only=False))
    names = [n for chunk in chunks for n, _ in chunk]
    assert sorted(names) == sorted(model.state_dict())
    layers = [{n.split(".layers.")[1].split(".")[0] for n, _ in c if ".layers." in n} for c in chunks]
    assert all(len(ids) <= 1 for ids in layers)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    assert [n for chunk in hf_weights(model, trainable_only=True) for n, _ in chunk] == ["lm_head.weight"]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_is_merged_on_the_fly_as_peft_merges_it(tiny_demo, use_dora):
    model = apply_lora(load_model(tiny_demo / "model"), r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = {n: t.clone() for chunk in hf_weights(model, trainable_only=True) for n, t in chunk}
    assert ours and all("lora" not in n and "base_layer" not in n for n in ours)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the policy is left as it was
    reference = model.merge_and_unload().state_dict()
    assert len(ours) == 2 * 7  # 2 layers x 7 adapted projections: only what can change is sent
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-5)


def test_collapse_runs_leaves_one_placeholder_per_video():
    ids = torch.tensor([5, 7, 9, 9, 9, 8, 6, 7, 9, 9, 8, 1])
    types = torch.tensor([0, 0, 2, 2, 2, 0, 0, 0, 2, 2, 0, 0])
    assert collapse_runs(ids, types) == [5, 7, 9, 8, 6, 7, 9, 8, 1]
    assert collapse_runs(ids, torch.zeros_like(ids)) == ids.tolist()
    assert collapse_runs(ids, None) == ids.tolist()


def test_logp_gap_counts_only_masked_tokens():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    policy = torch.tensor([[-1.1, -2.0, -9.0], [-1.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    gap = logp_gap(engine, policy, mask)
    assert gap["vllm/logp_gap_max"] == pytest.approx(0.3)
    assert gap["vllm/logp_gap_mean"] == pytest.approx(0.4 / 3)


def _on_two_ranks(worker, tiny_demo, tmp_path) -> None:
    """Run `worker(rank, 2, port, model path, out)` on two gloo ranks; rank 0 writes "ok" when it passed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ok"
    mp.start_processes(worker, args=(2, port, str(tiny_demo / "model"), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    assert out.read_text() == "ok"


# ---- FSDP2: every rank gathers one layer at a time and gets the whole model's tensors ----------------------


def _fsdp2_worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from video_r2.model import fully_shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(path)
        full = {n: t.clone() for n, t in model.state_dict().items()}
        fully_shard_model(model, init_device_mesh("cpu", (world,)))
        assert any(hasattr(p, "full_tensor") for p in model.parameters())  # really sharded
        biggest, seen = 0, {}
        for chunk in hf_weights(model, trainable_only=False):
            biggest = max(biggest, sum(t.numel() for _, t in chunk))
            seen.update(chunk)
        assert sorted(seen) == sorted(full)
        for name, tensor in seen.items():
            assert not hasattr(tensor, "full_tensor") and torch.equal(tensor, full[name]), name
        # A chunk is at most one layer or one group of small tensors, never the model.
        assert biggest < sum(t.numel() for t in full.values()) / 2
        if rank == 0:
            open(out, "w").write("ok")
    finally:
        dist.destroy_process_group()


def test_hf_weights_under_fsdp2_gather_layer_by_layer(tiny_demo, tmp_path):
    _on_two_ranks(_fsdp2_worker, tiny_demo, tmp_path)


# ---- FSDP1: each unit unsharded on its own, as Lightning's FSDPStrategy wraps the LightningModule -------------


def _fsdp1_worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from video_r2.model import LoraConfigArgs, ModelConfig, build_model, fsdp_wrap_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name_or_path=path, attn_implementation="sdpa"),
                            LoraConfigArgs(r=4, alpha=8, dropout=0.0), dtype=torch.float32)
        with torch.no_grad():  # adapters that are not zero, so the merge shows
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        expected = {n: t.clone() for chunk in hf_weights(model, trainable_only=False) for n, t in chunk}
        expected_trainable = [n for chunk in hf_weights(model, trainable_only=True) for n, _ in chunk]

        class Holder(torch.nn.Module):  # Lightning's FSDP1 root wraps the LightningModule, which holds the model
            def __init__(self, inner):
                super().__init__()
                self.model = inner

        root = FSDP(Holder(model), auto_wrap_policy=fsdp_wrap_policy(), device_id=torch.device("cpu"),
                    use_orig_params=True)
        inner = root.model
        assert any(p.ndim == 1 and "weight" in n and "norm" not in n for n, p in inner.named_parameters())  # sharded
        biggest, seen = 0, {}
        for chunk in hf_weights(inner, trainable_only=False, fsdp_root=root):
            biggest = max(biggest, sum(t.numel() for _, t in chunk))
            seen.update(chunk)
        assert sorted(seen) == sorted(expected), sorted(set(seen) ^ set(expected))
        for name, tensor in seen.items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
        assert biggest < sum(t.numel() for t in expected.values()) / 2  # never the whole model at once
        trainable = [n for chunk in hf_weights(inner, trainable_only=True, fsdp_root=root) for n, _ in chunk]
        assert sorted(trainable) == sorted(expected_trainable)
        if rank == 0:
            open(out, "w").write("ok")
    finally:
        dist.destroy_process_group()


def test_hf_weights_under_fsdp1_unshard_one_unit_at_a_time(tiny_demo, tmp_path):
    _on_two_ranks(_fsdp1_worker, tiny_demo, tmp_path)
