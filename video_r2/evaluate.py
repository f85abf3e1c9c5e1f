"""`video-r2 evaluate`: held-out accuracy, format and TAR of a checkpoint, scored by the training rewards.

One completion per prompt (greedy unless `temperature > 0`), generated exactly as GRPO's rollout does
(`video_r2.grpo.rollout.sample_completions`) and scored by the same reward functions, so evaluation and training
agree on what "correct", "well formed" and "temporally aligned" mean.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch

from video_r2.data.budget import Sampling
from video_r2.data.chat import DEFAULT_SYSTEM_PROMPT


def _mean(values: list[float | None]) -> float:
    valid = [v for v in values if v is not None]
    return sum(valid) / len(valid) if valid else float("nan")


def _chance(record_question: str, question_type: str | None, numeric_answers: int) -> float:
    """Accuracy of a uniform guess: 1/options for multiple choice, 1/distinct answers for numbers."""
    if question_type == "numerical":
        return 1.0 / max(1, numeric_answers)
    options = [line for line in record_question.splitlines() if len(line) > 2 and line[1] in ").:" and line[0].isupper()]
    return 1.0 / max(1, len(options))


def score_completions(completions: list[str], samples: list[dict], names: list[str], context) -> dict:
    """Score completions of the evaluation samples (the records as the data module gives them to the rewards):
    each reward's mean, TAR's grounded share and consistency rate, accuracy per question type, chance.

    A value a reward could not compute (`None`: the judge gave no answer) is left out of that reward's mean;
    `scored[name]` says over how many samples each mean is taken.
    """
    from video_r2.rewards import compute_rewards, tar_details

    scores = compute_rewards([n for n in names if n != "tar"], completions, samples, context)
    if "tar" in names:  # TAR with its reasons (claims, matches, verdict), for `video-r2 inspect` and the rates
        details = tar_details(completions, samples, context)
        scores["tar"] = [d.reward for d in details]
    rows: list[dict] = []
    for i, (text, sample) in enumerate(zip(completions, samples, strict=True)):
        rows.append({"id": sample.get("id"), "question_type": sample.get("question_type"), "completion": text,
                     "question": sample.get("question"), "answer": sample.get("answer"), "video": sample.get("video"),
                     **{name: scores[name][i] for name in names}})
        if "tar" in names:
            rows[-1].update(grounded=details[i].grounded, consistent=details[i].consistent,
                            tar_details=details[i].to_dict())
    results: dict = {"num_samples": len(rows)}
    for name in names:
        results[name] = _mean([r[name] for r in rows])
    results["scored"] = {name: sum(r[name] is not None for r in rows) for name in names}
    if "tar" in names:  # reasoning that cites a time at all; reasoning and answer that agree
        results["grounded_share"] = _mean([float(r["grounded"]) for r in rows])
        results["consistency"] = _mean([None if r["consistent"] is None else float(r["consistent"]) for r in rows])
        results["scored"]["consistency"] = sum(r["consistent"] is not None for r in rows)
    by_type = defaultdict(list)
    for r in rows:
        by_type[r["question_type"] or "unknown"].append(r.get("accuracy"))
    results["accuracy_by_type"] = {t: _mean(v) for t, v in sorted(by_type.items())}
    numeric_answers = len({s["answer"] for s in samples if s.get("question_type") == "numerical"})
    results["chance_accuracy"] = _mean([_chance(s["question"], s.get("question_type"), numeric_answers) for s in samples])
    results["samples"] = rows
    return results


def evaluate(
    model: str,
    data_path: str,
    video_folder: str,
    subtitles_folder: str | None = None,
    sampling: Sampling = Sampling(fps=2.0, max_frames=32),
    draw_timestamps: bool = True,
    draw_subtitles: bool = True,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    reward_funcs: list[str] | None = None,
    judge_base_url: str | None = None,
    judge_model: str = "video-r2-judge",
    buffer_seconds: float = 2.0,
    similarity_threshold: float = 0.75,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    limit: int | None = None,
    out: str | None = None,
) -> dict:
    """Score a checkpoint on a dataset with the training rewards; print a table and write JSON.

    Args:
        model: HF checkpoint directory or hub id (a full model: merge LoRA adapters first).
        data_path: dataset file (JSON or JSON Lines), records as for GRPO (with `temporal_grounding` for TAR).
        video_folder: folder the records' videos are relative to.
        subtitles_folder: optional `<video stem>.srt` folder.
        sampling: frames per second, frame caps and pixel ranges; match the model's training config
            (default: the GRPO recipe's 2 fps, up to 32 frames).
        draw_timestamps: draw each frame's time.
        draw_subtitles: draw the subtitle at each frame.
        system_prompt: the system message; use the one the model was trained with.
        reward_funcs: rewards to report (default accuracy, format, and tar when a judge is given).
        judge_base_url: TAR's judge server (OpenAI API root); without it TAR is not scored.
        judge_model: the judge's served model name.
        buffer_seconds: TAR: both spans widen by this much before the overlap test (the recipe's 2 s).
        similarity_threshold: TAR: least MiniLM cosine for a claim to match an event (the recipe's 0.75).
        max_new_tokens: new tokens per completion.
        temperature: 0 for greedy decoding, else the sampling temperature.
        batch_size: prompts per generate call.
        limit: evaluate only the first N records.
        out: write the results here as JSON.
    """
    from tqdm import tqdm

    from video_r2.data import VideoDataModule
    from video_r2.grpo.rollout import generation_token_ids, sample_completions
    from video_r2.judge import JudgeClient
    from video_r2.model import load_model
    from video_r2.rewards import RewardContext

    names = reward_funcs or (["accuracy", "format", "tar"] if judge_base_url else ["accuracy", "format"])
    if "tar" in names and not judge_base_url:
        raise SystemExit("the tar reward needs --judge_base_url (start one: python serve/judge_app.py --backend rules)")
    data = VideoDataModule(
        data_path=data_path, video_folder=video_folder, processor_path=model, stage="grpo",
        subtitles_folder=subtitles_folder, sampling=sampling, draw_timestamps=draw_timestamps,
        draw_subtitles=draw_subtitles, system_prompt=system_prompt, batch_size=batch_size, num_workers=0,
        on_bad_sample="raise",
    )
    data.setup("fit")
    dataset = data.train_dataset
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=data.collator()
    )
    policy = load_model(model).eval()
    tokenizer = data.processor.tokenizer
    eos, pad, suppress = generation_token_ids(policy, tokenizer)
    # Evaluation asks a deterministic judge (temperature 0, cached), so two evaluations of one model agree.
    judge = (JudgeClient(base_url=judge_base_url, model=judge_model, temperature=0.0, cache=True)
             if judge_base_url else None)
    context = RewardContext(judge=judge, buffer_seconds=buffer_seconds, similarity_threshold=similarity_threshold)
    generation = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}

    texts: list[str] = []
    samples: list[dict] = []
    for batch in tqdm(loader, desc=f"evaluating {Path(model).name}", unit="batch"):
        prompt = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rollout, _ = sample_completions(policy, prompt, 1, eos_token_ids=eos, pad_token_id=pad,
                                        suppress_tokens=suppress, max_new_tokens=max_new_tokens, **generation)
        texts += tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        samples += batch["samples"]

    results: dict = {"model": str(model), "data_path": str(data_path)}
    results.update(score_completions(texts, samples, names, context))
    # Where the frames came from, so that `video-r2 inspect` can draw what the model saw.
    results.update(video_folder=str(video_folder), subtitles_folder=subtitles_folder and str(subtitles_folder),
                   sampling=dataclasses.asdict(dataset.sampling),
                   draw_timestamps=draw_timestamps, draw_subtitles=draw_subtitles)
    if judge is not None:
        results.update({k: v for k, v in context.metrics().items()})
        judge.close()

    print(f"\n{model} on {data_path} ({results['num_samples']} samples)")
    for key in (*names, "grounded_share", "consistency", "chance_accuracy"):
        if key in results:
            scored = results.get("scored", {}).get(key, results["num_samples"])
            note = "" if scored == results["num_samples"] else (
                f"  (over {scored} of {results['num_samples']} samples; the rest could not be scored: no judge answer, "
                "or no reasoning or answer to judge)")
            print(f"  {key:<20} {results[key]:.3f}{note}")
    for qtype, value in results["accuracy_by_type"].items():
        print(f"  accuracy[{qtype}]".ljust(22) + f" {value:.3f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
    return results
