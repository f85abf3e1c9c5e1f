"""The foundation: package, CLI, the tiny checkpoint and the synthetic dataset's labels."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from video_r2.synthetic import EVENTS, make_demo


def test_package_imports_and_cli_lists_commands():
    import video_r2

    assert video_r2.__version__
    out = subprocess.run([sys.executable, "-m", "video_r2.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("fit", "merge-lora", "make-demo", "check-data"):
        assert command in out.stdout


def test_unknown_command_exits_2():
    out = subprocess.run([sys.executable, "-m", "video_r2.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def _video_inputs(demo: Path):
    from torchcodec.decoders import VideoDecoder
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(demo / "model")
    times = [0.25 + 0.5 * i for i in range(8)]
    frames = VideoDecoder(str(demo / "data/videos/sft_0000.mp4")).get_frames_played_at(seconds=times).data
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What fills the screen?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    meta = VideoMetadata(total_num_frames=64, fps=8.0, frames_indices=[int(t * 8) for t in times], duration=8.0)
    return processor(
        text=[text], videos=[frames], return_tensors="pt",
        videos_kwargs={"video_metadata": [meta], "do_sample_frames": False, "do_resize": False},
    )


def test_checkpoint_round_trips_with_video_input(tiny_demo, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_demo / "model").eval()
    inputs = _video_inputs(tiny_demo)
    assert inputs["pixel_values_videos"].shape[0] > 0
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "again")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
    assert torch.equal(before, after)
    assert (tmp_path / "again" / "model.safetensors").exists()


def test_tokenizer_has_qwen_special_tokens_and_splits_digits(tiny_demo):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_demo / "model").tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|video_pad|>", "<|vision_start|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert [t for t in tokenizer.tokenize("00:12") if t.isdigit()] == ["0", "0", "1", "2"]


def _records(demo: Path) -> list[dict]:
    return [r for split in ("sft", "grpo", "eval")
            for r in json.loads((demo / f"data/video-r2-{split}-dataset.json").read_text())]


def test_videos_decode_and_labels_are_true(tiny_demo):
    """Every video lasts its stated duration and shows the stated shape at each grounded time."""
    from torchcodec.decoders import VideoDecoder

    from video_r2.rewards import parse_timestamp_key

    records = _records(tiny_demo)
    assert {r["question_type"] for r in records} <= {"multiple choice", "numerical"}
    for record in records:
        decoder = VideoDecoder(str(tiny_demo / "data/videos" / record["video"]))
        assert decoder.metadata.duration_seconds == pytest.approx(8.0, abs=0.2)
        for key, claim in record["temporal_grounding"].items():
            start, end = parse_timestamp_key(key)
            colour = claim.split()[1]
            rgb = torch.tensor(next(e[2] for e in EVENTS if e[0] == colour), dtype=torch.float)
            for t in (start + 0.1, (start + end) / 2, end - 0.2):
                frame = decoder.get_frame_played_at(seconds=t).data
                centre = frame[:, 24:32, 24:32].float().mean(dim=(1, 2))
                assert torch.dist(centre, rgb) < 40, (record["video"], key, t, centre)


def test_answers_depend_on_time(tiny_demo):
    for record in _records(tiny_demo):
        think = record["conversations"][1]["value"]
        assert think.startswith("<think>") and think.endswith("</answer>")
        assert "<video>" in record["conversations"][0]["value"]
    subtitles = list((tiny_demo / "data/subtitles").glob("*.srt"))
    assert subtitles and all((tiny_demo / "data/videos" / f"{s.stem}.mp4").exists() for s in subtitles)


def _reasoning(record: dict) -> str:
    return record["conversations"][1]["value"].split("</think>")[0].removeprefix("<think>")


def test_sft_answers_mix_a_grounded_and_a_plain_style(tiny_demo):
    """Grounded reasoning cites a second inside the asked segment, plain reasoning cites none; both end in the
    record's answer. Only SFT mixes them: the other splits' answers are references."""
    from video_r2.judge.rules import extract_claims
    from video_r2.rewards import parse_timestamp_key

    sft = json.loads((tiny_demo / "data/video-r2-sft-dataset.json").read_text())
    styles = [r["reasoning_style"] for r in sft]
    assert set(styles) == {"grounded", "plain"}  # the default mix has no wrong seconds
    for record in _records(tiny_demo):
        answer = record["conversations"][1]["value"].split("<answer>")[1].removesuffix("</answer>")
        think = _reasoning(record)
        assert think.endswith(f"so the answer is {answer}.")
        claims = extract_claims(think)
        if record["reasoning_style"] == "plain":
            assert claims == {} and not any(ch.isdigit() for ch in think.removesuffix(f"{answer}."))
        else:
            (key,) = claims
            start, _ = parse_timestamp_key(key)
            spans = [parse_timestamp_key(k) for k in record["temporal_grounding"]]
            shape = think.split(" a ", 1)[1].split(" fill")[0].split(" starts")[0]
            assert any(a <= start < b and shape in record["temporal_grounding"][k]
                       for (a, b), k in zip(spans, record["temporal_grounding"]))
    assert all(r["reasoning_style"] == "grounded" for split in ("grpo", "eval")
               for r in json.loads((tiny_demo / f"data/video-r2-{split}-dataset.json").read_text()))


def test_style_mix_follows_its_fractions_and_leaves_the_questions_alone(tmp_path):
    sizes = dict(num_sft_videos=20, num_grpo_videos=1, num_eval_videos=1, text_hidden=32, seed=5)
    mixed = make_demo(tmp_path / "mixed", grounded_fraction=0.4, wrong_time_fraction=0.2, **sizes)
    plain = make_demo(tmp_path / "plain", grounded_fraction=0.0, **sizes)
    a = json.loads((mixed / "data/video-r2-sft-dataset.json").read_text())
    b = json.loads((plain / "data/video-r2-sft-dataset.json").read_text())
    shares = {style: sum(r["reasoning_style"] == style for r in a) / len(a) for style in ("grounded", "plain", "wrong_time")}
    assert abs(shares["grounded"] - 0.4) < 0.12 and abs(shares["wrong_time"] - 0.2) < 0.1
    assert {r["reasoning_style"] for r in b} == {"plain"}
    # The mix draws from its own stream: the same videos, questions and answers either way.
    assert [r["conversations"][0] for r in a] == [r["conversations"][0] for r in b]
    assert [r["conversations"][1]["value"].split("<answer>")[1] for r in a] == \
        [r["conversations"][1]["value"].split("<answer>")[1] for r in b]
    from video_r2.judge.rules import extract_claims
    from video_r2.rewards import parse_timestamp_key

    for record in (r for r in a if r["reasoning_style"] == "wrong_time"):  # timestamped, outside the asked segment
        (key,) = extract_claims(_reasoning(record))
        t, _ = parse_timestamp_key(key)
        shape = _reasoning(record).split(" a ", 1)[1].split(" fill")[0].split(" starts")[0]
        (span,) = [parse_timestamp_key(k) for k, v in record["temporal_grounding"].items() if shape in v]
        assert not span[0] <= t < span[1]
    with pytest.raises(ValueError, match="grounded_fraction"):
        make_demo(tmp_path / "bad", grounded_fraction=0.8, wrong_time_fraction=0.3, **sizes)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_demo_is_deterministic(tmp_path):
    sizes = dict(num_sft_videos=2, num_grpo_videos=1, num_eval_videos=1, seed=3, text_hidden=64)
    a, b = make_demo(tmp_path / "a", **sizes), make_demo(tmp_path / "b", **sizes)
    for split in ("sft", "grpo", "eval"):
        name = f"data/video-r2-{split}-dataset.json"
        assert (a / name).read_text() == (b / name).read_text()
    assert _digest(a / "model/model.safetensors") == _digest(b / "model/model.safetensors")
    assert (a / "model/tokenizer.json").read_text() == (b / "model/tokenizer.json").read_text()
    c = make_demo(tmp_path / "c", **{**sizes, "seed": 4})
    assert _digest(a / "model/model.safetensors") != _digest(c / "model/model.safetensors")


def test_make_demo_writes_the_same_videos_in_every_process(tmp_path):
    """Two `video-r2 make-demo` processes decode to the same pixels (lossy x264 did not: up to 30 levels off in
    most files, so a demo trained on other data each run)."""
    import subprocess
    import sys
    from pathlib import Path

    from torchcodec.decoders import VideoDecoder

    cli = str(Path(sys.executable).parent / "video-r2")
    sizes = ["--num_sft_videos", "6", "--num_grpo_videos", "2", "--num_eval_videos", "2", "--text_hidden", "64"]
    runs = [subprocess.Popen([cli, "make-demo", "--out", str(tmp_path / name), *sizes], stdout=subprocess.DEVNULL)
            for name in ("a", "b")]  # side by side, as under load
    assert [p.wait(timeout=300) for p in runs] == [0, 0]
    videos = sorted((tmp_path / "a" / "data" / "videos").glob("*.mp4"))
    assert len(videos) == 10
    for video in videos:
        twin = tmp_path / "b" / "data" / "videos" / video.name
        a, b = (VideoDecoder(str(v)).get_frames_in_range(0, 64).data for v in (video, twin))
        assert torch.equal(a, b), video.name


def test_make_demo_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_demo(tmp_path / "x", num_sft_videos=1, num_grpo_videos=1, num_eval_videos=1)
    assert (tmp_path / "x" / "keep.txt").exists()


def test_sweep_clock_gives_every_second_its_own_place_below_the_drawn_text():
    """The tiny vision tower reads the time from the clock: the drawn HH:MM:SS is clipped on 56 px frames.
    Each second's dot sits further right than the last, and neither the drawn time nor a subtitle covers it."""
    from video_r2.overlay import overlay_frames
    from video_r2.synthetic import Segment, render_video

    frames = render_video([Segment(0, 5, 0), Segment(5, 8, 2)], size=56, frame_rate=8, clock="sweep")
    seconds = frames[::8]  # one frame at the start of each second
    drawn = overlay_frames(seconds, [float(t) for t in range(8)], cues=[(0.0, 8.0, "a long subtitle shown all along")])
    dot = 56 // 14
    places = []
    for plain, overlaid in zip(seconds, drawn):
        white = (plain[:, -dot:] == 255).all(dim=0).all(dim=0).nonzero().flatten()
        assert len(white) == dot  # one dot, dot pixels wide
        assert torch.equal(plain[:, -dot:], overlaid[:, -dot:])  # the overlays leave the clock alone
        places.append(white[0].item())
    assert places == sorted(set(places)) and places[0] == 0 and places[-1] > 40

    default = render_video([Segment(0, 5, 0), Segment(5, 8, 2)], size=56, frame_rate=8)  # "dot": every 2 s
    assert torch.equal(default[0], default[16]) and not torch.equal(default[0], default[4])

    bar = render_video([Segment(0, 4, 0), Segment(4, 8, 1)], size=56, frame_rate=8, clock="bar")
    lengths = [(f[:, :, -1] == 255).all(dim=0).sum().item() for f in bar]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] == 56  # full in the last frame
    with pytest.raises(ValueError, match="clock must be one of"):
        render_video([Segment(0, 4, 0), Segment(4, 8, 1)], size=56, frame_rate=8, clock="sundial")


