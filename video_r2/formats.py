"""The text formats every stage shares, written once: timestamps, option letters, answer tags.

Data validation, the rewards, the rules judge, the overlays and the synthetic task all read or write
these; keeping them here means a key the data checker accepts is exactly a key TAR can score, and a
time the overlay draws is exactly a time the judge can parse back. Pure Python, no heavy imports.

Timestamps:
    parse_timestamp_key("00:05-00:09")    -> (5, 9), a claim key as whole seconds, read as the original
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

_RANGE_SPLIT = re.compile(r"\s*(?:-|–|—|\bto\b)\s*", flags=re.IGNORECASE)


def _key_seconds(token: str) -> int | None:
    """One end of a claim key as whole seconds, read as the original recipe reads it.

    "00:42" and "1:02:03" (seconds may carry decimals and may exceed 59: "00:75" is 75 s), or plain
    seconds "12"; the total is rounded with Python's `round` (half to even: 2.5 -> 2). A trailing
    "+", "." or "," is ignored; "end", "EOF" and anything else give None.
    """
    text = token.strip().strip("+.,").lower()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            return None
        try:
            hours = int(parts[0]) if len(parts) == 3 else 0
            minutes, seconds = int(parts[-2]), float(parts[-1])
        except ValueError:
            return None
        return int(round(hours * 3600 + minutes * 60 + seconds))
    try:
        return int(text)
    except ValueError:
        try:
            return int(round(float(text)))
        except (ValueError, OverflowError):  # "nan", "inf" and words
            return None


def parse_timestamp_key(key: str) -> tuple[int, int] | None:
    """A claim's time key as whole seconds `(start_s, end_s)`; None if it is not a usable time.

    The original Video-R2 reading (its `sanitize_timestamps_dict`), so TAR counts the same claims: a
    point or a range joined by `-`, `–`, `—` or `to`; each end as `_key_seconds` reads it ("12" is
    12 s, "00:75" is 75 s, "00:03.5" rounds half to even); a reversed range is swapped; an open end
    ("00:10-end", "00:10-") or a key of three parts gives None. Departure: surrounding brackets
    ("[00:05]") are accepted, where the original dropped the claim.
    """
    if not isinstance(key, str):
        return None
    parts = _RANGE_SPLIT.split(key.strip().strip("[]()").strip())
    if len(parts) > 2:
        return None
    start, end = _key_seconds(parts[0]), _key_seconds(parts[-1])
    if start is None or end is None:
        return None
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


# "B yellow": a capital letter, a space, the option's text (as the original reads it). "A" and "I"
# before a lower-case word are English ("A dog", "I think"), not options.
_OPTION_SPACED = re.compile(r"\s*([A-H])\s+(\S).*", flags=re.DOTALL)


def option_letter(text: str) -> str | None:
    """The option letter `text` names ("D", "D)", "d.", "(D)", "D) yellow", "B yellow"), upper-cased, or None."""
    match = _OPTION.fullmatch(text)
    if match is not None:
        return (match.group(1) or match.group(2)).upper()
    spaced = _OPTION_SPACED.fullmatch(text)
    if spaced is not None and not (spaced.group(1) in "AI" and spaced.group(2).islower()):
        return spaced.group(1)
    return None


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
