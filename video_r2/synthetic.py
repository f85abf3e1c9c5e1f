"""The embedded default: a tiny random Qwen2.5-VL checkpoint and a synthetic timestamped video dataset.

`video-r2 make-demo --out DIR` writes

    DIR/model/   config.json, model.safetensors, tokenizer (byte-level BPE with Qwen's special tokens),
                 chat template, processor configs: loads with `from_pretrained` like any checkpoint
    DIR/data/    video-r2-sft-dataset.json, video-r2-grpo-dataset.json, video-r2-eval-dataset.json,
                 videos/*.mp4 (H.264), subtitles/*.srt (for every other video)

The task makes *when* matter. Each video is a few segments; in each one a coloured shape fills the screen
(red circle, green square, blue triangle, yellow star) while a small white dot moves along the bottom edge.
Questions ask which shape fills the screen at a given second (multiple choice) or at which second a shape
first appears (numeric). The second asked about is drawn uniformly over the video, so answering with the
shape that fills most of the video (the task's shortcut) is right about 2 times in 3 and reading the time is
needed for the rest. (A tiny model learns that shortcut first and the timing after it; measured here, a task
without a shortcut stayed at chance in the demo's budget.) Each SFT video gets several questions about
different seconds, so that "this video -> this answer" cannot be memorised.

The SFT answers reason in two styles, mixed about half and half (`grounded_fraction`, 0.4): one cites the moment
("At 00:05 a red circle fills the screen, so the answer is A."), the other reaches the same answer without
any time ("A red circle fills the screen, so the answer is A."); optionally some cite a wrong second
(`wrong_time_fraction`). Accuracy and format cannot tell the styles apart, TAR can: after SFT the model
samples both, which gives GRPO with TAR something to teach and GRPO without it nothing (the demo's ablation).

The held-out eval file uses videos that neither training file uses. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from video_r2.formats import format_mmss as hms

# name, shape, RGB. The shape differs with the colour so that claims about different segments are far
# apart for the sentence embedder TAR uses (MiniLM cosine ~0.98 for the same claim, ~0.65 across shapes).
EVENTS: list[tuple[str, str, tuple[int, int, int]]] = [
    ("red", "circle", (220, 40, 40)),
    ("green", "square", (40, 180, 60)),
    ("blue", "triangle", (40, 70, 220)),
    ("yellow", "star", (230, 210, 40)),
]
OPTION_LETTERS = "ABCD"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template, in the same shape: text parts verbatim, each image or video part becomes
# <|vision_start|><|image_pad|/|video_pad|><|vision_end|>, which the processor expands to the real count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Segment:
    start: int  # seconds, inclusive
    end: int  # seconds, exclusive
    event: int  # index into EVENTS

    @property
    def name(self) -> str:
        colour, shape, _ = EVENTS[self.event]
        return f"{colour} {shape}"


# --------------------------------------------------------------------------------------------------
# videos
# --------------------------------------------------------------------------------------------------


def random_segments(rng: random.Random, duration: int, num_segments: int) -> list[Segment]:
    """Split [0, duration) at whole seconds into segments of at least 2 s, each a different event."""
    cuts = sorted(rng.sample(range(2, duration - 1), num_segments - 1)) if num_segments > 1 else []
    while any(b - a < 2 for a, b in zip([0, *cuts], [*cuts, duration])):
        cuts = sorted(rng.sample(range(2, duration - 1), num_segments - 1))
    events = rng.sample(range(len(EVENTS)), num_segments)
    bounds = [0, *cuts, duration]
    return [Segment(bounds[i], bounds[i + 1], events[i]) for i in range(num_segments)]


def _shape_image(event: int, size: int) -> Image.Image:
    _, shape, rgb = EVENTS[event]
    # A dark tint of the same colour behind the shape: every patch of the frame carries the colour, so a
    # tiny vision tower sees it even where the time and subtitle overlays cover the shape.
    image = Image.new("RGB", (size, size), tuple(c * 2 // 5 for c in rgb))
    draw = ImageDraw.Draw(image)
    m = size // 10  # margin: the shape fills most of the frame and always covers its centre
    box = (m, m, size - m, size - m)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(size / 2, m), (size - m, size - m), (m, size - m)], fill=rgb)
    else:  # star: two overlapping triangles
        draw.polygon([(size / 2, m), (size - m, size * 0.7), (m, size * 0.7)], fill=rgb)
        draw.polygon([(size / 2, size - m), (size - m, size * 0.3), (m, size * 0.3)], fill=rgb)
    return image


CLOCKS = ("dot", "sweep", "bar")


def render_video(segments: list[Segment], size: int, frame_rate: int, clock: str = "dot") -> torch.Tensor:
    """uint8 [T, 3, size, size]: each segment's shape, and a clock the vision tower can see.

    The drawn HH:MM:SS does not fit a small frame (its font is at least 16 px, so on 56 px only "00:00:"
    shows) and the subtitle box covers the middle rows; the bottom rows stay clear of both. "dot": a white
    dot sweeping the bottom edge every 2 s (the demo's); "sweep": a dot crossing it once over the video, so
    each second has its own position; "bar": a bar down the right edge whose length grows with the time.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    duration = segments[-1].end
    shapes = {s.event: np.asarray(_shape_image(s.event, size)) for s in segments}
    frames = []
    dot = max(2, size // 14)
    for i in range(duration * frame_rate):
        t = i / frame_rate
        segment = next(s for s in segments if s.start <= t < s.end)
        frame = shapes[segment.event].copy()
        if clock == "bar":  # grows downwards, full at the end
            frame[: max(1, round((t + 1 / frame_rate) / duration * size)), size - dot:] = 255
        else:
            x = int((t % 2.0) / 2.0 * (size - dot)) if clock == "dot" else round(t / duration * (size - dot))
            frame[size - dot:, x:x + dot] = 255
        frames.append(frame)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def write_video(path: Path, frames: torch.Tensor, frame_rate: int) -> None:
    from torchcodec.encoders import VideoEncoder

    # Lossless (crf 0): x264's lossy decisions differ from run to run (measured: decoded pixels off by up to
    # 30 levels in 6 of 10 files, one thread or many), and with them everything trained on the demo data.
    # Lossless output decodes to the same pixels every time, for ~20% more bytes.
    VideoEncoder(frames, frame_rate=frame_rate).to_file(str(path), crf=0)


def write_srt(path: Path, segments: list[Segment]) -> None:
    def stamp(s: float) -> str:
        return f"00:{int(s) // 60:02d}:{int(s) % 60:02d},000"

    cues = [f"{i}\n{stamp(s.start)} --> {stamp(s.end)}\nNow a {s.name}.\n" for i, s in enumerate(segments, 1)]
    path.write_text("\n".join(cues), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


def _options_text() -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}) {c} {s}" for i, (c, s, _) in enumerate(EVENTS))


STYLES = ("grounded", "plain", "wrong_time")  # how an SFT answer's reasoning refers to the moment


def _think(style: str, asked: Segment, moment: int, segments: list[Segment], verb: str, answer: str) -> str:
    """The reasoning of one answer. Worded like the grounding ("a ... fills the screen") so that TAR's
    embedder matches a claim about the right shape; "plain" states the same fact without any time."""
    if style == "plain":
        return f"A {asked.name} {verb}, so the answer is {answer}."
    if style == "wrong_time":  # a second inside another segment: timestamped, but TAR finds no match
        other = next(s for s in segments if s is not asked)
        moment = other.start + (other.end - other.start) // 2
    return f"At {hms(moment)} a {asked.name} {verb}, so the answer is {answer}."


def make_record(rng: random.Random, video_name: str, segments: list[Segment], numeric_fraction: float,
                t: int | None = None, record_id: str | None = None, style: str = "grounded") -> dict:
    """One record in the original schema, about second `t` (drawn uniformly if None) of the video.

    Its answer depends on *when*: what fills the screen at `t` (multiple choice), or at which second the
    shape showing at `t` first appears (a number). `style` (one of `STYLES`) picks how the reasoning
    refers to the moment; the answer is the same in every style.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    t = rng.randrange(segments[-1].end) if t is None else t
    asked = next(s for s in segments if s.start <= t < s.end)
    if rng.random() < numeric_fraction:
        question = f"At which second does the {asked.name} first appear? Answer with a number."
        answer = str(asked.start)
        think = _think(style, asked, asked.start, segments, "starts to fill the screen", answer)
        question_type = "numerical"
    else:
        question = f"What fills the screen at {hms(t)}?\n{_options_text()}\nAnswer with the option letter."
        answer = OPTION_LETTERS[asked.event]
        think = _think(style, asked, t, segments, "fills the screen", answer)
        question_type = "multiple choice"
    grounding = {f"{hms(s.start)}-{hms(s.end)}": f"A {s.name} fills the screen." for s in segments}
    return {
        "id": record_id or Path(video_name).stem,
        "video": video_name,
        "conversations": [
            {"from": "human", "value": f"<video>\n{question}"},
            {"from": "gpt", "value": f"<think>{think}</think><answer>{answer}</answer>"},
        ],
        "temporal_grounding": grounding,
        "question_type": question_type,
        # Not used for training: lets evaluation score the shortcut of answering with the longest segment.
        "segments": [asdict(s) for s in segments],
        "reasoning_style": style,  # not used for training either: how the answer above reasons
    }


def shortcut_answer(record: dict) -> str:
    """The answer of the task's shortcut: the event that fills most of the video, ignoring time."""
    segments = [Segment(**s) for s in record["segments"]]
    longest = max(segments, key=lambda s: s.end - s.start)
    if record["question_type"] == "numerical":
        return str(longest.start)
    return OPTION_LETTERS[longest.event]


# --------------------------------------------------------------------------------------------------
# tokenizer, processor and model
# --------------------------------------------------------------------------------------------------


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE with Qwen's special tokens; digits split one by one, as Qwen's pre-tokenizer does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[3:],
        model_max_length=32768,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # Small pixel floors so that the processor never upscales the tiny synthetic frames.
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 360 * 420})
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 360 * 420})
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


