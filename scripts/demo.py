"""The embedded default, end to end: `make demo` runs this. It reproduces the paper's TAR ablation in miniature.

Every stage is the command a user runs for the real recipe, with the demo configs instead of the
recipe's (tiny random Qwen2.5-VL, synthetic timestamped videos, CPU):

    video-r2 make-demo --out demo
    video-r2 fit --config configs/demo/sft.yaml
    video-r2 merge-lora --base_model demo/model --lora_model runs/demo-sft/hf/final --output_dir demo/sft-merged
    python serve/judge_app.py --backend rules --port PORT        (in the background)
    video-r2 fit --config configs/demo/grpo.yaml ...              rewards.funcs [accuracy, format, tar]
    video-r2 fit --config configs/demo/grpo.yaml ... --model.init_args.rewards.funcs '[accuracy, format]'
    video-r2 evaluate ...   (base, SFT and both GRPO models on the held-out videos)
    video-r2 inspect demo/eval-grpo.json ; video-r2 inspect demo/eval-grpo_no_tar.json
    video-r2 inspect runs/demo-grpo/completions/step-000080.json   (the last logged training step)
    video-r2 plot runs/demo-sft ; video-r2 plot runs/demo-grpo ; video-r2 plot runs/demo-grpo-no-tar

The SFT answers reason in two styles (one cites the moment, one does not, both right), so the SFT model
samples both; the two GRPO runs start from it with the same seed and steps and differ only in whether TAR is
in the reward. demo/summary.txt and demo/summary.json compare them on held-out videos. Any failing stage stops
the demo with its name and a non-zero exit.

Determinism: every stage runs with a fixed number of intra-op threads and without dynamic thread adjustment,
because float sums on the CPU depend on how the work is split between threads. SFT runs alone, with
`--sft-threads` (default 2: the 2-core machine this demo is sized for); the two GRPO runs (and the evaluations,
two at a time) run side by side with `--threads` each (default 1). A fixed count gives the same numbers on
every run of one machine; change it and the floats, and so the trajectory, change.
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
MODELS = ("base", "sft", "grpo", "grpo_no_tar")  # the summary's rows, in order
REWARDS = {"grpo": "[accuracy, format, tar]", "grpo_no_tar": "[accuracy, format]"}
RUN_NAMES = {"sft": "demo-sft", "grpo": "demo-grpo", "grpo_no_tar": "demo-grpo-no-tar"}
METRICS = ("accuracy", "format", "tar", "grounded_share", "consistency")


class StageFailed(RuntimeError):
    pass


def stage_env(threads: int) -> dict[str, str]:
    """The environment of every stage: a fixed thread count, no dynamic adjustment, nothing fetched."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        # Off by default in libgomp and on in MKL; either would let a run change its thread count.
        "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


