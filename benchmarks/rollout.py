"""GRPO rollout throughput: HF ``generate`` (`sample_completions`) against the in-process vLLM engine, one run.

Both engines sample the same prompts with the same weights and settings: B prompts x G completions, exactly
``--new-tokens`` tokens each (EOS held off by ``min_new_tokens`` / ``min_tokens``, so both produce the same
number of tokens), on text prompts and on the demo's video prompts (frames decoded and stamped once, by our
data pipeline). Reported: tokens/s of each engine, the vLLM/HF ratio, and the time of one full weight push.
Each way runs once to warm up, then ``--repeats`` times; the fastest run counts (the machines are shared). On the
CPU each engine gets ``--threads`` OpenMP threads (default 1: on a loaded 2-core machine spinning threads made HF
``generate`` 10x slower on video prompts, which measures the load, not the engines).
Prints a table and writes benchmarks/results/rollout.json. Runs in the vLLM venv:

    .venv-vllm/bin/python benchmarks/rollout.py [--model DIR] [--prompts 4] [--generations 8] [--new-tokens 64]

Without ``--model`` it builds the tiny demo (text head size 32, which vLLM's CPU attention accepts). On the CPU
the two are about even on this model (both bound by per-step overhead); the engine's value there is the tested
code path. On a GPU with the 7B recipe (8 x 1024 tokens per prompt) is where the ratio matters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rollout.json"


def text_prompt(processor, n: int) -> dict:
    import torch

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template([{"role": "user", "content": f"Question {i}: what happens at 00:0{i}?"}],
                                           add_generation_prompt=True, tokenize=False) for i in range(n)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": torch.zeros_like(enc["input_ids"])}


def video_prompt(data: Path, processor, n: int) -> tuple[dict, list[dict]]:
    import torch

    from video_r2.data.budget import Sampling
    from video_r2.data.dataset import Collator, VideoR2Dataset

    records = json.loads((data / "video-r2-grpo-dataset.json").read_text())
    dataset = VideoR2Dataset(records, processor, data / "videos", data / "subtitles", stage="grpo",
                             sampling=Sampling(fps=2.0, max_frames=16, min_frames=4, video_min_pixels=3136,
                                               video_max_pixels=3136), keep_frames=True)
    batch = Collator(processor.tokenizer.pad_token_id, "left")([dataset[i % len(dataset)] for i in range(n)])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, batch["samples"]


def fastest(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: build the tiny demo)")
    parser.add_argument("--data", help="demo data directory with video-r2-grpo-dataset.json (default: the demo's)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each engine (0: their defaults). On a shared 2-core machine spinning "
                             "OpenMP threads of both engines slowed HF generate 10x on video prompts; one each is fair")
    args = parser.parse_args()
    if args.threads:  # before torch is imported: OpenMP reads them once
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    import torch

    from video_r2.grpo import RolloutArgs, sample_completions
    from video_r2.grpo.rollout import generation_token_ids
    from video_r2.grpo.vllm_engine import VLLMEngine, hf_weights
    from video_r2.model import load_model, load_processor

    if args.model is None:
        from video_r2.synthetic import make_demo

        demo = make_demo(Path(tempfile.mkdtemp(prefix="bench-rollout-")) / "demo", num_sft_videos=2,
                         num_grpo_videos=4, num_eval_videos=1, text_hidden=128, seed=0)
        args.model, args.data = str(demo / "model"), args.data or str(demo / "data")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype).to(device).eval()
    processor = load_processor(args.model)
    eos, pad, suppress = generation_token_ids(model, processor.tokenizer)
    G, L = args.generations, args.new_tokens
    rollout = RolloutArgs(num_generations=G, max_completion_length=L, temperature=1.0, top_k=None,
                          vllm_kv_cache_gb=args.kv_cache_gb, vllm_dtype=args.dtype)
    start = time.perf_counter()
    engine = VLLMEngine(args.model, rollout, eos_token_ids=eos, pad_token_id=pad, suppress_tokens=suppress,
                        dtype=dtype, max_model_len=4096)
    engine_start_s = time.perf_counter() - start
    push_s = fastest(lambda: engine.push_weights(model, full=True), args.repeats)
    n_tensors = sum(len(chunk) for chunk in hf_weights(model, trainable_only=False))

    workloads = {"text": (text_prompt(processor, args.prompts), None)}
    if args.data:
        workloads["video"] = video_prompt(Path(args.data), processor, args.prompts)
    rows = []
    for name, (prompt, samples) in workloads.items():
        prompt = {k: v.to(device) for k, v in prompt.items()}

        def hf():
            out, _ = sample_completions(model, prompt, G, eos_token_ids=eos, pad_token_id=pad,
                                        suppress_tokens=suppress, do_sample=True, temperature=1.0, top_k=None,
                                        max_new_tokens=L, min_new_tokens=L)
            assert out.completion_ids.shape[1] == L

        def vllm():
            out, _, _ = engine.sample(model, prompt, samples, G, seed=0, min_tokens=L)
            assert out.completion_ids.shape[1] == L

        tokens = prompt["input_ids"].shape[0] * G * L
        hf_s, vllm_s = fastest(hf, args.repeats), fastest(vllm, args.repeats)
        rows.append({"prompts": name, "completions": prompt["input_ids"].shape[0] * G, "tokens": tokens,
                     "hf_s": hf_s, "vllm_s": vllm_s, "hf_tokens_per_s": tokens / hf_s,
                     "vllm_tokens_per_s": tokens / vllm_s, "vllm_over_hf": hf_s / vllm_s})

    table = Table(title=f"GRPO rollout on {device}: {args.prompts} prompts x {G} completions x {L} tokens "
                        f"({Path(args.model).name}, {args.dtype}, {args.threads or 'default'} thread(s))")
    for col in ("prompts", "tokens", "HF generate tok/s", "vLLM tok/s", "vLLM / HF"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["prompts"], str(r["tokens"]), f"{r['hf_tokens_per_s']:.0f}", f"{r['vllm_tokens_per_s']:.0f}",
                      f"{r['vllm_over_hf']:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"engine start {engine_start_s:.1f} s; full weight push ({n_tensors} tensors) {push_s * 1000:.0f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
                    "torch": torch.__version__, "vllm": __import__("vllm").__version__},
        "settings": {"model": args.model, "prompts": args.prompts, "generations": G, "new_tokens": L,
                     "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads},
        "engine_start_s": engine_start_s, "full_push_s": push_s, "pushed_tensors": n_tensors, "rows": rows,
    }, indent=1))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":  # vLLM may re-import the main module in worker processes
    main()
