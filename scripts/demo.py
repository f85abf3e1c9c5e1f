"""The embedded default, end to end: `make demo` runs this.

Every stage is the command a user runs for the real recipe, with the demo configs instead of the
recipe's (tiny random Qwen2.5-VL, synthetic timestamped videos, CPU):

    video-r2 make-demo --out demo
    video-r2 fit --config configs/demo/sft.yaml
    video-r2 merge-lora --base_model demo/model --lora_model runs/demo-sft/hf/final --output_dir demo/sft-merged
    python serve/judge_app.py --backend rules --port PORT        (in the background)
    video-r2 fit --config configs/demo/grpo.yaml --model.init_args.judge.init_args.base_url http://127.0.0.1:PORT/v1
    video-r2 evaluate ...   (base, SFT and GRPO models on the held-out videos)
    video-r2 plot runs/demo-sft ; video-r2 plot runs/demo-grpo

then prints a summary. Any failing stage stops the demo with its name and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class StageFailed(RuntimeError):
    pass


def run(stage: str, args: list[str], log_dir: Path) -> None:
    """Run one stage as a user would, echoing its command; its output goes to the terminal and a log."""
    print(f"\n=== {stage}\n$ {' '.join(args)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_dir / f"{stage}.log", "w") as log:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:  # progress bars stream through
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
    if code != 0:
        raise StageFailed(f"stage '{stage}' failed (exit {code}); its full output is in {log_dir / (stage + '.log')}")
    print(f"=== {stage}: done in {time.time() - start:.0f} s", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_judge(port: int, log_dir: Path) -> subprocess.Popen:
    args = [str(BIN / "python"), "serve/judge_app.py", "--backend", "rules", "--port", str(port)]
    print(f"\n=== judge\n$ {' '.join(args)} &", flush=True)
    log = open(log_dir / "judge.log", "w")
    process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise StageFailed(f"the judge server exited at start (exit {process.returncode}); see {log_dir / 'judge.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    print(f"=== judge: up at http://127.0.0.1:{port}/v1", flush=True)
                    return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise StageFailed(f"the judge server did not answer /health within 120 s; see {log_dir / 'judge.log'}")


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def first_last(series: dict, tag: str) -> str:
    points = series.get(tag)
    if not points:
        return "n/a"
    return f"{points[0][1]:.3f} -> {points[-1][1]:.3f}  ({len(points)} points)"


def path_overrides(args, stage: str) -> list[str]:
    """Flags that move the demo configs' `demo/` and `runs/` paths elsewhere; none for the defaults, so the
    commands shown are exactly the ones a user types."""
    if (args.out, args.runs) == ("demo", "runs"):
        return []
    data = f"{args.out}/data"
    split = {"sft": "sft", "grpo": "grpo", "eval": "eval"}[stage]
    flags = [f"--data_path={data}/video-r2-{split}-dataset.json", f"--video_folder={data}/videos",
             f"--subtitles_folder={data}/subtitles"]
    if stage == "eval":
        return flags
    model = f"{args.out}/model" if stage == "sft" else f"{args.out}/sft-merged"
    flags = ["--data." + f[2:] for f in flags] + [
        f"--model.init_args.backbone.name_or_path={model}", f"--data.processor_path={model}",
        f"--trainer.default_root_dir={args.runs}/demo-{stage}", f"--trainer.logger.init_args.save_dir={args.runs}",
    ]
    if stage == "sft":
        flags.append(f"--data.val_data_path={data}/video-r2-eval-dataset.json")
    return flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for the checkpoint, data, merged models and results")
    parser.add_argument("--runs", default="runs", help="folder the configs log to (TensorBoard, checkpoints, exports)")
    parser.add_argument("--sft-steps", type=int, default=None, help="override trainer.max_steps of the SFT stage")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override trainer.max_steps of the GRPO stage")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out videos only")
    parser.add_argument("--tiny", action="store_true",
                        help="a few videos and steps: checks that every stage runs (the tests use it), learns nothing")
    args = parser.parse_args()
    if args.tiny:
        args.sft_steps, args.grpo_steps, args.eval_limit = args.sft_steps or 4, args.grpo_steps or 2, args.eval_limit or 4

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out, runs = ROOT / args.out, ROOT / args.runs
    logs = out / "logs"
    video_r2 = str(BIN / "video-r2")
    data = out / "data"
    start = time.time()
    judge = None
    try:
        if out.exists():
            shutil.rmtree(out)
        for run_name in ("demo-sft", "demo-grpo"):
            shutil.rmtree(runs / run_name, ignore_errors=True)
        logs.mkdir(parents=True)
        sizes = ["--num-sft-videos", "4", "--num-grpo-videos", "4", "--num-eval-videos", "4"] if args.tiny else []
        run("make-demo", [video_r2, "make-demo", "--out", str(out / "build"), *sizes], logs)
        for sub in ("model", "data"):
            (out / "build" / sub).rename(out / sub)
        (out / "build").rmdir()

        sft = [video_r2, "fit", "--config", "configs/demo/sft.yaml", *path_overrides(args, "sft")]
        if args.sft_steps:
            sft += ["--trainer.max_steps", str(args.sft_steps)]
        if args.tiny:  # a handful of steps: log every one, so the plots have points
            sft += ["--trainer.log_every_n_steps", "1"]
        run("sft", sft, logs)
        run("merge-lora", [video_r2, "merge-lora", "--base_model", str(out / "model"),
                           "--lora_model", str(runs / "demo-sft/hf/final"), "--output_dir", str(out / "sft-merged")], logs)

        port = free_port()
        judge = start_judge(port, logs)
        judge_url = f"http://127.0.0.1:{port}/v1"
        grpo = [video_r2, "fit", "--config", "configs/demo/grpo.yaml", *path_overrides(args, "grpo"),
                "--model.init_args.judge.init_args.base_url", judge_url]
        if args.grpo_steps:
            grpo += ["--trainer.max_steps", str(args.grpo_steps)]
        run("grpo", grpo, logs)

        results = {}
        models = {"base": out / "model", "sft": out / "sft-merged", "grpo": runs / "demo-grpo/hf/final"}
        for name, path in models.items():
            result = out / f"eval-{name}.json"
            command = [video_r2, "evaluate", "--config", "configs/demo/eval.yaml", *path_overrides(args, "eval"),
                       "--model", str(path), "--judge_base_url", judge_url, "--out", str(result)]
            if args.eval_limit:
                command += ["--limit", str(args.eval_limit)]
            run(f"evaluate-{name}", command, logs)
            results[name] = json.loads(result.read_text())
        stop(judge)
        judge = None

        for run_name in ("demo-sft", "demo-grpo"):
            run(f"plot-{run_name}", [video_r2, "plot", str(runs / run_name)], logs)
        from video_r2.plot import read_scalars

        summary = summarize(results, read_scalars(runs / "demo-sft"), read_scalars(runs / "demo-grpo"), out, runs,
                            time.time() - start)
        print(summary)
        (out / "summary.txt").write_text(summary)
        return 0
    except StageFailed as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        stop(judge)


def summarize(results: dict, sft: dict, grpo: dict, out: Path, runs: Path, seconds: float) -> str:
    lines = [
        "",
        "================ video-r2 demo summary ================",
        f"wall time: {seconds / 60:.1f} min",
        f"SFT loss (first -> last): {first_last(sft, 'train/loss')}",
        "",
        f"held-out evaluation ({results['base']['num_samples']} videos never trained on):",
        f"  {'model':<22}{'accuracy':>10}{'format':>10}{'TAR':>10}",
    ]
    for name in ("base", "sft", "grpo"):
        r = results[name]
        lines.append(f"  {name:<22}{r['accuracy']:>10.3f}{r['format']:>10.3f}{r['tar']:>10.3f}")
    base = results["base"]
    lines.append(f"  {'shortcut (longest)':<22}{base['shortcut_accuracy']:>10.3f}{'':>10}{'':>10}")
    lines.append(f"  {'chance':<22}{base['chance_accuracy']:>10.3f}")
    lines.append("")
    lines.append("GRPO rewards (first -> last step):")
    for tag in sorted(t for t in grpo if t.startswith("train/rewards/") and t.endswith("/mean")) + ["train/reward/mean"]:
        lines.append(f"  {tag:<34}{first_last(grpo, tag)}")
    lines.append(f"  {'train/kl':<34}{first_last(grpo, 'train/kl')}")
    calls, failures = grpo.get("train/judge/calls"), grpo.get("train/judge/failures")
    lines.append(f"judge calls: {int(calls[-1][1]) if calls else 0}, failures: {int(failures[-1][1]) if failures else 0}")
    lines += [
        "",
        f"TensorBoard logs:   tensorboard --logdir {runs}",
        f"plots:              {runs / 'demo-sft/curves.png'}, {runs / 'demo-grpo/curves.png'}",
        f"SFT export:         {runs / 'demo-sft/hf/final'}   merged: {out / 'sft-merged'}",
        f"GRPO export:        {runs / 'demo-grpo/hf/final'}",
        f"stage logs:         {out / 'logs'}",
        "next: the real recipe on GPUs, see README.md 'The real recipe'.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
