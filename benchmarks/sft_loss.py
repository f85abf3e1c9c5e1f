"""SFT's loss with the LM head on every position (the model's own ``labels=`` loss) against `answer_loss`
(the LM head only where an answer token is predicted), in one run, on the same batch and weights.

The model is a Qwen2.5-VL built from a config (no weights to download): Qwen's real vocabulary size
(151,936), a small language model (hidden 256, 2 layers) so that the LM head's share of the step is large, as
it is for a 7B model at 16k tokens. The batch is text only: ``--seq`` tokens per sample, of which the last
``--answer`` are labels (the recipe's samples are mostly video tokens and question; the answer is short).
Each case runs forward and backward ``--repeats`` times in its own subprocess; the table gives the best time
and the peak resident memory over the process's size after building the model, and the ratios.

    python benchmarks/sft_loss.py                 # batch 2 x 2048 tokens, 128 answer tokens each
    python benchmarks/sft_loss.py --seq 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_case(case: str, args) -> dict:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from video_r2.sft import answer_loss, model_inputs

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                     "tie_word_embeddings": False},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 256},
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    ids = torch.randint(100, 150000, (args.batch, args.seq))
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer:] = ids[:, -args.answer:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = (lambda: model(**model_inputs(batch)).loss) if case == "full_logits" else (lambda: answer_loss(model, batch))
    best, loss = float("inf"), None
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        value = step()
        value.backward()
        best = min(best, time.perf_counter() - start)
        loss = float(value)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "seconds": best, "peak_rise_mb": (peak - before) / 1024, "loss": loss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--answer", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    rows = []
    for case in ("full_logits", "answer_loss"):
        flags = [f"--batch={args.batch}", f"--seq={args.seq}", f"--answer={args.answer}",
                 f"--repeats={args.repeats}", f"--threads={args.threads}", f"--case={case}"]
        out = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full, ours = rows
    print(f"SFT loss, batch {args.batch} x {args.seq} tokens ({args.answer} answer tokens each), vocab 151,936, "
          f"{args.threads} threads")
    print(f"{'case':<14}{'fwd+bwd s':>12}{'peak rise MB':>15}{'loss':>10}")
    for r in rows:
        print(f"{r['case']:<14}{r['seconds']:>12.3f}{r['peak_rise_mb']:>15.0f}{r['loss']:>10.4f}")
    speedup, memory = full["seconds"] / ours["seconds"], full["peak_rise_mb"] / max(ours["peak_rise_mb"], 1.0)
    print(f"answer_loss: {speedup:.2f}x faster, {memory:.1f}x less peak memory; same loss: "
          f"{abs(full['loss'] - ours['loss']) < 1e-4}")
    RESULTS.mkdir(exist_ok=True)
    result = {"args": {k: v for k, v in vars(args).items() if k != "case"}, "rows": rows,
              "speedup": speedup, "memory_ratio": memory}
    (RESULTS / "sft_loss.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'sft_loss.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