class Stage:
    """One command running with its output in a log; `live` stages also stream it to the terminal as it comes
    (raw chunks, not lines: progress bars redraw with '\\r' and would otherwise appear only at the end)."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str], live: bool) -> None:
        self.name, self.args, self.live = name, args, live
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.start = time.time()
        if live and sys.stdout.isatty():
            # Through a pipe, Lightning's rich progress bar would print only its final state: tell rich that
            # what it writes reaches a terminal (ours), as wide as ours.
            env = {**env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1",
                   "COLUMNS": str(shutil.get_terminal_size().columns)}
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        os.set_blocking(self.process.stdout.fileno(), False)

    def pump(self) -> bool:
        """Forward what the stage wrote since the last call; False once it has exited and all is read."""
        while True:
            try:
                chunk = os.read(self.process.stdout.fileno(), 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self.log.write(chunk)
            if self.live:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    def finish(self) -> float:
        code = self.process.wait()
        self.log.close()
        if code != 0:
            raise StageFailed(f"stage '{self.name}' failed (exit {code}); its full output is in {self.log_path}")
        seconds = time.time() - self.start
        print(f"\n=== {self.name}: done in {seconds:.0f} s", flush=True)
        return seconds

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.log.close()


def run_together(stages: list[tuple[str, list[str]]], log_dir: Path, env: dict[str, str],
                 times: dict[str, float]) -> None:
    """Run the stages side by side: the first streams to the terminal, the others to their logs only."""
    for i, (name, args) in enumerate(stages):
        alongside = f"   (alongside the stage above; output in {log_dir / (name + '.log')})" if i else ""
        print(f"\n=== {name}\n$ {' '.join(args)}{alongside}", flush=True)
    running = [Stage(name, args, log_dir, env, live=i == 0) for i, (name, args) in enumerate(stages)]
    try:
        active = list(running)
        while active:
            active = [s for s in active if s.pump() or s.process.poll() is None]
            time.sleep(0.1)
        for stage in running:
            times[stage.name] = stage.finish()
    finally:
        for stage in running:
            stage.stop()


def run(stage: str, args: list[str], log_dir: Path, env: dict[str, str], times: dict[str, float]) -> None:
    run_together([(stage, args)], log_dir, env, times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_judge(port: int, log_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    # No request deadline on the server: under load a slow reply must stay a reply, not turn a TAR into None
    # (which would change the rewards, and the run, with the machine's load).
    args = [str(BIN / "python"), "serve/judge_app.py", "--backend", "rules", "--port", str(port), "--timeout", "0"]
    print(f"\n=== judge\n$ {' '.join(args)} &", flush=True)
    log = open(log_dir / "judge.log", "w")
    process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
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
    raise StageFailed(f"the judge server did not answer /health within 180 s; see {log_dir / 'judge.log'}")


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def path_overrides(args, split: str, run_name: str | None = None) -> list[str]:
    """Flags that move the demo configs' `demo/` and `runs/` paths elsewhere, and name a second GRPO run; none
    for the defaults, so the commands shown are exactly the ones a user types."""
    custom = (args.out, args.runs) != ("demo", "runs")
    data = f"{args.out}/data"
    data_flags = [f"--data_path={data}/video-r2-{split}-dataset.json", f"--video_folder={data}/videos",
                  f"--subtitles_folder={data}/subtitles"]
    if split == "eval":
        return data_flags if custom else []
    flags = []
    if custom:
        model = f"{args.out}/model" if split == "sft" else f"{args.out}/sft-merged"
        flags += ["--data." + f[2:] for f in data_flags] + [
            f"--model.init_args.backbone.name_or_path={model}", f"--data.processor_path={model}",
            f"--trainer.logger.init_args.save_dir={args.runs}"]
        if split == "sft":
            flags.append(f"--data.val_data_path={data}/video-r2-eval-dataset.json")
    name = run_name or RUN_NAMES[split]
    if custom or name != RUN_NAMES[split]:
        flags.append(f"--trainer.default_root_dir={args.runs}/{name}")
    if name != RUN_NAMES[split]:
        flags.append(f"--trainer.logger.init_args.name={name}")
    return flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for the checkpoint, data, merged models and results")
    parser.add_argument("--runs", default="runs", help="folder the configs log to (TensorBoard, checkpoints, exports)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the dataset, the tiny model and both trainings")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each stage that runs beside another (fixed for determinism)")
    parser.add_argument("--sft-threads", type=int, default=2,
                        help="intra-op threads of the SFT stage, which runs alone (fixed for determinism)")
    parser.add_argument("--sft-steps", type=int, default=None, help="override trainer.max_steps of the SFT stage")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override trainer.max_steps of both GRPO runs")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out videos only")
    parser.add_argument("--make-demo-args", default="", help="extra flags for video-r2 make-demo (sizes, mix)")
    parser.add_argument("--tiny", action="store_true",
                        help="a few videos and steps: checks that every stage runs (the tests use it), learns nothing")
    args = parser.parse_args()
    if args.tiny:
        args.sft_steps, args.grpo_steps, args.eval_limit = args.sft_steps or 4, args.grpo_steps or 2, args.eval_limit or 4

    env = stage_env(args.threads)
    out, runs = ROOT / args.out, ROOT / args.runs
    logs = out / "logs"
    video_r2 = str(BIN / "video-r2")
    start = time.time()
    times: dict[str, float] = {}
    judge = None
    try:
        if out.exists():
            shutil.rmtree(out)
        for run_name in RUN_NAMES.values():
            shutil.rmtree(runs / run_name, ignore_errors=True)
        logs.mkdir(parents=True)
        sizes = ["--num-sft-videos", "4", "--num-grpo-videos", "4", "--num-eval-videos", "4"] if args.tiny else []
        seed = ["--seed", str(args.seed)] if args.seed else []
        run("make-demo", [video_r2, "make-demo", "--out", str(out / "build"), *seed, *sizes,
                          *args.make_demo_args.split()], logs, env, times)
        for sub in ("model", "data"):
            (out / "build" / sub).rename(out / sub)
        (out / "build").rmdir()

        fit_seed = ["--seed_everything", str(args.seed)] if args.seed else []
        sft = [video_r2, "fit", "--config", "configs/demo/sft.yaml", *path_overrides(args, "sft"), *fit_seed]
        if args.sft_steps:
            sft += ["--trainer.max_steps", str(args.sft_steps)]
        if args.tiny:  # a handful of steps: log every one, so the plots have points
            sft += ["--trainer.log_every_n_steps", "1"]
        run("sft", sft, logs, stage_env(args.sft_threads), times)
        run("merge-lora", [video_r2, "merge-lora", "--base_model", str(out / "model"),
                           "--lora_model", str(runs / "demo-sft/hf/final"), "--output_dir", str(out / "sft-merged")],
            logs, env, times)

        port = free_port()
        judge = start_judge(port, logs, env)
        judge_url = f"http://127.0.0.1:{port}/v1"
        grpo_runs = []
        for name, funcs in REWARDS.items():
            command = [video_r2, "fit", "--config", "configs/demo/grpo.yaml",
                       *path_overrides(args, "grpo", RUN_NAMES[name]), *fit_seed,
                       "--model.init_args.judge.init_args.base_url", judge_url,
                       "--model.init_args.rewards.funcs", funcs,
                       "--model.init_args.rewards.weights", "[" + ", ".join(["1.0"] * len(funcs.split(","))) + "]"]
            if args.grpo_steps:
                command += ["--trainer.max_steps", str(args.grpo_steps)]
            if args.tiny:  # two steps: log both, so that a training step can be inspected
                command += ["--model.init_args.log_completions_every", "1"]
            grpo_runs.append((name.replace("_", "-"), command))
        run_together(grpo_runs, logs, env, times)

        models = {"base": out / "model", "sft": out / "sft-merged", "grpo": runs / "demo-grpo/hf/final",
                  "grpo_no_tar": runs / "demo-grpo-no-tar/hf/final"}
        evaluations = []
        for name, path in models.items():
            command = [video_r2, "evaluate", "--config", "configs/demo/eval.yaml", *path_overrides(args, "eval"),
                       "--model", str(path), "--judge_base_url", judge_url, "--out", str(out / f"eval-{name}.json")]
            if args.eval_limit:
                command += ["--limit", str(args.eval_limit)]
            evaluations.append((f"evaluate-{name.replace('_', '-')}", command))
        for pair in (evaluations[:2], evaluations[2:]):  # two at a time, one thread each
            run_together(pair, logs, env, times)
        results = {name: json.loads((out / f"eval-{name}.json").read_text()) for name in models}
        stop(judge)
        judge = None

        for name in ("grpo", "grpo_no_tar"):
            run(f"inspect-{name.replace('_', '-')}", [video_r2, "inspect", str(out / f"eval-{name}.json"),
                                                      "--out", str(out / f"inspect-{name}.html"),
                                                      "--num_samples", "6"], logs, env, times)
        # What TAR made of the training rollouts themselves: the last step the GRPO run with TAR logged.
        logged = sorted((runs / RUN_NAMES["grpo"] / "completions").glob("step-*.json"))
        if logged:
            run("inspect-grpo-training", [video_r2, "inspect", str(logged[-1]), "--out",
                                          str(out / "inspect-grpo-training.html"), "--num_samples", "8"], logs, env, times)
        for run_name in RUN_NAMES.values():
            run(f"plot-{run_name}", [video_r2, "plot", str(runs / run_name)], logs, env, times)
        from video_r2.plot import plot_side_by_side, read_scalars

        plot_side_by_side({"GRPO with TAR": runs / "demo-grpo", "GRPO without TAR": runs / "demo-grpo-no-tar"},
                          out / "grpo-rewards.png")
        scalars = {name: read_scalars(runs / run_name) for name, run_name in RUN_NAMES.items()}
        summary = summary_numbers(results, out, time.time() - start, times, args)
        text = summarize(summary, results, scalars, out, runs)
        print(text)
        (out / "summary.txt").write_text(text + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return 0
    except StageFailed as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        stop(judge)


def shortcut(results: dict, out: Path) -> float:
    """Held-out accuracy of the task's shortcut (the shape filling most of the video), from the records."""
    if "shortcut_accuracy" in results:
        return results["shortcut_accuracy"]
    from video_r2.rewards import score_answer
    from video_r2.synthetic import shortcut_answer

    records = {str(r["id"]): r for r in json.loads((out / "data/video-r2-eval-dataset.json").read_text())}
    scores = [score_answer(shortcut_answer(records[str(row["id"])]), row["answer"], row["question_type"])
              for row in results["samples"]]
    return sum(scores) / len(scores)