@pytest.mark.parametrize("bad", [{"clock": "sundial"}, {"grounded_fraction": 0.8, "wrong_time_fraction": 0.5}])
def test_make_demo_checks_its_options_before_replacing_a_folder(tmp_path, bad):
    """With overwrite the output folder is deleted: a bad option must fail first and leave it as it was."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError):
        make_demo(tmp_path / "x", num_sft_videos=1, num_grpo_videos=1, num_eval_videos=1, overwrite=True, **bad)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_time_gets_rope_frequencies_slow_enough_to_tell_every_second_apart(tiny_demo, tmp_path):
    """M-RoPE gives time the fastest rotary frequencies. The demo model (32-dim heads, 8 positions per second,
    8 s clips) gives it half the pairs, so its slowest temporal frequency turns less than half a circle over a
    clip: each second has its own phase. Qwen's quarter share would wrap around within the clip."""
    from transformers import AutoTokenizer

    from video_r2.synthetic import build_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_demo / "model")
    model = build_model(tokenizer, text_hidden=128, text_layers=1, vision_hidden=32, vision_depth=1)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    section = text.rope_parameters["mrope_section"]
    assert sum(section) == head_dim // 2 and section == [8, 4, 4]
    clip_positions = model.config.vision_config.tokens_per_second * 7  # first to last 1 s grid of an 8 s clip

    def slowest_turn(temporal_pairs: int) -> float:  # radians the slowest temporal frequency turns over a clip
        theta = text.rope_parameters["rope_theta"]
        return theta ** (-2 * (temporal_pairs - 1) / head_dim) * clip_positions

    assert slowest_turn(section[0]) < 3.1416 < slowest_turn(4)  # 4 pairs: Qwen's quarter share
    # A share that leaves no room for height and width is refused before --overwrite deletes anything.
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old.txt").write_text("old run")
    with pytest.raises(ValueError, match="temporal_rope_pairs"):
        make_demo(tmp_path / "keep", temporal_rope_pairs=15, overwrite=True)
    assert (tmp_path / "keep" / "old.txt").read_text() == "old run"
