"""The two prompts TAR sends to its judge, and how to read their fields back.

One module owns the wording so that the client (`video_r2.judge`) and the rules backend of the judge
server (`serve/judge_app.py`) cannot drift apart. A real LLM judge (vLLM, the `hf` backend) only reads
the instructions; the rules backend recognises a prompt by its first line and pulls the fields back
out of the tagged blocks with `read_extraction_request` / `read_consistency_request`.
"""

from __future__ import annotations

import re

EXTRACTION_HEADER = "TASK: list the timestamped claims in a video reasoning."
CONSISTENCY_HEADER = "TASK: decide whether a video reasoning supports its final answer."

_EXTRACTION_INSTRUCTIONS = """\
{header}
Below is the step-by-step reasoning a model wrote while watching a video. Find every place where it
ties an observation to a moment or a span of the video, and write each one as a key-value pair:
- the key is the time exactly as the reasoning gives it ("00:12", "1:02:03", "00:10-00:15");
- the value is one short sentence saying what the reasoning claims happens then.
Leave out statements that have no time. Do not invent times that the reasoning does not state.
Reply with one JSON object and nothing else, for example {{"00:04": "A red square appears."}}.
Reply {{}} if the reasoning has no timestamped claims.

<reasoning>
{think}
</reasoning>"""

_CONSISTENCY_INSTRUCTIONS = """\
{header}
Below are a question about a video, the reasoning a model wrote, and the final answer it gave.
Judge only the link between the reasoning and the answer, not whether either is true of the video:
does the conclusion the reasoning reaches agree with the final answer?
On the first line write TRUE or FALSE and nothing else. On the second line give a one-sentence reason.

<question>
{question}
</question>
<reasoning>
{think}
</reasoning>
<answer>
{answer}
</answer>"""


def extraction_messages(think: str) -> list[dict[str, str]]:
    """Chat messages asking the judge for the `timestamp -> claim` pairs in `think`."""
    return [{"role": "user", "content": _EXTRACTION_INSTRUCTIONS.format(header=EXTRACTION_HEADER, think=think)}]


def consistency_messages(question: str, think: str, answer: str) -> list[dict[str, str]]:
    """Chat messages asking the judge for a TRUE/FALSE verdict on reasoning-answer agreement."""
    text = _CONSISTENCY_INSTRUCTIONS.format(header=CONSISTENCY_HEADER, question=question, think=think, answer=answer)
    return [{"role": "user", "content": text}]


def _block(text: str, tag: str) -> str | None:
    # The last block wins: the instructions above never contain a tagged block themselves.
    found = re.findall(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, flags=re.DOTALL)
    return found[-1] if found else None


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI "content parts"
                return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content or ""
    return ""


def read_extraction_request(messages: list[dict]) -> str | None:
    """The reasoning inside an extraction prompt, or None if `messages` is not one."""
    text = _last_user_text(messages)
    if not text.startswith(EXTRACTION_HEADER):
        return None
    return _block(text, "reasoning")


def read_consistency_request(messages: list[dict]) -> tuple[str, str, str] | None:
    """(question, reasoning, answer) of a consistency prompt, or None if `messages` is not one."""
    text = _last_user_text(messages)
    if not text.startswith(CONSISTENCY_HEADER):
        return None
    parts = (_block(text, "question"), _block(text, "reasoning"), _block(text, "answer"))
    return None if any(p is None for p in parts) else parts  # type: ignore[return-value]