def _finite(value):
    return None if value is None or value != value else value  # NaN != NaN


def summary_numbers(results: dict, out: Path, seconds: float, times: dict, args) -> dict:
    """demo/summary.json: per model the held-out metrics, the baselines, the wall time."""
    return {
        # A rate over nothing (no completion had reasoning and an answer) is null, not NaN: strict JSON.
        "models": {name: {m: _finite(results[name].get(m)) for m in METRICS} for name in MODELS},
        "shortcut": shortcut(results["base"], out),
        "chance": results["base"]["chance_accuracy"],
        "num_eval_samples": results["base"]["num_samples"],
        "seed": args.seed,
        "threads": {"sft": args.sft_threads, "other_stages": args.threads},
        "wall_time_s": round(seconds, 1),
        "stage_time_s": {k: round(v, 1) for k, v in times.items()},
    }


def _first_last(series: dict, tag: str) -> str:
    points = series.get(tag)
    if not points:
        return "n/a"
    return f"{points[0][1]:.3f} -> {points[-1][1]:.3f}"


def _target(label: str, value: float, goal: float, above: bool = True) -> str:
    met = value >= goal if above else value <= goal
    return f"  {label:<46}{value:>+8.3f}   (target {'>=' if above else '<='} {goal:+.2f}: {'met' if met else 'NOT met'})"


