"""vLLM as GRPO's rollout engine (`video_r2.grpo.vllm_engine`) and vLLM's own server as TAR's judge.

Run in the vLLM test environment (`make test-vllm`, built by scripts/setup_vllm.sh); the main `make test`
has no vLLM and skips this file. The tiny model's text head size is 32: vLLM's CPU attention accepts 32,
64, 80, ... but not the 16 of the `tiny_demo` fixture, so this file builds its own demo.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here: `make test-vllm` runs these tests in .venv-vllm "
                "(scripts/setup_vllm.sh builds it)", allow_module_level=True)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from video_r2.grpo import RolloutArgs, completion_logps, completion_mask, sample_completions  # noqa: E402
from video_r2.grpo.rollout import generation_token_ids  # noqa: E402
from video_r2.model import apply_lora, load_model, load_processor  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 16
# vLLM and the policy disagree on video prompts by up to ~1e-2 nats (transformers 5 places the text after a video
# at other rope positions than vLLM and the original Qwen2.5-VL code do); text agrees to ~1e-6.
VIDEO_GAP = 0.05


@pytest.fixture(scope="module")
def vllm_demo(tmp_path_factory) -> Path:
    from video_r2.synthetic import make_demo

    return make_demo(tmp_path_factory.mktemp("vllm") / "demo", num_sft_videos=2, num_grpo_videos=4,
                     num_eval_videos=1, text_hidden=128, seed=0)


@pytest.fixture(scope="module")
def processor(vllm_demo):
    return load_processor(vllm_demo / "model")


@pytest.fixture(scope="module")
def token_ids(vllm_demo, processor):
    return generation_token_ids(load_model(vllm_demo / "model"), processor.tokenizer)


@pytest.fixture(scope="module")
def engine(vllm_demo, token_ids):
    """One in-process engine for the module (starting one takes ~15-40 s on 2 cores)."""
    from video_r2.grpo.vllm_engine import VLLMEngine

    eos, pad, suppress = token_ids
    args = RolloutArgs(num_generations=2, max_completion_length=MAX_NEW, temperature=1.0, top_k=None)
    engine = VLLMEngine(str(vllm_demo / "model"), args, eos_token_ids=eos, pad_token_id=pad,
                        suppress_tokens=suppress, max_model_len=1024)
    yield engine
    engine.close()


@pytest.fixture
def fresh(engine, vllm_demo):
    """The starting weights, in the policy and (after the test, again) in the engine."""
    model = load_model(vllm_demo / "model")
    yield model
    engine.push_weights(load_model(vllm_demo / "model"), full=True)


def text_prompt(processor, n: int) -> dict:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template([{"role": "user", "content": f"Question {i}: say something {'else ' * i}."}],
                                           add_generation_prompt=True, tokenize=False) for i in range(n)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": torch.zeros_like(enc["input_ids"])}


def video_batch(vllm_demo, processor, n: int = 2) -> tuple[dict, list[dict]]:
    from video_r2.data.budget import Sampling
    from video_r2.data.dataset import Collator, VideoR2Dataset

    data = vllm_demo / "data"
    records = json.loads((data / "video-r2-grpo-dataset.json").read_text())
    dataset = VideoR2Dataset(records, processor, data / "videos", data / "subtitles", stage="grpo",
                             sampling=Sampling(fps=2.0, max_frames=16, min_frames=4, video_min_pixels=3136,
                                               video_max_pixels=3136), keep_frames=True)
    batch = Collator(processor.tokenizer.pad_token_id, "left")([dataset[i] for i in range(n)])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, batch["samples"]


def policy_logps(model, rollout, visuals, G) -> torch.Tensor:
    """The policy's log-probs of a rollout's completions, exactly as GRPOModule.sequence_logps takes them."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], 1)
    kwargs = visuals.for_rows(range(rollout.num_completions), G)
    L = rollout.completion_ids.shape[1]
    kwargs["mm_token_type_ids"] = torch.nn.functional.pad(rollout.mm_token_type_ids, (0, L))
    return completion_logps(model, ids, mask, rollout.completion_ids.shape[1], **kwargs)


