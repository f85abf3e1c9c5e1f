"""The text formats every stage shares, written once: timestamps, option letters, answer tags.

Data validation, the rewards, the rules judge, the overlays and the synthetic task all read or write
these; keeping them here means a key the data checker accepts is exactly a key TAR can score, and a
time the overlay draws is exactly a time the judge can parse back. Pure Python, no heavy imports.

Timestamps:
    parse_clock("01:15.5") -> 75.5        MM:SS or HH:MM:SS with optional decimals, else None
    parse_timestamp_key("00:05-00:09")    -> (5, 9), a claim key as whole seconds (see its docstring)
    format_hms(75.9) -> "00:01:15"        the overlay's clock (floored, always HH:MM:SS)
    format_mmss(75) -> "01:15"            the synthetic task's `temporal_grounding` keys
    format_clock(75.5) -> "01:15.5"       the rules judge's normalised keys (hours only when needed)
Options:
    option_letter("D) yellow") -> "D"     the letter an answer or reference names, else None
    question_options(question)            {"A": "red", ...} from option lines of a question
Tags:
    tag_text, extract_think, extract_answer
"""

from __future__ import annotations

import math
import re

__all__ = [
    "TIME_EPSILON",
    "parse_clock",
    "parse_timestamp_key",
    "format_hms",
    "format_mmss",
    "format_clock",
    "option_letter",
    "question_options",
    "tag_text",
    "extract_think",
    "extract_answer",
]

TIME_EPSILON = 1e-6  # pts are float products of integer ticks: 2.0 s may arrive as 1.9999999999999998

# ---------------------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------------------

_CLOCK = re.compile(r"(\d+):(\d{1,2})(?::(\d{1,2}))?(?:[.,](\d+))?")
_RANGE_SPLIT = re.compile(r"\s*(?:-|–|—|\bto\b)\s*", flags=re.IGNORECASE)


def parse_clock(text: str) -> float | None:
    """Seconds of a clock time `MM:SS` or `HH:MM:SS` (decimals allowed); None if it is not one."""
    match = _CLOCK.fullmatch(text.strip())
    if match is None:
        return None
    first, second, third, fraction = match.groups()
    hours, minutes, seconds = (int(first), int(second), int(third)) if third else (0, int(first), int(second))
    if seconds >= 60 or (third and minutes >= 60):
        return None
    return hours * 3600 + minutes * 60 + seconds + (float(f"0.{fraction}") if fraction else 0.0)


def parse_timestamp_key(key: str) -> tuple[int, int] | None:
    """A claim's time key as whole seconds `(start_s, end_s)`; None if it is not a usable time.

    Accepts `MM:SS` and `HH:MM:SS`, a point or a range joined by `-`, `–`, `—` or `to`, optionally in
    brackets. Decimal seconds are rounded half up; a reversed range is swapped. Plain numbers ("12"),
    open ends ("00:10-end", "00:10+") and anything else give None.
    """
    text = key.strip().strip("[]()").strip()
    parts = _RANGE_SPLIT.split(text)
    if len(parts) > 2:
        return None
    times = [parse_clock(part) for part in parts]
    if any(t is None for t in times):
        return None
    start, end = (math.floor(t + 0.5) for t in (times[0], times[-1]))  # half up; round() is half even
    return (start, end) if start <= end else (end, start)


def format_hms(t: float) -> str:
    """``HH:MM:SS`` of the whole seconds in ``t`` (floored: 59.999 -> ``00:00:59``).

    A frame shown at 59.999 s has not reached second 60, and flooring is what a player's clock
    shows. A microsecond of slack absorbs float error in pts (2.0 s arriving as 1.9999999999).
    """
    seconds = max(0, math.floor(t + TIME_EPSILON))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def format_mmss(seconds: float) -> str:
    """``MM:SS`` of whole seconds (minutes may pass 59), the key format of `temporal_grounding`."""
    s = int(seconds)
    return f"{s // 60:02d}:{s % 60:02d}"


def format_clock(seconds: float) -> str:
    """16 -> "00:16", 75.5 -> "01:15.5", 3725 -> "01:02:05": the form `parse_timestamp_key` reads."""
    whole = int(seconds)
    fraction = f"{seconds - whole:.3f}".lstrip("0").rstrip("0").rstrip(".") if seconds != whole else ""
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
    return clock + fraction


# ---------------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------------

# An option letter alone, or followed by ")", "." or ":" (and then perhaps the option text), or "(D)".
# A letter followed by more letters ("Dog") or by a space and words ("A dog") is not an option.
_OPTION = re.compile(r"\s*(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):](?:\s.*)?)?)\s*", flags=re.DOTALL)
# An option line of a question: "A. red", "(B) blue", "C) green", "D: yellow".
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+(.+?)\s*$", re.MULTILINE)


def option_letter(text: str) -> str | None:
    """The option letter `text` names ("D", "D)", "d.", "(D)", "D) yellow"), upper-cased, or None."""
    match = _OPTION.fullmatch(text)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).upper()


def question_options(question: str | None) -> dict[str, str]:
    """The options a question lists, letter -> text, in order ({} for a question without options)."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question or "")}


# ---------------------------------------------------------------------------------------------------
# <think> / <answer> tags
# ---------------------------------------------------------------------------------------------------


def tag_text(text: str, tag: str) -> str | None:
    """The stripped text inside the first `<tag>…</tag>`, or None if there is no such block."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return match.group(1).strip() if match else None


def extract_answer(completion: str) -> str | None:
    """The text inside `<answer>…</answer>`, stripped, or None if there is no such block."""
    return tag_text(completion, "answer")


def extract_think(completion: str) -> str:
    """The text inside `<think>…</think>`, stripped ("" if there is none)."""
    return tag_text(completion, "think") or ""