def summarize(summary: dict, results: dict, scalars: dict, out: Path, runs: Path) -> str:
    m = summary["models"]
    lines = [
        "",
        "================ video-r2 demo summary: the TAR ablation ================",
        f"wall time: {summary['wall_time_s'] / 60:.1f} min (seed {summary['seed']}); stages: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_time_s"].items()),
        f"SFT loss (first -> last): {_first_last(scalars['sft'], 'train/loss')}",
        "",
        f"held-out evaluation ({summary['num_eval_samples']} videos never trained on):",
        f"  {'model':<22}{'accuracy':>10}{'format':>10}{'TAR':>10}{'grounded':>10}{'consistent':>12}",
    ]
    labels = {"base": "base", "sft": "sft", "grpo": "grpo (with TAR)", "grpo_no_tar": "grpo (without TAR)"}
    for name in MODELS:
        r = m[name]
        lines.append(f"  {labels[name]:<22}" + "".join(
            f"{(r[k] if r[k] is not None else float('nan')):>{w}.3f}"
            for k, w in zip(METRICS, (10, 10, 10, 10, 12))))
    lines.append(f"  {'shortcut (longest)':<22}{summary['shortcut']:>10.3f}")
    lines.append(f"  {'chance':<22}{summary['chance']:>10.3f}")
    lines += [
        "  grounded: share of completions whose reasoning makes a timestamped claim; consistent: reasoning and",
        "  answer agree (the judge's verdict).",
        "",
        "the ablation (targets of issue 14):",
        _target("TAR: GRPO with TAR - SFT", m["grpo"]["tar"] - m["sft"]["tar"], 0.20),
        _target("TAR: GRPO with TAR - GRPO without TAR", m["grpo"]["tar"] - m["grpo_no_tar"]["tar"], 0.15),
        _target("accuracy: GRPO with TAR - SFT", m["grpo"]["accuracy"] - m["sft"]["accuracy"], -0.03),
        _target("accuracy: SFT - shortcut", m["sft"]["accuracy"] - summary["shortcut"], 0.0),
        "",
        "GRPO rewards on the training rollouts (first -> last step):",
        f"  {'':<34}{'with TAR':>18}{'without TAR':>18}",
    ]
    tags = sorted({t for name in ("grpo", "grpo_no_tar") for t in scalars[name]
                   if t.startswith("train/rewards/") and t.endswith("/mean")}) + ["train/reward/mean", "train/kl"]
    for tag in tags:
        lines.append(f"  {tag:<34}{_first_last(scalars['grpo'], tag):>18}{_first_last(scalars['grpo_no_tar'], tag):>18}")
    failures = [int(results[n].get("judge/failures", 0)) for n in MODELS]
    lines.append(f"judge failures during evaluation: {sum(failures)}")
    lines += [
        "",
        f"TensorBoard logs:   tensorboard --logdir {runs}",
        f"plots:              {out / 'grpo-rewards.png'} (both GRPO runs side by side), {runs}/demo-*/curves.png",
        f"why TAR scored:     {out / 'inspect-grpo.html'}, {out / 'inspect-grpo_no_tar.html'} (held-out), "
        f"{out / 'inspect-grpo-training.html'} (a logged training step)",
        f"numbers:            {out / 'summary.json'}; stage logs: {out / 'logs'}",
        "next: the real recipe on GPUs, see README.md 'The real recipe'.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
