"""The GPU check: a few SFT and GRPO steps of a 1-3B Qwen2.5-VL under Lightning's FSDPStrategy, bf16.

    python benchmarks/gpu_check.py                 # on one H100/H200 (about 5 minutes)
    python benchmarks/gpu_check.py --tiny --cpu    # the same code path on a CPU, to check the script itself

On the lent GPU machine (device tool), whose image has transformers 5.17 but no jsonargparse, litserve or
torchcodec: carry the transformers wheel this project pins (`pip download --no-deps transformers==5.24.0
-d .whl`, see the device README) and run `pip install --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py`. Nothing here needs FFmpeg.

The model is a real Qwen2.5-VL architecture scaled down (`--size 2b`: the 3B text stack at 1.5B-width with
the full 32-block vision tower), randomly initialised, so nothing is downloaded. Its tokenizer is the demo's
byte-level BPE, with the embedding table padded to Qwen's 151,936 rows so the lm_head costs what it does in
the real model. The inputs are 32 frames at the recipe's 360*420 pixel budget, built in memory (no FFmpeg
needed on the GPU machine). It prints, per stage, step time, tokens/s, peak GPU memory and model FLOPs
utilisation (6 * parameters * tokens per step, over the chip's dense bf16 peak), and writes
benchmarks/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout, installed or not

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per chip
SIZES = {
    # text: hidden, layers, heads, kv heads, intermediate; vision: depth, hidden, heads, intermediate
    "2b": dict(text=(1536, 28, 12, 2, 8960), vision=(32, 1280, 16, 3420)),
    "1b": dict(text=(1024, 24, 16, 2, 4096), vision=(16, 1280, 16, 3420)),
    "tiny": dict(text=(128, 2, 4, 2, 256), vision=(1, 32, 2, 64)),
}


def build_checkpoint(out: Path, size: str) -> Path:
    """A random Qwen2.5-VL of `size` with the demo tokenizer and processor, saved like a real checkpoint."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from video_r2.synthetic import QWEN_SPECIAL_TOKENS, build_processor, build_tokenizer
    from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT

    corpus = [DEFAULT_SYSTEM_PROMPT, "What fills the screen at 00:03? A) red B) green C) blue D) yellow",
              "<think>At 00:03 a blue triangle fills the screen, so the answer is C.</think><answer>C</answer>"] * 20
    tokenizer = build_tokenizer(corpus, vocab_size=1024)
    (h, layers, heads, kv, inter), (vdepth, vh, vheads, vinter) = SIZES[size]["text"], SIZES[size]["vision"]
    half = h // heads // 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936 if size != "tiny" else len(tokenizer), hidden_size=h, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=32768, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}),
        vision_config=dict(depth=vdepth, hidden_size=vh, num_heads=vheads, intermediate_size=vinter, out_hidden_size=h,
                           fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < vdepth] or [0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.device("cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    return out


def synthetic_batch(processor, stage: str, frames: int, height: int, width: int, batch: int) -> dict:
    """A batch of `batch` samples of `frames` moving-pattern frames, through the data module's collate."""
    from transformers.video_utils import VideoMetadata

    from video_r2.data import Collator

    items = []
    for b in range(batch):
        t = torch.arange(frames).view(-1, 1, 1, 1)
        y = torch.arange(height).view(1, 1, -1, 1)
        x = torch.arange(width).view(1, 1, 1, -1)
        video = ((x + y + 8 * t + 40 * b + torch.arange(3).view(1, -1, 1, 1) * 60) % 256).to(torch.uint8)
        messages = [{"role": "system", "content": "Think with timestamps, then answer."},
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens at 00:05?"}]}]
        if stage == "sft":
            messages.append({"role": "assistant", "content": "<think>At 00:05 the pattern moves right.</think><answer>B</answer>"})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=stage == "grpo")
        meta = VideoMetadata(total_num_frames=frames * 15, fps=30.0, frames_indices=list(range(0, frames * 15, 15)),
                             duration=frames / 2)
        out = processor(text=[text], videos=[video], return_tensors="pt",
                        videos_kwargs={"video_metadata": [meta], "do_sample_frames": False, "do_resize": False})
        item = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in out.items()}
        item["id"] = f"s{b}"
        if stage == "sft":
            item["labels"] = item["input_ids"].clone()
        else:
            item["sample"] = {"id": f"s{b}", "question": "What happens at 00:05?", "answer": "B",
                              "question_type": "multiple choice", "temporal_grounding": {}}
        items.append(item)
    tok = processor.tokenizer
    return Collator(tok.pad_token_id, "right" if stage == "sft" else "left")(items)


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


class StepClock:
    """Seconds of each optimizer step (after warmup), and the peak memory."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        clock = self

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, module, batch, idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.seconds.append(time.perf_counter() - clock.start)

        self.seconds: list[float] = []
        self.callback = _Cb()


def run_stage(stage: str, ckpt: Path, batch: dict, steps: int, args) -> dict:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy

    from video_r2.model import ModelConfig, decoder_layer_classes

    if stage == "sft":
        from video_r2.model import LoraConfigArgs
        from video_r2.sft import SFTModule

        from video_r2.stage import ExportArgs, OptimizerArgs

        module = SFTModule(backbone=ModelConfig(name_or_path=str(ckpt)), lora=LoraConfigArgs(r=64, alpha=64),
                           optim=OptimizerArgs(lr=1e-5), export=ExportArgs(on_checkpoint=False))
    else:
        from video_r2.grpo import GRPOModule, LossArgs, RewardArgs, RolloutArgs
        from video_r2.stage import ExportArgs, OptimizerArgs

        module = GRPOModule(backbone=ModelConfig(name_or_path=str(ckpt), freeze_llm=False),
                            rollout=RolloutArgs(num_generations=args.generations,
                                                max_completion_length=args.completion_tokens),
                            loss=LossArgs(beta=0.04, logp_chunk_size=1), rewards=RewardArgs(funcs=["accuracy", "format"]),
                            optim=OptimizerArgs(lr=1e-6, weight_decay=0.01), export=ExportArgs(on_checkpoint=False),
                            log_completions_every=0)
    if args.cpu:
        strategy, accelerator, precision = "auto", "cpu", "32-true"
    else:
        layers = decoder_layer_classes()
        strategy = FSDPStrategy(auto_wrap_policy=layers, activation_checkpointing_policy=layers, state_dict_type="full")
        accelerator, precision = "gpu", "bf16-mixed"
    clock = StepClock()
    trainer = Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=precision, max_steps=steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[clock.callback], default_root_dir=tempfile.mkdtemp())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None))
    timed = clock.seconds[1:] or clock.seconds  # the first step compiles kernels and warms caches
    seconds = sum(timed) / len(timed)
    params = sum(p.numel() for p in module.model.parameters())
    if stage == "sft":
        tokens = int(batch["attention_mask"].sum())
        flops = 6 * params * tokens  # forward + backward (LoRA: the frozen base still runs both)
    else:
        prompt = int(batch["attention_mask"].sum()) * args.generations
        completion = args.generations * batch["input_ids"].shape[0] * args.completion_tokens
        tokens = prompt + completion
        # rollout ~2*P*completion tokens (one at a time), reference forward 2*P*T, update 6*P*T
        flops = 2 * params * completion + 8 * params * tokens
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    return {
        "stage": stage, "steps_timed": len(timed), "step_s": seconds, "tokens_per_step": tokens,
        "tokens_per_s": tokens / seconds, "peak_gib": peak, "params": params,
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops == peak_tflops else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="2b")
    parser.add_argument("--tiny", action="store_true", help="the tiny size, small frames: checks the script on a CPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU without FSDP (checks the script only)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=336)  # 336 x 420 = 141,120 <= 360*420, sides multiples of 28
    parser.add_argument("--width", type=int, default=420)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="prompts (GRPO) or samples (SFT) per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    if args.tiny:
        args.size, args.frames, args.height, args.width, args.completion_tokens = "tiny", 8, 56, 56, 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from video_r2.model import load_processor

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "model", args.size)
        processor = load_processor(ckpt)
        rows = []
        for stage, steps in (("sft", args.sft_steps), ("grpo", args.grpo_steps)):
            batch = synthetic_batch(processor, stage, args.frames, args.height, args.width, args.batch)
            rows.append(run_stage(stage, ckpt, batch, steps, args))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nGPU check on {device}: {args.size} Qwen2.5-VL ({rows[0]['params'] / 1e9:.2f}B parameters), "
          f"{args.frames} frames at {args.height}x{args.width}, "
          + ("one CPU process, fp32 (checks the script only)" if args.cpu else "FSDPStrategy, bf16-mixed"))
    print(f"{'stage':<6}{'step s':>9}{'tokens/step':>13}{'tokens/s':>11}{'peak GiB':>10}{'MFU':>7}")
    for r in rows:
        print(f"{r['stage']:<6}{r['step_s']:>9.2f}{r['tokens_per_step']:>13}{r['tokens_per_s']:>11.0f}"
              f"{r['peak_gib']:>10.1f}{r['mfu']:>7.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "size": args.size, "frames": args.frames,
                                          "rows": rows, "wall_s": time.time() - start}, indent=1))
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
