"""`make demo`'s script end to end at toy size: every stage runs, in order, with the real commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_a_summary(tmp_path):
    out, runs = tmp_path / "demo", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--tiny", "--out", str(out), "--runs", str(runs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("make-demo", "sft", "merge-lora", "grpo", "evaluate-base", "evaluate-sft", "evaluate-grpo"):
        assert f"=== {stage}: done" in proc.stdout, stage
    assert (out / "sft-merged" / "model.safetensors").exists()
    for name in ("base", "sft", "grpo"):
        result = json.loads((out / f"eval-{name}.json").read_text())
        assert result["num_samples"] == 4 and {"accuracy", "format", "tar"} <= set(result)
    assert (runs / "demo-sft" / "curves.png").exists() and (runs / "demo-grpo" / "curves.png").exists()
    summary = (out / "summary.txt").read_text()
    assert "held-out evaluation" in summary and "judge calls" in summary and "shortcut" in summary


def test_demo_stops_with_the_failing_stage_named(tmp_path):
    """A stage that fails stops the demo: its name, its log, and a non-zero exit."""
    runs = tmp_path / "runs"
    runs.write_text("a file where the logs folder should be")  # SFT cannot write its logs
    proc = subprocess.run(
        [sys.executable, "scripts/demo.py", "--tiny", "--out", str(tmp_path / "demo"), "--runs", str(runs)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "stage 'sft' failed" in proc.stderr and "sft.log" in proc.stderr
