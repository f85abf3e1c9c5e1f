"""Every shipped config: each key carries a comment, and the CLI parses it without building anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
FIT_CONFIGS = [c for c in CONFIGS if "trainer" in yaml.safe_load((REPO / c).read_text())]


def test_the_recipe_and_demo_configs_are_all_found():
    assert {"configs/sft.yaml", "configs/grpo.yaml", "configs/demo/sft.yaml", "configs/demo/grpo.yaml"} <= set(FIT_CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_key_has_a_comment(config):
    for number, line in enumerate((REPO / config).read_text().splitlines(), 1):
        if re.match(r"^\s*(- )?[A-Za-z_][\w.]*:", line):
            assert "#" in line, f"{config}:{number} has no comment: {line.strip()}"


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_print_config_validates_without_building_anything(config):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "video_r2.cli", "fit", "--config", config, "--print_config"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = yaml.safe_load(out.stdout)
    written = yaml.safe_load((REPO / config).read_text())
    assert printed["model"]["class_path"].split(".")[-1] == written["model"]["class_path"].split(".")[-1]
    assert printed["trainer"]["max_steps"] == written["trainer"].get("max_steps", printed["trainer"]["max_steps"])
    assert "Loading weights" not in out.stderr + out.stdout  # nothing was loaded


def test_the_recipe_configs_carry_the_originals_values():
    sft = yaml.safe_load((REPO / "configs/sft.yaml").read_text())
    grpo = yaml.safe_load((REPO / "configs/grpo.yaml").read_text())
    for cfg in (sft, grpo):
        assert cfg["data"]["system_prompt"] == "You are a helpful assistant."  # both stages, as the original
        assert cfg["data"]["sampling"]["video_min_pixels"] == 128 * 28 * 28
        assert cfg["data"]["sampling"]["video_max_pixels"] == 360 * 420
        assert cfg["data"]["sampling"]["frame_positions"] == "linspace"  # the original's frame positions
    sampling = grpo["model"]["init_args"]["rollout"]
    assert (sampling["temperature"], sampling["top_k"], sampling["num_generations"]) == (0.9, 50, 8)
    s, g = sft["data"]["sampling"], grpo["data"]["sampling"]
    assert (s["fps"], s["max_frames"], g["fps"], g["max_frames"]) == (
        1.0, 128, 2.0, 32)


def test_the_grpo_recipe_takes_one_prompt_and_eight_completions_per_optimizer_step():
    """The original: 8 GPUs, one completion each, of one prompt (global batch 8 completions)."""
    grpo = yaml.safe_load((REPO / "configs/grpo.yaml").read_text())
    devices, rollout, data = grpo["trainer"]["devices"], grpo["model"]["init_args"]["rollout"], grpo["data"]
    prompts_per_step = devices // rollout["ranks_per_group"] * data["batch_size"]
    assert (prompts_per_step, rollout["num_generations"]) == (1, 8)
    assert data["ranks_per_group"] == rollout["ranks_per_group"] == devices == 8
