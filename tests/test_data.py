"""The video_r2.data package: records -> batches, bad input, length budget, `check-data`.

Real decoding of the tiny demo's videos (8 s, 56x56, 8 fps) and the tiny demo's processor and model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from video_r2 import data as D
from video_r2 import video as V
from video_r2.data import DataValidationError, load_dataset, read_records
from video_r2.data.dataset import _MAX_CONSECUTIVE_SKIPS as MAX_CONSECUTIVE_SKIPS

HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def processor(tiny_demo):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_demo / "model")


@pytest.fixture(scope="module")
def model(tiny_demo):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_demo / "model").eval()


def records(tiny_demo, stage="sft"):
    return json.loads((tiny_demo / "data" / f"video-r2-{stage}-dataset.json").read_text())


def dataset(tiny_demo, processor, recs, stage="sft", fps=1.0, max_frames=128, **kw):
    sampling = D.Sampling(fps=fps, max_frames=max_frames, min_frames=kw.pop("min_frames", 4),
                          video_min_pixels=kw.pop("video_min_pixels", D.Sampling().video_min_pixels),
                          frame_positions=kw.pop("frame_positions", "linspace"))
    return D.VideoR2Dataset(recs, processor, tiny_demo / "data" / "videos", tiny_demo / "data" / "subtitles",
                            stage=stage, sampling=sampling, **kw)


def write(path: Path, recs) -> Path:
    path.write_text(json.dumps(recs))
    return path


def corrupt_video(tmp_path: Path, tiny_demo) -> Path:
    """corrupt.mp4 (garbage after a valid-looking header) and truncated.mp4 (cut after a fifth), written in
    the video folder, where media must live; returns the first."""
    videos = tiny_demo / "data" / "videos"
    src = (videos / "sft_0000.mp4").read_bytes()
    bad = videos / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    (videos / "truncated.mp4").write_bytes(src[: len(src) // 5])
    return bad


# --------------------------------------------------------------------------------------------------
# token and label masks
# --------------------------------------------------------------------------------------------------


def test_sft_labels_are_exactly_the_assistant_reply(tiny_demo, processor):
    rec = copy.deepcopy(records(tiny_demo)[0])
    reference = "<think>At 00:02 a green square fills the screen, so the answer is B.</think><answer>B</answer>"
    rec["conversations"][1]["value"] = reference  # a hand-written reply, whatever the generator wrote
    item = dataset(tiny_demo, processor, [rec])[0]
    tok = processor.tokenizer
    ids, labels = item["input_ids"], item["labels"]
    kept = (labels != D.IGNORE_INDEX).nonzero().flatten()
    # one contiguous span, equal to the input ids there, right after the header, ending in <|im_end|> and
    # the newline after it: the original labels `{reply}<|im_end|>\n` (its sft_dataset), so do we
    assert kept.tolist() == list(range(int(kept[0]), int(kept[-1]) + 1))
    assert torch.equal(labels[kept], ids[kept])
    assert tok.decode(labels[kept]) == reference + "<|im_end|>\n"
    header = tok.encode(HEADER, add_special_tokens=False)
    assert ids[kept[0] - len(header): kept[0]].tolist() == header
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(kept) == len(tok.encode(reference, add_special_tokens=False)) + 1 + len(newline)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[kept[-1] - len(newline)] == im_end and labels[-len(newline):].tolist() == newline
    assert int(kept[-1]) == len(ids) - 1  # the newline is the sample's last token: nothing is left out
    # the rest: system prompt, user turn with the video; video tokens are marked 2, all else 0
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    assert torch.equal(item["mm_token_type_ids"] == 2, ids == video_id)
    assert int((ids == video_id).sum()) == int(item["video_grid_thw"].prod()) // 4
    assert D.DEFAULT_SYSTEM_PROMPT in tok.decode(ids[: kept[0]])
    assert item["attention_mask"].all()


def test_multi_turn_labels_cover_every_reply(tiny_demo, processor):
    rec = copy.deepcopy(records(tiny_demo)[1])
    rec["conversations"] += [{"from": "human", "value": "Are you sure?"},
                             {"from": "gpt", "value": "<think>Yes.</think><answer>yes</answer>"}]
    item = dataset(tiny_demo, processor, [rec], system_prompt="Be brief.")[0]
    labels, tok = item["labels"], processor.tokenizer
    kept = (labels != D.IGNORE_INDEX).nonzero().flatten().tolist()
    spans, start = [], kept[0]
    for a, b in zip(kept, kept[1:] + [None]):
        if b != a + 1:
            spans.append(tok.decode(labels[start:a + 1]))
            start = b
    assert spans == [rec["conversations"][1]["value"] + "<|im_end|>\n", rec["conversations"][3]["value"] + "<|im_end|>\n"]
    assert "Are you sure?" in tok.decode(item["input_ids"]) and "Be brief." in tok.decode(item["input_ids"])


# --------------------------------------------------------------------------------------------------
# timing passed to the processor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps,max_frames,frames", [(2.0, 32, 16), (2.0, 8, 8), (1.0, 128, 8)])
def test_second_per_grid_ts_and_frame_indices_are_qwen_vl_utils(tiny_demo, processor, fps, max_frames, frames):
    ds = dataset(tiny_demo, processor, records(tiny_demo, "grpo")[:1], "grpo", fps=fps, max_frames=max_frames)
    item = ds[0]
    times = item["sample"]["frame_times"][0]
    indices = torch.linspace(0, 63, frames).round().long().tolist()  # the demo videos: 64 frames at 8 fps
    assert len(times) == frames and times == pytest.approx([i / 8 for i in indices])
    tps = processor.video_processor.temporal_patch_size
    sample_fps = frames / 64 * 8.0  # qwen-vl-utils' sample fps: nframes / total_frames * video_fps
    assert item["second_per_grid_ts"].tolist() == pytest.approx([tps / sample_fps])
    assert item["video_grid_thw"].tolist() == [[frames // tps, 4, 4]]
    # the metadata handed to the processor gives the same rate and the real frame indices, and the
    # processor's own second_per_grid_ts from it is ours
    media = ds._media(0, ds.records[0])
    D.plan_media(media, ds.sampling)
    _, pts, meta = ds._frames(0, media[0])
    assert meta.sampled_fps == pytest.approx(sample_fps) and pts == times and meta.frames_indices == indices
    video = torch.zeros(frames, 3, 56, 56, dtype=torch.uint8)
    out = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[video], return_tensors="pt",
                    videos_kwargs={**ds._video_kwargs, "video_metadata": [meta]})
    assert torch.as_tensor(out["second_per_grid_ts"]).tolist() == pytest.approx(item["second_per_grid_ts"].tolist())


def test_centres_positions_are_an_option(tiny_demo, processor):
    ds = dataset(tiny_demo, processor, records(tiny_demo, "grpo")[:1], "grpo", fps=2.0, max_frames=32,
                 frame_positions="centres")
    times = ds[0]["sample"]["frame_times"][0]
    assert times == pytest.approx([(i + 0.5) * 0.5 for i in range(16)])  # the frame shown at each slot centre


# --------------------------------------------------------------------------------------------------
# the DataModule, a forward pass of the tiny model
# --------------------------------------------------------------------------------------------------

MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
              "second_per_grid_ts")


def datamodule(tiny_demo, processor, stage, **kw):
    data = tiny_demo / "data"
    dm = D.VideoDataModule(str(kw.pop("data_path", data / f"video-r2-{stage}-dataset.json")), str(data / "videos"),
                           str(tiny_demo / "model"), stage=stage, subtitles_folder=str(data / "subtitles"),
                           sampling=D.Sampling(fps=2.0, max_frames=32) if stage == "grpo" else D.Sampling(),
                           **{"batch_size": 2, **kw})
    dm.processor = processor  # the shared one: loading it takes seconds
    return dm


def test_sft_batch_forward(tiny_demo, processor, model):
    dm = datamodule(tiny_demo, processor, "sft", val_fraction=0.25)
    dm.setup("fit")
    n = len(records(tiny_demo))
    assert len(dm.val_dataset) == round(0.25 * n) and len(dm.train_dataset) == n - round(0.25 * n)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert "num_skipped" not in batch and dm.skipped == 0
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    short = int(lengths.argmin())
    if lengths[0] != lengths[1]:  # right padding: pad id, labels -100, type 0
        assert batch["attention_mask"][short, -1] == 0 and batch["labels"][short, -1] == D.IGNORE_INDEX
        assert batch["input_ids"][short, -1] == processor.tokenizer.pad_token_id
    assert batch["video_grid_thw"].shape == (2, 3) and batch["second_per_grid_ts"].shape == (2,)
    assert batch["pixel_values_videos"].shape[0] == int(batch["video_grid_thw"].prod(1).sum())
    with torch.no_grad():
        out = model(**{k: batch[k] for k in MODEL_KEYS}, labels=batch["labels"])
    assert torch.isfinite(out.loss)
    assert len(batch["ids"]) == 2


def test_grpo_batch_left_padded_forward(tiny_demo, processor, model):
    dm = datamodule(tiny_demo, processor, "grpo", val_data_path=str(tiny_demo / "data" / "video-r2-eval-dataset.json"))
    dm.setup("fit")
    ds = dm.train_dataset
    items = [ds[0], ds[2]]
    batch = dm.collator()(items)
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    samples = batch["samples"]
    rec = records(tiny_demo, "grpo")[0]
    assert samples[0]["answer"] == rec["conversations"][1]["value"].split("<answer>")[1].split("</answer>")[0]
    assert samples[0]["question"] == rec["conversations"][0]["value"].removeprefix("<video>\n")
    assert samples[0]["temporal_grounding"] == rec["temporal_grounding"]
    assert samples[0]["question_type"] == rec["question_type"] and samples[0]["id"] == rec["id"]
    assert samples[0]["prompt_text"].endswith(HEADER) and "labels" not in batch
    assert samples[0]["video"] == rec["video"]  # `video-r2 inspect` finds the frames again from it
    # The drawn frames travel with a sample only for a rollout engine that needs them (vLLM).
    assert "videos" not in samples[0] and "video_metadata" not in samples[0]
    ds.keep_frames = True
    kept = ds.load(0)["sample"]
    assert kept["videos"][0].dtype == torch.uint8 and kept["videos"][0].shape[1] == 3  # [T, C, H, W]
    assert len(kept["video_metadata"]) == 1
    with torch.no_grad():
        out = model(**{k: batch[k] for k in MODEL_KEYS})
        alone = model(**{k: items[1][k].unsqueeze(0) if items[1][k].dim() == 1 else items[1][k] for k in MODEL_KEYS})
    assert torch.isfinite(out.logits).all()
    # left padding changes nothing for the prompt: same next-token logits as the prompt alone
    assert torch.allclose(out.logits[1, -1], alone.logits[0, -1], atol=1e-4)
    assert len(dm.val_dataset) == 4


# --------------------------------------------------------------------------------------------------
# bad input: at setup, every problem together
# --------------------------------------------------------------------------------------------------


def test_setup_reports_every_bad_record(tiny_demo, processor, tmp_path):
    recs = records(tiny_demo, "grpo")
    bad = copy.deepcopy(recs)
    del bad[0]["conversations"]  # missing field
    bad[1]["conversations"][0]["value"] += "\n<video>"  # 2 tags, 1 video
    bad[2]["temporal_grounding"]["soon-later"] = "Something."  # unparseable key
    del bad[3]["temporal_grounding"]  # GRPO needs it
    path = write(tmp_path / "bad.json", bad + [recs[0]])
    dm = datamodule(tiny_demo, processor, "grpo", data_path=path)
    with pytest.raises(DataValidationError) as err:
        dm.setup("fit")
    found = {(p.index, p.field) for p in err.value.problems}
    assert found == {(0, "conversations"), (1, "conversations"), (2, "temporal_grounding"), (3, "temporal_grounding")}
    text = str(err.value)
    assert "record 0 [conversations]: missing" in text and "2 <video> tag(s) but 1 video(s)" in text
    assert "'soon-later'" in text and str(path) in text
    assert dm.train_dataset is None  # nothing built


@pytest.mark.parametrize("path", ["../../etc/passwd.mp4", "clips/../../x.mp4"])
def test_a_video_path_may_not_climb_out_of_the_video_folder(tiny_demo, processor, tmp_path, path):
    bad = copy.deepcopy(records(tiny_demo, "sft")[:2])
    bad[0]["video"] = path
    dm = datamodule(tiny_demo, processor, "sft", data_path=write(tmp_path / "escape.json", bad))
    with pytest.raises(DataValidationError, match=r"record 0 \[video\]: .*leaves video_folder"):
        dm.setup("fit")


def test_an_absolute_video_path_outside_the_folder_is_refused_not_opened(tiny_demo, processor, tmp_path, capsys):
    import shutil

    recs = copy.deepcopy(records(tiny_demo, "sft")[:2])
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(tiny_demo / "data" / "videos" / recs[0]["video"], outside)  # a real video, but not in the folder
    inside = recs[1]["video"]
    recs[0]["video"] = str(outside)
    recs[1]["video"] = str((tiny_demo / "data" / "videos" / inside).absolute())  # absolute, inside: fine
    with pytest.raises(D.BadSample, match="leaves video_folder"):
        dataset(tiny_demo, processor, recs)[0]
    assert dataset(tiny_demo, processor, recs)[1]["pixel_values_videos"].shape[0] > 0
    with pytest.raises(SystemExit):
        D.check_data(str(write(tmp_path / "abs.json", recs)), str(tiny_demo / "data" / "videos"))
    assert "record 0 [video]: " in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "no such file: check data_path"),
    ("[{\"id\": \"caf\xe9\"}]".encode("latin-1"), "not UTF-8 text"),
])
def test_a_missing_or_undecodable_dataset_file_is_named_with_what_to_do(tiny_demo, processor, tmp_path, content,
                                                                         message):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_bytes(content)
    dm = datamodule(tiny_demo, processor, "sft", data_path=str(path))
    with pytest.raises(DataValidationError) as err:
        dm.setup("fit")
    assert str(path) in str(err.value) and message in str(err.value)


def test_jsonl_and_image_records(tiny_demo, processor, tmp_path):
    from PIL import Image

    recs = records(tiny_demo)[:2]
    # Media live in the video folder (a path out of it is refused): this image joins the demo's clips.
    Image.new("RGB", (84, 56), (200, 30, 30)).save(tiny_demo / "data" / "videos" / "red-image-test.png")
    image_rec = {"id": "img", "image": "red-image-test.png", "extra": [1, 2],
                 "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                   {"from": "gpt", "value": "<think>Red.</think><answer>red</answer>"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*recs, image_rec]) + "\n\n")
    loaded, problems = load_dataset(path)
    assert problems == [] and loaded == [*recs, image_rec]
    item = dataset(tiny_demo, processor, loaded)[2]
    assert item["image_grid_thw"].tolist() == [[1, 4, 6]] and item["pixel_values"].shape[0] == 24
    assert "pixel_values_videos" not in item
    assert processor.tokenizer.decode(item["labels"][item["labels"] != -100]) == "<think>Red.</think><answer>red</answer><|im_end|>\n"
    batch = D.Collator(0)([dataset(tiny_demo, processor, loaded)[0], item])
    assert batch["pixel_values"].shape[0] == 24 and batch["video_grid_thw"].shape == (1, 3)
    path.write_text(json.dumps(recs[0]) + "\n{not json\n" + json.dumps(recs[1]) + "\n")
    loaded, problems = read_records(path)
    assert len(loaded) == 3 and loaded[1] is None and problems[0].index == 1 and "line 2" in problems[0].message


def test_subtitles_found_by_stem(tiny_demo, processor, monkeypatch):
    seen = []
    real = V.overlay_frames
    monkeypatch.setattr(V, "overlay_frames", lambda f, t, cues, *a: seen.append(cues) or real(f, t, cues, *a))
    recs = records(tiny_demo)
    with_srt = recs[0]  # sft_0000 has an .srt (every other video does)
    without = next(r for r in recs if r["video"] == "sft_0001.mp4")
    ds = dataset(tiny_demo, processor, [with_srt, without])
    ds[0], ds[1]
    first = with_srt["temporal_grounding"]
    first_shape = first[min(first)].removeprefix("A ").removesuffix(" fills the screen.")
    assert seen[0][0].text == f"Now a {first_shape}." and seen[1] is None


# --------------------------------------------------------------------------------------------------
# bad input at load time: on_bad_sample
# --------------------------------------------------------------------------------------------------


def test_missing_video_raise_names_the_path(tiny_demo, processor):
    rec = copy.deepcopy(records(tiny_demo)[0])
    rec["video"] = "nowhere.mp4"
    with pytest.raises(D.BadSample, match="nowhere.mp4"):
        dataset(tiny_demo, processor, [rec], on_bad_sample="raise")[0]


@pytest.mark.parametrize("name", ["nowhere.mp4", "corrupt.mp4", "truncated.mp4"])
def test_bad_video_skip_draws_another(tiny_demo, processor, tmp_path, name, caplog):
    corrupt_video(tmp_path, tiny_demo)
    recs = records(tiny_demo)[:3]
    recs[1]["video"] = name
    ds = dataset(tiny_demo, processor, recs, on_bad_sample="skip", seed=3)
    if name != "nowhere.mp4":
        with pytest.raises(D.BadSample, match="undecodable video.*" + name):
            dataset(tiny_demo, processor, recs, on_bad_sample="raise")[1]
    with caplog.at_level(logging.WARNING, logger="video_r2.data"):
        item = ds[1]
    assert item["id"] in {recs[0]["id"], recs[2]["id"]} and item["num_skipped"] >= 1
    assert sum(ds.skipped.values()) == item["num_skipped"] and name in caplog.text


def test_worker_survives_a_bad_sample(tiny_demo, processor, tmp_path):
    recs = records(tiny_demo)[:4]
    recs[2]["video"] = "missing.mp4"
    dm = datamodule(tiny_demo, processor, "sft", data_path=write(tmp_path / "d.json", recs),
                    num_workers=1, on_bad_sample="skip")
    dm.setup("fit")
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert sum(len(b["ids"]) for b in batches) == 4 and "sft_0002" not in sum((b["ids"] for b in batches), [])
    assert dm.skipped >= 1


def test_short_video_still_gives_min_frames(tiny_demo, processor, tmp_path):
    from torchcodec.encoders import VideoEncoder

    one = tiny_demo / "data" / "videos" / "one-second.mp4"  # media live in the video folder
    VideoEncoder(torch.randint(0, 255, (8, 3, 56, 56), dtype=torch.uint8), frame_rate=8).to_file(str(one))
    rec = copy.deepcopy(records(tiny_demo)[0])
    rec["video"] = one.name  # 1 s at fps 1: fewer than min_frames / fps
    item = dataset(tiny_demo, processor, [rec], min_frames=4)[0]
    assert item["video_grid_thw"].tolist() == [[2, 4, 4]]


# --------------------------------------------------------------------------------------------------
# the length budget: frames, then pixels, never the vision tokens; planned before the processor runs
# --------------------------------------------------------------------------------------------------


class CountingProcessor:
    def __init__(self, processor):
        self.inner, self.calls = processor, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_too_long_sample_shrinks_frames_then_pixels(tiny_demo, processor, caplog):
    rec = records(tiny_demo, "grpo")[:1]
    kw = dict(stage="grpo", fps=2.0, max_frames=32, video_min_pixels=28 * 28)
    full = dataset(tiny_demo, processor, rec, **kw)[0]
    assert full["video_grid_thw"].tolist() == [[8, 4, 4]]  # 16 frames at 56x56: 8 * 4 = 32 tokens
    text = len(full["input_ids"]) - 32
    counting = CountingProcessor(processor)

    def load(budget, on_bad_sample="raise"):
        ds = D.VideoR2Dataset(rec, counting, tiny_demo / "data" / "videos", stage="grpo", max_length=budget,
                              sampling=D.Sampling(fps=2.0, max_frames=32, min_frames=4, video_min_pixels=28 * 28),
                              on_bad_sample=on_bad_sample)
        return ds, ds[0]

    with caplog.at_level(logging.WARNING, logger="video_r2.data"):
        _, fewer_frames = load(text + 12)  # 6 frames (3 pairs x 4 tokens)
    assert fewer_frames["video_grid_thw"].tolist() == [[3, 4, 4]] and len(fewer_frames["input_ids"]) == text + 12
    assert "shrunk" in caplog.text
    _, fewer_pixels = load(text + 2)  # 4 frames (min_frames) at 28x28: 2 tokens
    assert fewer_pixels["video_grid_thw"].tolist() == [[2, 2, 2]] and len(fewer_pixels["input_ids"]) == text + 2
    assert counting.calls == 2  # one processor call per sample: the plan was made before
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((fewer_pixels["input_ids"] == video_id).sum()) == 2  # all vision tokens kept
    with pytest.raises(D.BadSample, match="too long"):
        load(text + 1)  # cannot fit at min frames and min pixels
    assert counting.calls == 2
    skipping = D.VideoR2Dataset(rec * 2, processor, tiny_demo / "data" / "videos", stage="grpo", max_length=text + 1,
                                sampling=D.Sampling(fps=2.0, max_frames=32, min_frames=4, video_min_pixels=28 * 28),
                                on_bad_sample="skip")
    with pytest.raises(RuntimeError, match="bad samples in a row"):  # every sample is too long
        skipping[0]
    assert skipping.skipped["too long"] == MAX_CONSECUTIVE_SKIPS


# --------------------------------------------------------------------------------------------------
# video-r2 check-data
# --------------------------------------------------------------------------------------------------


def test_check_data_good(tiny_demo, capsys):
    data = tiny_demo / "data"
    rc = D.check_data(str(data / "video-r2-sft-dataset.json"), str(data / "videos"), str(data / "subtitles"),
                      model=str(tiny_demo / "model"))
    out = capsys.readouterr().out
    assert rc == 0 and "OK: no problems found" in out
    n = len(records(tiny_demo))  # several questions per video
    assert f"records         {n:>3}  valid {n}  invalid 0" in out
    assert "videos           8  found 8  missing 0  undecodable 0" in out
    assert "4 of 8 videos have an .srt" in out and "min 8.0" in out and "longest" in out
    assert "visual tokens    min 16" in out  # 8 frames at 56x56: 4 pairs x 4 tokens


def test_check_data_bad(tiny_demo, tmp_path, capsys):
    corrupt_video(tmp_path, tiny_demo)
    recs = records(tiny_demo)[:4]
    recs[0]["video"] = "missing.mp4"
    recs[1]["video"] = "corrupt.mp4"
    del recs[2]["conversations"][1]
    path = write(tmp_path / "bad.json", recs)
    with pytest.raises(SystemExit) as exit_:
        D.check_data(str(path), str(tiny_demo / "data" / "videos"))
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "found 1  missing 1  undecodable 1" in out and "3 problem(s)" in out
    assert f"{path} record 0 [video]: missing video" in out
    assert f"{path} record 1 [video]: undecodable" in out
    assert f"{path} record 2 [conversations]" in out


def test_check_data_cli_flags(tiny_demo, capsys):
    from video_r2.cli import main

    data = tiny_demo / "data"
    main(["check-data", f"--data-path={data / 'video-r2-grpo-dataset.json'}", f"--video-folder={data / 'videos'}",
          "--stage=grpo", "--sampling.fps=2.0", "--sampling.max-frames=32"])
    out = capsys.readouterr().out
    assert "min 16  median 16" in out and "OK" in out
