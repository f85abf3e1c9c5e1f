"""`video-r2 evaluate` and `video-r2 plot`: held-out scoring with the training rewards, and curves from TensorBoard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

VIDEO_R2 = str(Path(sys.executable).parent / "video-r2")


def test_evaluate_scores_with_the_training_rewards_and_baselines(tiny_demo, rules_judge, tmp_path):
    from video_r2.data import Sampling
    from video_r2.evaluate import evaluate

    data = tiny_demo / "data"
    out = tmp_path / "eval.json"
    results = evaluate(
        model=str(tiny_demo / "model"), data_path=str(data / "video-r2-eval-dataset.json"),
        video_folder=str(data / "videos"), subtitles_folder=str(data / "subtitles"),
        sampling=Sampling(fps=2.0, max_frames=16, video_max_pixels=3136), judge_base_url=rules_judge.base_url, max_new_tokens=8, batch_size=2, out=str(out),
    )
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == results["num_samples"] == 4
    # A random model writes no <think>/<answer>: format and accuracy are 0, and so is TAR (nothing to match).
    assert results["format"] == 0.0 and results["accuracy"] == 0.0 and results["tar"] == 0.0
    assert len(saved["samples"]) == 4 and all("completion" in s for s in saved["samples"])
    # Chance: 1/4 options for multiple choice, 1/(distinct numeric answers) for numbers.
    records = json.loads((data / "video-r2-eval-dataset.json").read_text())
    numeric = {r["conversations"][1]["value"].split("<answer>")[1][:-9] for r in records
               if r["question_type"] == "numerical"}
    chance = [0.25 if r["question_type"] == "multiple choice" else 1 / len(numeric) for r in records]
    assert results["chance_accuracy"] == pytest.approx(sum(chance) / len(chance))


def test_known_completions_score_as_their_answers_and_reasoning_deserve(tiny_demo, rules_judge):
    """Right and grounded, wrong but grounded, and untagged completions of held-out multiple-choice records:
    accuracy, format and TAR (with its consistency gate) as hand-worked, and the rates over what was scored."""
    from video_r2.data.chat import reward_sample
    from video_r2.evaluate import score_completions
    from video_r2.judge import JudgeClient
    from video_r2.rewards import RewardContext

    records = [r for r in json.loads((tiny_demo / "data" / "video-r2-eval-dataset.json").read_text())
               if r["question_type"] == "multiple choice"][:2]
    samples, completions, expected = [], [], []
    for index, record in enumerate(records):
        sample = reward_sample(record, index, "")
        span, event = next(iter(sample["temporal_grounding"].items()))
        when = span.split("-")[0]
        right = sample["answer"]
        wrong = next(letter for letter in "ABCD" if letter != right)
        think = f"At {when} {event[0].lower()}{event[1:-1]}, so the answer is {right}."
        for text, accuracy, fmt, tar in (
            (f"<think>{think}</think><answer>{right}</answer>", 1.0, 1.0, 1.0),  # right, cites the true moment
            (f"<think>{think}</think><answer>{wrong}</answer>", 0.0, 1.0, 0.0),  # the answer contradicts it
            (f"The answer is {right}.", 0.0, 0.0, 0.0),  # no tags: no answer to read, no reasoning to ground
        ):
            samples.append(sample)
            completions.append(text)
            expected.append((accuracy, fmt, tar))
    context = RewardContext(judge=JudgeClient(rules_judge.base_url, "video-r2-judge", timeout=10.0, retries=0))
    results = score_completions(completions, samples, ["accuracy", "format", "tar"], context)
    got = [(row["accuracy"], row["format"], row["tar"]) for row in results["samples"]]
    assert got == expected
    assert results["accuracy"] == pytest.approx(1 / 3) and results["format"] == pytest.approx(2 / 3)
    assert results["tar"] == pytest.approx(1 / 3) and results["scored"]["tar"] == 6
    assert results["grounded_share"] == pytest.approx(2 / 3)  # the two tagged styles cite a time
    # Consistency is known where there is reasoning and an answer: right yes, wrong no.
    assert results["consistency"] == pytest.approx(0.5) and results["scored"]["consistency"] == 4
    assert results["accuracy_by_type"] == {"multiple choice": pytest.approx(1 / 3)}


def test_evaluate_refuses_tar_without_a_judge(tiny_demo):
    from video_r2.evaluate import evaluate

    data = tiny_demo / "data"
    with pytest.raises(SystemExit, match="judge_base_url"):
        evaluate(model=str(tiny_demo / "model"), data_path=str(data / "video-r2-eval-dataset.json"),
                 video_folder=str(data / "videos"), reward_funcs=["accuracy", "tar"])


def test_plot_draws_a_png_from_tensorboard_logs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "version_0"))
    for step in range(5):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.add_scalar("train/rewards/accuracy/mean", step / 5, step)
        writer.add_scalar("train/kl", 0.01 * step, step)
        writer.add_scalar("train/completions/mean_length", 20 + step, step)
    writer.close()
    out = subprocess.run([VIDEO_R2, "plot", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_says_what_to_pass_when_there_are_no_logs(tmp_path):
    out = subprocess.run([VIDEO_R2, "plot", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "events.out.tfevents" in (out.stderr + out.stdout)