def test_greedy_text_completions_equal_hf_generate(engine, fresh, processor, token_ids):
    eos, pad, suppress = token_ids
    prompt = text_prompt(processor, 3)
    hf, _ = sample_completions(fresh.eval(), prompt, 1, eos_token_ids=eos, pad_token_id=pad, suppress_tokens=suppress,
                               do_sample=False, max_new_tokens=MAX_NEW)
    ours, _, _ = engine.sample(fresh, prompt, None, 1, temperature=0.0)
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert torch.equal(ours.completion_mask, hf.completion_mask)
    assert torch.equal(ours.prompt_ids, hf.prompt_ids) and torch.equal(ours.prompt_mask, hf.prompt_mask)


def test_sampled_groups_have_the_hf_layout(engine, fresh, processor, token_ids):
    """G completions per prompt, adjacent rows, distinct streams, EOS masking as on the HF path, and seeded."""
    eos, pad, suppress = token_ids
    prompt = text_prompt(processor, 2)
    G = 4
    a, _, logps = engine.sample(fresh, prompt, None, G, seed=123)
    b, _, _ = engine.sample(fresh, prompt, None, G, seed=123)
    assert a.completion_ids.shape[0] == 2 * G and torch.equal(a.completion_ids, b.completion_ids)
    assert len({tuple(row.tolist()) for row in a.completion_ids}) == 2 * G  # no two rows share a random stream
    assert torch.equal(a.prompt_ids, prompt["input_ids"].repeat_interleave(G, 0))
    assert torch.equal(a.completion_mask, completion_mask(a.completion_ids, eos))
    assert not torch.isin(a.completion_ids, torch.tensor(suppress)).any()
    assert (logps <= 0).all() and (logps[a.completion_mask == 0] == 0).all()


def test_a_completion_ends_with_its_eos_token(engine, fresh, processor, token_ids):
    """vLLM keeps the EOS it stopped at, so the mask counts it as on the HF path (not a truncated row)."""
    eos, pad, suppress = token_ids
    rollout, _, logps = engine.sample(fresh, text_prompt(processor, 2), None, 2, seed=0, logit_bias={eos[0]: 100.0})
    assert rollout.completion_ids.shape[1] == 1 and (rollout.completion_ids[:, 0] == eos[0]).all()
    assert rollout.completion_mask.tolist() == [[1]] * 4
    forced = engine.sample(fresh, text_prompt(processor, 2), None, 2, seed=0, mask_truncated=True,
                           logit_bias={eos[0]: 100.0})[0]
    assert forced.completion_mask.tolist() == [[1]] * 4  # ended by EOS: kept under mask_truncated too


def test_video_completions_are_valid_and_masked_the_same_way(engine, fresh, vllm_demo, processor, token_ids):
    eos, pad, suppress = token_ids
    prompt, samples = video_batch(vllm_demo, processor)
    G = 2
    rollout, visuals, engine_logps = engine.sample(fresh, prompt, samples, G, seed=0)
    N = prompt["input_ids"].shape[0] * G
    assert rollout.completion_ids.shape[0] == N and rollout.completion_ids.shape[1] <= MAX_NEW
    assert not torch.isin(rollout.completion_ids, torch.tensor(suppress)).any()  # no vision tokens sampled
    mask = completion_mask(rollout.completion_ids, eos)
    assert torch.equal(rollout.completion_mask, mask)
    assert (rollout.completion_ids[mask == 0] == pad).all()  # after the first EOS: padding, as on the HF path
    assert torch.equal(rollout.mm_token_type_ids, prompt["mm_token_type_ids"].repeat_interleave(G, 0))
    # The policy can score them (its video tokens match its features) and agrees within the measured gap.
    with torch.no_grad():
        policy = policy_logps(fresh, rollout, visuals, G)
    assert torch.isfinite(policy).all()
    from video_r2.grpo.vllm_engine import logp_gap

    gap = logp_gap(engine_logps, policy, mask)
    assert gap["vllm/logp_gap_max"] < VIDEO_GAP + 0.01, gap  # + the banned vision tokens' share of the mass


