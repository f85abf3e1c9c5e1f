"""`video-r2 inspect`: the HTML report shows the claims, matches, verdicts and rewards TAR really computed."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

VIDEO_R2 = str(Path(sys.executable).parent / "video-r2")


class Report(HTMLParser):
    """The parts of the report the tests read, per sample id: claim rows, rewards, the verdict, notes."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, dict] = {}
        self.current: dict | None = None
        self.reward: str | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "sample" in classes:
            self.current = self.samples[a["data-id"]] = {"claims": [], "rewards": {}, "notes": set()}
        elif self.current is None:
            return
        elif tag == "tr" and "claim" in classes:
            self.current["claims"].append((a["data-key"], int(a["data-event"]), a["data-matched"]))
        elif tag == "td" and "reward" in classes:
            self.reward = a["data-name"]
        elif tag == "p" and "verdict" in classes:
            self.current["consistent"] = a["data-consistent"]
        elif tag == "p" and classes:
            self.current["notes"].update(classes)
        elif tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self.reward is not None:
            self.current["rewards"][self.reward] = float(data)
            self.reward = None


def _known_evaluation(tiny_demo: Path, judge_url: str, path: Path) -> tuple[list[dict], list[dict]]:
    """An evaluation JSON as `video-r2 evaluate` writes it, for four hand-written completions of the held-out
    records: grounded and right, no time at all, a wrong second, and an answer its reasoning does not give."""
    from video_r2.data import Sampling
    from video_r2.data.chat import reward_sample
    from video_r2.judge import JudgeClient
    from video_r2.rewards import RewardContext, compute_rewards, tar_details
    from video_r2.synthetic import EVENTS, OPTION_LETTERS
    from video_r2.formats import format_mmss

    records = json.loads((tiny_demo / "data/video-r2-eval-dataset.json").read_text())[:4]
    samples = [reward_sample(r, i, "") for i, r in enumerate(records)]
    completions = []
    for kind, (record, sample) in zip(("right", "plain", "wrong_time", "inconsistent"), zip(records, samples)):
        segments = record["segments"]
        first = segments[0]
        shape = " ".join(EVENTS[first["event"]][:2])
        letter = OPTION_LETTERS[first["event"]]
        at = format_mmss(first["start"])
        think = {
            "right": f"At {at} a {shape} fills the screen, so the answer is {letter}.",
            "plain": f"A {shape} fills the screen, so the answer is {letter}.",
            # 2 s past the segment: more than the two 0.5 s buffers away, so no overlap with it.
            "wrong_time": f"At {format_mmss(first['end'] + 2)} a {shape} fills the screen, so the answer is {letter}.",
            "inconsistent": f"At {at} a {shape} fills the screen, so the answer is {letter}.",
        }[kind]
        answer = OPTION_LETTERS[(first["event"] + 1) % 4] if kind == "inconsistent" else letter
        completions.append(f"<think>{think}</think><answer>{answer}</answer>")
    context = RewardContext(judge=JudgeClient(base_url=judge_url), buffer_seconds=0.5, similarity_threshold=0.75)
    scores = compute_rewards(["accuracy", "format", "tar"], completions, samples, context)
    details = tar_details(completions, samples, context)
    context.judge.close()
    rows = [{"id": s["id"], "question_type": s["question_type"], "completion": c, "question": s["question"],
             "answer": s["answer"], "video": r["video"], **{k: scores[k][i] for k in scores},
             "grounded": d.grounded, "consistent": d.consistent, "tar_details": d.to_dict()}
            for i, (s, c, r, d) in enumerate(zip(samples, completions, records, details))]
    import dataclasses

    path.write_text(json.dumps({
        "model": "hand-written", "data_path": "eval", "num_samples": 4, "samples": rows,
        "tar": sum(r["tar"] for r in rows) / 4, "video_folder": str(tiny_demo / "data/videos"),
        "subtitles_folder": str(tiny_demo / "data/subtitles"),
        "sampling": dataclasses.asdict(Sampling(fps=2.0, max_frames=16, video_max_pixels=3136)),
        "draw_timestamps": True, "draw_subtitles": True,
    }))
    return rows, records


def test_inspect_shows_the_claims_matches_verdicts_and_rewards(tiny_demo, rules_judge, tmp_path):
    from video_r2.inspect import inspect

    evaluation = tmp_path / "eval.json"
    rows, records = _known_evaluation(tiny_demo, rules_judge.base_url, evaluation)
    report = Report()
    report.feed(inspect(evaluation, num_samples=4).read_text())
    right, plain, wrong, inconsistent = (report.samples[r["id"]] for r in rows)

    # Grounded and right: one claim at the first segment's start, matched to that segment (event 0), TAR 1.
    start = records[0]["segments"][0]["start"]
    assert {(key, event, matched) for key, event, matched in right["claims"]} == {
        (f"00:{start:02d}", 0, "0"), (f"00:{start:02d}", 1, "0")}
    assert right["rewards"] == {"accuracy": rows[0]["accuracy"], "format": 1.0, "tar": 1.0}
    assert right["consistent"] == "true"
    # No time in the reasoning: nothing to match, TAR 0.
    assert plain["claims"] == [] and "no-claims" in plain["notes"] and plain["rewards"]["tar"] == 0.0
    # A second of the other segment: a claim is extracted but matches nothing.
    assert wrong["claims"] and all(matched == "" for _, _, matched in wrong["claims"])
    assert wrong["rewards"]["tar"] == 0.0
    # The claim matches but the answer is not the reasoning's: the consistency gate zeroes TAR.
    assert any(matched == "0" for _, _, matched in inconsistent["claims"])
    assert inconsistent["consistent"] == "false" and inconsistent["rewards"]["tar"] == 0.0
    # The values shown are the ones the reward computed.
    assert [s["rewards"]["tar"] for s in (right, plain, wrong, inconsistent)] == [r["tar"] for r in rows]
    # One frame strip per sample, inline: the file needs nothing else.
    assert len(report.images) == 4 and all(src.startswith("data:image/png;base64,") for src in report.images)


def test_inspect_refuses_a_missing_evaluation_file(tmp_path):
    missing = tmp_path / "nowhere" / "eval-grpo.json"
    out = subprocess.run([VIDEO_R2, "inspect", str(missing)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "no evaluation file" in out.stderr and str(missing) in out.stderr and "video-r2 evaluate" in out.stderr


def test_inspect_refuses_an_evaluation_without_tar_details(tmp_path):
    from video_r2.inspect import inspect

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"samples": [{"id": "a", "completion": "x", "accuracy": 0.0}]}))
    with pytest.raises(SystemExit, match="--judge_base_url"):
        inspect(path)