TEXT_HEADS = 4  # attention heads of the demo's language model


def mrope_section(text_hidden: int, temporal_rope_pairs: int | None = None) -> list[int]:
    """M-RoPE's split of each head's rotary pairs (head_dim / 2) into time, height and width: `temporal_rope_pairs`
    for time (default half, see `build_model`), the rest shared by height and width. Raises on a share that
    leaves either of them nothing."""
    half = text_hidden // TEXT_HEADS // 2
    temporal = half // 2 if temporal_rope_pairs is None else temporal_rope_pairs
    if not 1 <= temporal <= half - 2:
        raise ValueError(f"temporal_rope_pairs must be in 1..{half - 2} for text_hidden {text_hidden}, got {temporal}")
    return [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]


def build_model(tokenizer, text_hidden: int, text_layers: int, vision_hidden: int, vision_depth: int,
                tokens_per_second: int = 8, temporal_rope_pairs: int | None = None):
    """A randomly initialised Qwen2.5-VL whose special-token ids match `tokenizer`.

    `temporal_rope_pairs`: rotary frequency pairs of each head that carry the time (M-RoPE's temporal section; the
    rest is split between height and width); default half of them. Why half, not Qwen's quarter: the temporal
    section takes the *fastest* frequencies, and on a 32-dim head Qwen's share (4 of 16 pairs) leaves time only
    frequencies that wrap around within the 8 s clip (the slowest turns 11 rad over its 64 positions), so no head
    can tell second 1 from second 5 by position. With 8 pairs the slowest turns ~1 rad over the clip; with
    Qwen's share the demo's SFT never beat the task's shortcut, with this one (and configs/demo/sft.yaml's
    optimizer) it reads the time in every seed tried (README, "Why SFT reads the time now")."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    section = mrope_section(text_hidden, temporal_rope_pairs)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "out_hidden_size": text_hidden,
            "fullatt_block_indexes": list(range(vision_depth)),
            # More rope steps per second than Qwen's 4: the tiny model reads time from positions, and
            # frames 0.5 s apart must not share one position.
            "tokens_per_second": tokens_per_second,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def _corpus(records: list[dict]) -> list[str]:
    """Text the tokenizer learns its merges from: the dataset, our prompts, and the chat markup."""
    from video_r2.judge import prompts as judge_prompts
    from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT

    texts = [DEFAULT_SYSTEM_PROMPT] * 50  # every training prompt starts with it: give it whole-word merges
    for r in records:
        texts += [c["value"].replace("<video>\n", "") for c in r["conversations"]]
        texts += list(r["temporal_grounding"].values())
        texts += [m["content"] for m in judge_prompts.extraction_messages(r["conversations"][1]["value"])]
    texts += ["system", "user", "assistant", "You are a helpful assistant.", "TRUE", "FALSE"]
    return texts * 3


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def make_demo(
    out: Path | str,
    seed: int = 0,
    num_sft_videos: int = 160,
    num_grpo_videos: int = 128,
    num_eval_videos: int = 48,
    sft_questions_per_video: int = 4,
    duration: int = 8,
    size: int = 56,
    frame_rate: int = 8,
    segments_per_video: int = 2,
    clock: str = "dot",
    numeric_fraction: float = 0.2,
    grounded_fraction: float = 0.4,
    wrong_time_fraction: float = 0.0,
    vocab_size: int = 1024,
    text_hidden: int = 128,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 1,
    tokens_per_second: int = 8,
    temporal_rope_pairs: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the tiny Qwen2.5-VL checkpoint and the synthetic timestamped video dataset.

    Args:
        out: output folder; gets model/ and data/.
        seed: seeds videos, questions, tokenizer corpus and model weights (same seed, same files).
        num_sft_videos: videos (one record each) in video-r2-sft-dataset.json.
        num_grpo_videos: videos in video-r2-grpo-dataset.json (not shared with SFT). 128 rather than 32: with 32 prompts
            seen 20 times in GRPO's 80 steps the training rollouts were all right (accuracy reward 1.0, so no
            signal), and in seed 1 GRPO with TAR lost 4 of 48 held-out answers; with 128 it lost none.
        num_eval_videos: held-out videos in video-r2-eval-dataset.json (used by neither training file).
        sft_questions_per_video: SFT records per video, each about a different segment where possible.
            With one question per video a small model memorises "this video -> this answer"; several
            questions about different moments of the same video can only be told apart by their time.
        duration: seconds per video.
        size: frame side in pixels (a multiple of 28 keeps frames unresized).
        frame_rate: frames per second of the encoded videos.
        segments_per_video: shapes shown one after another in each video (2 to 4).
        clock: how each frame shows its time to the vision tower (the drawn HH:MM:SS is clipped to "00:00:"
            on 56 px frames and the subtitle box covers the middle): "dot", a dot sweeping the bottom edge
            every 2 s; "sweep", a dot crossing it once over the video (every second its own position);
            "bar", a bar down the right edge that grows with the time. "dot" is the default because it
            measured best for the ablation: with "sweep" (seeds 0, 1, 2) SFT still stayed below the
            shortcut (held-out 0.500, 0.542, 0.667 against 0.708, 0.604, 0.708) and the TAR effect was
            lost in seed 2; "bar" gave seed 0 the shortcut's 0.708 after 2,500 steps.
        numeric_fraction: share of questions answered with a number rather than an option letter.
        grounded_fraction: share of SFT answers whose reasoning cites the moment ("At 00:05 a ..."); the
            others reason without any time (or cite a wrong second, see below). About half and half, so
            that the SFT model samples both styles and TAR has a choice to reward; a little under half, so
            that greedy decoding after SFT picks the plain style on every prompt rather than by chance
            (at exactly half, which style wins the argmax is luck), and GRPO must tip the balance.
        wrong_time_fraction: share of SFT answers whose reasoning cites a second of another segment
            (taken from the non-grounded ones): timestamped, but TAR finds nothing to match.
        vocab_size: BPE vocabulary size including the special tokens.
        text_hidden: hidden size of the language model.
        text_layers: decoder layers of the language model.
        vision_hidden: hidden size of the vision tower.
        vision_depth: blocks of the vision tower.
        tokens_per_second: rope positions per second of video (the model's `vision_config.tokens_per_second`).
        temporal_rope_pairs: rotary frequency pairs per head given to time (`build_model`); default half.
        overwrite: replace an existing output folder.
    """
    out = Path(out)
    if not 2 <= segments_per_video <= len(EVENTS):
        raise ValueError(f"segments_per_video must be 2..{len(EVENTS)}, got {segments_per_video}")
    if duration < 2 * segments_per_video:
        raise ValueError(f"duration {duration}s is too short for {segments_per_video} segments of >= 2 s")
    if not (0 <= grounded_fraction and 0 <= wrong_time_fraction and grounded_fraction + wrong_time_fraction <= 1):
        raise ValueError(f"grounded_fraction {grounded_fraction} + wrong_time_fraction {wrong_time_fraction} must be "
                         "in [0, 1]")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    mrope_section(text_hidden, temporal_rope_pairs)  # raises on a share that leaves height or width nothing
    # Every argument is checked above this line: with overwrite the folder is deleted next.
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite true to replace it")
        shutil.rmtree(out)
    videos_dir, subs_dir = out / "data" / "videos", out / "data" / "subtitles"
    videos_dir.mkdir(parents=True)
    subs_dir.mkdir(parents=True)

    rng = random.Random(seed)
    # Styles come from their own stream, so the videos and questions of a seed do not depend on the mix.
    style_rng = random.Random(f"{seed}-styles")
    weights = (grounded_fraction, 1 - grounded_fraction - wrong_time_fraction, wrong_time_fraction)
    splits = {"sft": num_sft_videos, "grpo": num_grpo_videos, "eval": num_eval_videos}
    records: dict[str, list[dict]] = {}
    from tqdm import tqdm

    progress = tqdm(total=sum(splits.values()), desc="synthetic videos", unit="video", leave=False)
    for split, count in splits.items():
        records[split] = []
        for i in range(count):
            name = f"{split}_{i:04d}.mp4"
            segments = random_segments(rng, duration, segments_per_video)
            write_video(videos_dir / name, render_video(segments, size, frame_rate, clock), frame_rate)
            if i % 2 == 0:  # subtitles for every other video, matched by stem as in the original layout
                write_srt(subs_dir / f"{Path(name).stem}.srt", segments)
            per_video = sft_questions_per_video if split == "sft" else 1
            times = rng.sample(range(duration), min(per_video, duration))  # distinct seconds of one video
            for k, t in enumerate(times):
                record_id = f"{Path(name).stem}-q{k}" if per_video > 1 else None
                # Only SFT teaches a style; the other splits' answers serve as references for the rewards.
                style = style_rng.choices(STYLES, weights)[0] if split == "sft" else "grounded"
                records[split].append(make_record(rng, name, segments, numeric_fraction, t, record_id, style))
            progress.update()
    progress.close()
    for split, recs in records.items():
        (out / "data" / f"video-r2-{split}-dataset.json").write_text(json.dumps(recs, indent=1))

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(_corpus([r for recs in records.values() for r in recs]), vocab_size)
    model = build_model(tokenizer, text_hidden, text_layers, vision_hidden, vision_depth, tokens_per_second,
                        temporal_rope_pairs)
    model.save_pretrained(out / "model")
    build_processor(tokenizer).save_pretrained(out / "model")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model ({n_params / 1e3:.0f}k parameters) and {out}/data "
          f"({', '.join(f'{k}: {v} videos, {len(records[k])} records' for k, v in splits.items())})")
    print(f"next: video-r2 check-data --data-path {out}/data/video-r2-sft-dataset.json "
          f"--video-folder {out}/data/videos --model {out}/model")
    return out