def _fixed_logps(engine, requests, completions) -> list[list[float]]:
    return engine.completion_logps(requests, completions)


def _max_gap(a: list[list[float]], b: torch.Tensor, lengths: list[int]) -> float:
    return max(abs(x - y) for row, ref, n in zip(a, b, lengths) for x, y in zip(row, ref[:n].tolist()))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_pushed_weights_track_the_policy_after_a_step(engine, fresh, processor, token_ids, lora):
    """After an optimizer step and a push, the engine's log-probs of fixed completions are the policy's."""
    eos, pad, suppress = token_ids
    model = apply_lora(fresh, r=8, alpha=16, dropout=0.0) if lora else fresh
    if lora:
        engine.push_weights(model, full=True)
    prompt = text_prompt(processor, 2)
    G = 2
    rollout, visuals, _ = engine.sample(model, prompt, None, G, seed=7)
    mask = completion_mask(rollout.completion_ids, eos)
    completions = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids, mask)]
    lengths = [len(c) for c in completions]
    requests = [r for r in engine.requests(prompt, None) for _ in range(G)]

    with torch.no_grad():
        before = policy_logps(model, rollout, visuals, G)
    engine_before = _fixed_logps(engine, requests, completions)
    assert _max_gap(engine_before, before, lengths) <= 1e-5

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = -(policy_logps(model, rollout, visuals, G) * mask).sum()
    loss.backward()
    optimizer.step()
    sent = engine.push_weights(model)
    assert sent > 0
    with torch.no_grad():
        after = policy_logps(model, rollout, visuals, G)
    engine_after = _fixed_logps(engine, requests, completions)
    assert _max_gap(engine_after, after, lengths) <= 1e-5
    assert _max_gap(engine_after, before, lengths) > 1e-3  # the step moved them, and the engine saw it


def test_pushed_weights_track_the_policy_on_video(engine, fresh, vllm_demo, processor, token_ids):
    """Video after a push: no stale encoder cache (the engine lives on), log-probs within the measured gap."""
    eos, pad, suppress = token_ids
    prompt, samples = video_batch(vllm_demo, processor)
    G = 2
    rollout, visuals, _ = engine.sample(fresh, prompt, samples, G, seed=3)
    mask = completion_mask(rollout.completion_ids, eos)
    completions = [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids, mask)]
    lengths = [len(c) for c in completions]
    requests = [r for r in engine.requests(prompt, samples) for _ in range(G)]
    with torch.no_grad():
        before = policy_logps(fresh, rollout, visuals, G)
    assert _max_gap(_fixed_logps(engine, requests, completions), before, lengths) <= VIDEO_GAP

    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    (-(policy_logps(fresh, rollout, visuals, G) * mask).sum()).backward()
    optimizer.step()
    engine.push_weights(fresh)
    with torch.no_grad():
        after = policy_logps(fresh, rollout, visuals, G)
    engine_after = _fixed_logps(engine, requests, completions)
    assert _max_gap(engine_after, after, lengths) <= VIDEO_GAP
    assert _max_gap(engine_after, before, lengths) > 0.1  # far beyond the gap: the push took effect
    engine.sample(fresh, prompt, samples, G, seed=4)  # and sampling video again works


# ---- a 3-step GRPO run with rollout_engine vllm --------------------------------------------------------------


