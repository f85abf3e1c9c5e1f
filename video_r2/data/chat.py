"""Records -> chat messages: the second step of the data path, and what the GRPO rewards read of a record."""

from __future__ import annotations

import re

from video_r2.data.records import IMAGE_TAG, ROLES, VIDEO_TAG

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about videos. Each video frame shows its time "
    "(HH:MM:SS) in the top-left corner. First think step by step inside <think> </think>, citing the "
    "timestamps (MM:SS) of the moments your reasoning relies on, then give only the final answer inside "
    "<answer> </answer>."
)

_TAG_SPLIT = re.compile(r"(<video>|<image>)\n?")  # a tag eats the newline after it, as the original does
_ANSWER = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def _user_content(text: str) -> list[dict]:
    parts = []
    for piece in _TAG_SPLIT.split(text):
        if piece == VIDEO_TAG:
            parts.append({"type": "video"})
        elif piece == IMAGE_TAG:
            parts.append({"type": "image"})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """Chat-template messages of a (valid) record: its own system turn, else `system_prompt` (if any)."""
    turns = record["conversations"]
    messages = []
    if ROLES[turns[0]["from"]] == "system":
        messages.append({"role": "system", "content": turns[0]["value"]})
        turns = turns[1:]
    elif system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for turn in turns:
        role = ROLES[turn["from"]]
        content = _user_content(turn["value"]) if role == "user" else turn["value"]
        messages.append({"role": role, "content": content})
    return messages


def strip_tags(text: str) -> str:
    """A human turn's text without its `<video>` / `<image>` tags."""
    return _TAG_SPLIT.sub("", text).strip()


def reference_answer(reference: str) -> str:
    """The text inside `<answer>` of a reference reply (without `<think>` when there is no such tag)."""
    match = _ANSWER.search(reference)
    return (match.group(1) if match else _THINK.sub("", reference)).strip()


def reward_sample(record: dict, index: int, prompt_text: str) -> dict:
    """What the GRPO rewards read about a record (see `video_r2.rewards`)."""
    turns = record["conversations"]
    question = next(t["value"] for t in reversed(turns) if ROLES[t["from"]] == "user")
    reference = turns[-1]["value"]
    return {
        "id": str(record.get("id", index)),
        "question": strip_tags(question),
        "answer": reference_answer(reference),
        "solution": reference,
        "temporal_grounding": dict(record.get("temporal_grounding") or {}),
        "question_type": record.get("question_type"),
        "video": record.get("video"),  # where `video-r2 inspect` finds the frames again
        "prompt_text": prompt_text,
    }
