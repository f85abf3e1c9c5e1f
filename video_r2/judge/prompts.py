"""The two prompts TAR sends to its judge, and how to read their fields back.

Both follow the original Video-R2 reward code in structure, rules and output format (the wording of the
instructions is ours):
- extraction: a system message (the extractor's goal, a STRICT output format, content rules) and a user
  message (the key format again, the value rules, then `The text:` and the reasoning). Keys are normalised
  to zero-padded MM:SS or HH:MM:SS, ranges are two such times joined by one hyphen, decimal seconds are
  rounded, duplicates merged, each value is a clause of at most 10 words;
- consistency: an auditor system message and a user message laid out as QUESTION / THINK / ANSWER / TASK,
  answered with TRUE or FALSE on the first line and a short justification after it.

One module owns the wording so that the client (`video_r2.judge.client`) and the rules backend of the judge
server cannot drift apart. A real LLM judge (vLLM, the `hf` backend) only reads the instructions; the rules
backend recognises a prompt by its fixed text around the fields and cuts the fields back out with
`read_extraction_request` / `read_consistency_request` (plain string operations, linear in the prompt).
"""

from __future__ import annotations

EXTRACTION_SYSTEM = """\
You are an exact extractor of time-stamped events from text.

Goal:
Using nothing but the text you are given, find every mention of a time and return a compact JSON object \
that maps each timestamp (the key) to ONE short sentence (the value) saying what the text says happens then.

Output format (STRICT):
- Reply with the JSON object ONLY: no prose, no code fences, no explanation.
- Keys: the times the text mentions, normalised to MM:SS or HH:MM:SS with leading zeros.
  • A single time: "00:42"
  • A range: "00:42-00:45", "01:45-02:01"
- Keys in ascending order of start time.
- Turn phrases such as "around the 16-second mark" or "at about 1:02" into "00:16" or "01:02".
- One continuous action described at adjacent times (e.g. 00:07 and 00:08) MAY become one range, \
"00:07-00:08", with one concise sentence.
- A timestamp mentioned more than once becomes a single key whose value sums the mentions up briefly.
- If the text mentions no timestamp, return {}.

Content rules:
- Take the sentences ONLY from the given text; add nothing that it does not say.
- Each value is a brief plain-language clause (≤ 10 words) in sentence case, ending with a period.
- Prefer wording about the action ("A dog jumps over the low fence.")."""

# Everything of the extraction's user message before the reasoning; the reasoning and one newline follow.
EXTRACTION_USER_HEAD = """\
Extract the timestamped events from the text below and return ONLY the JSON object described.

STRICT KEYS FORMAT:
- ONLY zero-padded MM:SS or HH:MM:SS.
- A range is two times joined by a single hyphen: "MM:SS-MM:SS" (either side may be HH:MM:SS).
- NEVER plain seconds without a colon ("6" and "020" are not allowed).
- NO words such as "end" or "EOF", no "+", no trailing symbols.
- Decimal seconds (e.g. 01.77s or 3.5s) are rounded to the nearest second BEFORE they are written.
- A phrase like "around 16 seconds" becomes "00:16".
- Every key is unique; keys are ordered by start time, ascending.
- If the text has no timestamps, return exactly {}.

VALUES:
- Each value is ONE short clause (≤ 10 words), sentence case, about the action, ending with a period.
- Taken strictly from the text (nothing invented).

Return ONLY the JSON object: no prose, no code fences, no explanation.

The text:
"""

CONSISTENCY_SYSTEM = (
    "You are a meticulous auditor. Decide whether the reasoning (THINK) and the final answer (ANSWER) are "
    "logically consistent with each other for the question asked. Disregard style, length and extra detail; "
    "check only whether the conclusion that THINK reaches is the final ANSWER and supports it, for the same "
    "question."
)

_QUESTION_LABEL = "QUESTION:\n"
_THINK_LABEL = "\n\nTHINK (model's internal reasoning):\n"
_ANSWER_LABEL = "\n\nANSWER (model's final answer):\n"
# The end of the consistency user message, after the answer.
CONSISTENCY_TASK = """

TASK:
1) On the first line output ONLY one word, TRUE or FALSE.
   - TRUE  => THINK and ANSWER agree: they reach the same conclusion.
   - FALSE => THINK contradicts the ANSWER or does not support it (e.g. a different conclusion).
2) On the following line(s), justify the verdict briefly (1-3 sentences)."""

# What the original writes in place of an empty field, so that the judge sees that it is missing.
NO_QUESTION, MISSING = "(none)", "(missing)"


def extraction_messages(think: str) -> list[dict[str, str]]:
    """Chat messages asking the judge for the `timestamp -> claim` pairs in `think`."""
    return [
        {"role": "system", "content": EXTRACTION_SYSTEM},
        {"role": "user", "content": f"{EXTRACTION_USER_HEAD}{think}\n"},
    ]


def consistency_messages(question: str, think: str, answer: str) -> list[dict[str, str]]:
    """Chat messages asking the judge for a TRUE/FALSE verdict on reasoning-answer agreement."""
    question, think, answer = (question or "").strip(), (think or "").strip(), (answer or "").strip()
    text = (
        f"{_QUESTION_LABEL}{question or NO_QUESTION}{_THINK_LABEL}{think or MISSING}"
        f"{_ANSWER_LABEL}{answer or MISSING}{CONSISTENCY_TASK}"
    )
    return [{"role": "system", "content": CONSISTENCY_SYSTEM}, {"role": "user", "content": text}]


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
    if not text.startswith(EXTRACTION_USER_HEAD):
        return None
    think = text[len(EXTRACTION_USER_HEAD) :]
    return think[:-1] if think.endswith("\n") else think


def read_consistency_request(messages: list[dict]) -> tuple[str, str, str] | None:
    """(question, reasoning, answer) of a consistency prompt, or None if `messages` is not one.

    The fields are returned as the prompt writes them, so a missing one reads "(none)" or "(missing)".
    """
    text = _last_user_text(messages)
    if not (text.startswith(_QUESTION_LABEL) and text.endswith(CONSISTENCY_TASK)):
        return None
    body = text[len(_QUESTION_LABEL) : len(text) - len(CONSISTENCY_TASK)]
    # The question comes first and is the caller's text, the answer last and short: so the reasoning
    # runs from the first THINK label to the last ANSWER label, whatever it quotes.
    think_at, answer_at = body.find(_THINK_LABEL), body.rfind(_ANSWER_LABEL)
    if think_at < 0 or answer_at < think_at + len(_THINK_LABEL):
        return None
    return (
        body[:think_at],
        body[think_at + len(_THINK_LABEL) : answer_at],
        body[answer_at + len(_ANSWER_LABEL) :],
    )


def judged_text_length(messages: list[dict]) -> int | None:
    """Characters of the text a judge prompt asks about (the reasoning; for the consistency prompt also the
    question and the answer), or None for any other chat. The server limits it before parsing anything."""
    think = read_extraction_request(messages)
    if think is not None:
        return len(think)
    fields = read_consistency_request(messages)
    return None if fields is None else sum(len(f) for f in fields)