def test_fit_cli_runs_grpo_with_vllm_rollouts(vllm_demo, rules_judge, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_grpo import _run, grpo_cli

    from video_r2.plot import read_scalars

    args = grpo_cli(vllm_demo, rules_judge.base_url, tmp_path, "--trainer.max_steps", "3",
                    "--model.init_args.rollout.rollout_engine", "vllm",
                    "--model.init_args.rollout.vllm_kv_cache_gb", "1",
                    "--model.init_args.rollout.vllm_max_model_len", "1024",
                    "--model.init_args.rollout.vllm_importance_sampling_cap", "2.0")
    out = _run(args, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    scalars = read_scalars(tmp_path / "demo-grpo")
    for tag in ("train/vllm/logp_gap_mean", "train/vllm/logp_gap_max", "train/time/vllm_push_s", "train/reward/mean",
                "train/kl", "train/vllm/is_weight_mean"):
        assert len(scalars[tag]) == 3, (tag, sorted(scalars))
        assert all(math.isfinite(v) for _, v in scalars[tag])
    assert all(v < VIDEO_GAP + 0.05 for _, v in scalars["train/vllm/logp_gap_max"]), scalars["train/vllm/logp_gap_max"]
    # Truncated importance sampling: weights near 1 (the engine is the policy up to numerics), never above the cap.
    assert all(0.9 < v <= 2.0 for _, v in scalars["train/vllm/is_weight_mean"]), scalars["train/vllm/is_weight_mean"]
    assert scalars["train/judge/failures"][-1][1] == 0


def test_fit_cli_runs_grpo_with_vllm_rollouts_under_fsdp2(vllm_demo, rules_judge, tmp_path):
    """Two ranks, each with its own engine (external_launcher); FSDP2 weights gathered layer by layer per push."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_grpo import TWO_PROCESS_STRATEGIES, _run, grpo_cli

    from video_r2.plot import read_scalars

    args = grpo_cli(vllm_demo, rules_judge.base_url, tmp_path, "--trainer.max_steps", "2", "--trainer.devices", "2",
                    *TWO_PROCESS_STRATEGIES["fsdp2"], "--model.init_args.rollout.rollout_engine", "vllm",
                    "--model.init_args.rollout.vllm_max_model_len", "1024")
    out = _run(args, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Failed to load weights" not in out.stderr and "were not loaded" not in out.stderr
    scalars = read_scalars(tmp_path / "demo-grpo")
    assert len(scalars["train/vllm/logp_gap_max"]) == 2
    assert all(v < VIDEO_GAP + 0.05 for _, v in scalars["train/vllm/logp_gap_max"])
    assert (tmp_path / "demo-grpo" / "hf" / "final" / "model.safetensors").exists()


# ---- vLLM's own OpenAI server as TAR's judge -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(vllm_demo, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, serving the tiny model."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("vllm-server") / "server.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_demo / "model"),
         "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager", "--seed", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the vLLM server exited with {process.returncode}: {Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        process.terminate()
        pytest.fail(f"the vLLM server did not come up: {Path(log.name).read_text()[-3000:]}")
    yield base
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _running_requests(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))


def test_vllm_server_as_tar_judge(vllm_server):
    """Our JudgeClient against vLLM's server: concurrent calls; unreadable replies are None, never 0."""
    from video_r2.judge import JudgeClient
    from video_r2.rewards import RewardContext, tar_details

    judge = JudgeClient(base_url=f"{vllm_server}/v1", model="tiny-judge", max_concurrency=8, timeout=120,
                        retries=0, cache=False, max_failure_fraction=1.0, max_tokens=48)
    completions = [f"<think>At 00:0{i} a red circle fills the screen; at 00:0{i + 2} a green square.</think>"
                   f"<answer>A</answer>" for i in range(8)]
    samples = [{"question": "Which shape is shown first?", "answer": "A",
                "temporal_grounding": {"0-2": "a red circle fills the screen", "2-4": "a green square"}}] * 8
    peak, stop = [0.0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], _running_requests(vllm_server))
            except OSError:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        details = tar_details(completions, samples, RewardContext(judge=judge))
    finally:
        stop.set()
        watcher.join()
        judge.close()
    counts = judge.counters()
    assert counts["judge/calls"] >= 8 and counts["judge/requests"] >= 8
    assert peak[0] > 1, "the judge's requests never overlapped at the server"
    assert counts["judge/failures"] == counts["judge/unparsed"] > 0  # the server answered; the tiny model is unreadable
    unreadable = [d for d in details if d.claims is None]
    assert unreadable, [d.claims for d in details]
    assert all(d.reward is None for d in unreadable)  # a failed judgement is no reward, never a zero
