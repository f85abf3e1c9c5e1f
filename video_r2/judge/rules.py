"""The rules judge: TAR's two prompts (`video_r2.judge.prompts`) answered by pure functions, without a model.

- `extract_claims(think)`: the `time -> claim` pairs of a reasoning, keyed as the extraction prompt asks
  (zero-padded MM:SS or HH:MM:SS, seconds rounded, ranges "MM:SS-MM:SS", in order of start time);
- `judge_consistency(question, think, answer)`: whether the reasoning's conclusion is the final answer;
- `rules_reply(messages)`: the whole reply to a chat, as a judge server sends it.

Everything here is linear in its input, so that no request can hold the server's worker for long: every
pattern is applied once, left to right, with positions (`pattern.search(text, pos, endpos)`) instead of
slices of the text; whitespace is collapsed to single spaces first, so no pattern can backtrack over a long
run of blanks; and claims that share a key are collected in lists and joined once. A caller with a deadline
passes it (a `time.monotonic()` value) and gets `DeadlineExceeded` soon after it passes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Optional

from video_r2.formats import format_clock, question_options
from video_r2.judge.prompts import read_consistency_request, read_extraction_request

UNSUPPORTED_REPLY = (
    "unsupported by the rules backend: it only answers the two prompts of video_r2.judge.prompts "
    "(timestamped-claim extraction and reasoning/answer consistency). Serve a real model "
    "(--backend hf, or vLLM) for anything else."
)


class DeadlineExceeded(TimeoutError):
    """The computation ran past the deadline it was given and stopped."""


def check_deadline(deadline: Optional[float]) -> None:
    """Raise `DeadlineExceeded` once `time.monotonic()` is past `deadline` (None: no deadline)."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the rules judge ran past the request's deadline")


def tidy_lines(text: str) -> list[str]:
    """The non-empty lines of `text`, each with its whitespace runs collapsed to single spaces.

    Every later pattern then meets at most one blank in a row, which is what keeps them linear."""
    return [line for line in (" ".join(raw.split()) for raw in text.split("\n")) if line]


# ==================================================================================================
# Extraction
# ==================================================================================================

# A clock time as written in reasoning: M:SS, MM:SS or H:MM:SS, optionally with fractions of a second.
_CLOCK = r"\d{1,2}(?::\d{2}){1,2}(?:\.\d+)?"
_NUM = r"\d+(?:\.\d+)?"
_SEC_UNIT = r"(?:seconds?|secs?|s)\b"
_DASH = r"\s*(?:-|–|—|\bto\b|\buntil\b|\btill\b|\bthrough\b)\s*"
# Words that can stand right before a time; they belong to the time phrase, not to the claim.
_PREPOSITIONS = (
    r"at|around|about|near|by|from|between|during|after|before|until|till|approximately|roughly|circa|"
    r"in|on|starting|beginning|since"
)

# One alternation, most specific first, so a range is never read as two single times. Every branch names
# its groups: a/b (clock), sa/sb (seconds). Each branch starts with a word boundary and a literal or with a
# digit not preceded by another, so a failed attempt costs a few characters.
_MENTION_RE = re.compile(
    "|".join(
        [
            rf"\bbetween\s+(?:the\s+)?(?P<a1>{_CLOCK})\s+and\s+(?:the\s+)?(?P<b1>{_CLOCK})(?!:?\d)",
            rf"(?<![\d:])(?P<a2>{_CLOCK}){_DASH}(?:the\s+)?(?P<b2>{_CLOCK})(?!:?\d)",
            rf"\bbetween\s+(?P<sa1>{_NUM})(?:\s*{_SEC_UNIT})?\s+and\s+(?P<sb1>{_NUM})\s*{_SEC_UNIT}",
            rf"(?<![\d:.])(?P<sa2>{_NUM})(?:\s*{_SEC_UNIT})?{_DASH}(?P<sb2>{_NUM})\s*{_SEC_UNIT}",
            rf"(?<![\d:.])(?P<a3>{_CLOCK})(?!:?\d)",
            # A bare number of seconds is a time only after a preposition ("at 16 seconds"); "it lasts
            # 16 seconds" is a duration.
            rf"\b(?:{_PREPOSITIONS})\s+(?:the\s+)?(?:(?:around|about|approximately|roughly)\s+)?"
            rf"(?P<sa3>{_NUM})(?:\s*{_SEC_UNIT}|-second\b)",
        ]
    ),
    flags=re.IGNORECASE,
)
# A mention's phrase reaches left over "at around the" or an opening bracket, right over "mark" or ")".
# The left side is searched in a short window ending at the mention (longer than any preposition plus
# " the "), never in the whole text before it.
_PREPOSITION_BEFORE_RE = re.compile(rf"\b(?:{_PREPOSITIONS})\s+(?:the\s+)?$", re.IGNORECASE)
_BRACKET_BEFORE_RE = re.compile(r"[(\[]\s*$")
_LOOKBACK = 24
_PHRASE_RIGHT_RE = re.compile(r"\s*(?:seconds?\s+)?(?:mark|timestamp|time\s*stamp)\b|\s*[)\]]", re.IGNORECASE)
_COMMA_AFTER_RE = re.compile(r"\s*,")

# A sentence ends at . ! or ? followed by a blank and what can start a sentence (so "00:03.5" or "e.g. a"
# does not split); a line break always ends one.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?]) (?=[A-Z0-9(\[\"'])")
# Where a new clause may begin inside a sentence: punctuation, or a conjunction between two statements.
_CLAUSE_DELIM_RE = re.compile(
    r"[,;:]\s*(?:(?:and then|and|but|then|while|whereas)\b\s*)?|\s+(?:and then|then|and|but|while|whereas)\s+",
    re.IGNORECASE,
)
# The conclusion that usually follows the last observation ("..., so the answer is C"): not part of a claim.
_CONCLUSION_RE = re.compile(
    r"[,;:]\s*(?:and\s+)?(?:so|therefore|thus|hence|which means|meaning|this means)\b"
    r"|\s+(?:therefore|thus|hence)\b"
    r"|\s+so\s+(?:the\s+)?(?:final\s+)?(?:answer|option|choice|correct)\b",
    re.IGNORECASE,
)
_LEADING_FILLER_RE = re.compile(
    r"(?:first(?:ly)?|second(?:ly)?|then|next|finally|later|afterwards|after that|subsequently|initially|"
    r"and|but|so|meanwhile|also)\b[\s,]*",
    re.IGNORECASE,
)
_TRIM = " ,;:-–—"


@dataclass(frozen=True)
class TimeMention:
    """A time found in a sentence: its span in whole seconds and the character span of the time phrase."""

    first: int  # seconds, rounded; first <= last
    last: int
    start: int  # phrase start, prepositions and brackets included
    end: int

    @property
    def key(self) -> str:
        """The extraction prompt's key: "00:16", "01:02:05", or "00:10-00:15" for a range."""
        if self.first == self.last:
            return format_clock(self.first)
        return f"{format_clock(self.first)}-{format_clock(self.last)}"


def clock_seconds(text: str) -> float:
    """Seconds in "1:05.6", "00:03" or "1:02:03"."""
    *rest, seconds = text.split(":")
    hours, minutes = (int(rest[0]), int(rest[1])) if len(rest) == 2 else (0, int(rest[0]))
    return hours * 3600 + minutes * 60 + float(seconds)


def _mention_seconds(match: re.Match) -> tuple[float, float]:
    g = match.groupdict()
    if g["a1"] or g["a2"]:
        return clock_seconds(g["a1"] or g["a2"]), clock_seconds(g["b1"] or g["b2"])
    if g["sa1"] or g["sa2"]:
        return float(g["sa1"] or g["sa2"]), float(g["sb1"] or g["sb2"])
    if g["a3"]:
        return clock_seconds(g["a3"]), clock_seconds(g["a3"])
    return float(g["sa3"]), float(g["sa3"])


def _phrase_start(sentence: str, start: int) -> int:
    """Where the phrase of a time that starts at `start` begins, its prepositions or bracket included."""
    moved = start
    while (found := _PREPOSITION_BEFORE_RE.search(sentence, max(0, moved - _LOOKBACK), moved)) is not None:
        moved = found.start()  # a chain: "at around the 00:03"
    if moved != start:
        return moved
    bracket = _BRACKET_BEFORE_RE.search(sentence, max(0, start - _LOOKBACK), start)
    return bracket.start() if bracket else start


def find_time_mentions(sentence: str, deadline: Optional[float] = None) -> list[TimeMention]:
    """Every timestamp or time range in `sentence`, in order, with the span of the phrase that states it.

    Seconds are rounded to whole ones (as the prompt asks: "1:05.6" is 01:06), and a range written back to
    front is put in order."""
    mentions = []
    for match in _MENTION_RE.finditer(sentence):
        check_deadline(deadline)
        start, end = match.span()
        right = _PHRASE_RIGHT_RE.match(sentence, end)
        first, last = sorted(round(s) for s in _mention_seconds(match))
        mentions.append(TimeMention(first, last, _phrase_start(sentence, start), right.end() if right else end))
    return mentions


def split_sentences(text: str) -> list[str]:
    """Sentences of a reasoning, whitespace collapsed; a line break or ". X" ends one, "00:03.5" does not."""
    return [s for line in tidy_lines(text) for s in _SENTENCE_END_RE.split(line) if s]


def _clause_start(sentence: str, previous_end: int, mention: TimeMention, first: bool) -> int:
    """Where the clause holding a mention begins: after the last delimiter since the previous mention.

    Without such a delimiter the first mention's clause starts with the sentence, a later one's with its own
    phrase (the words in between belong to the earlier claim). A time set off by commas ("A triangle, at
    00:03, fills the screen") is a parenthesis, so its clause reaches back over the comma before it.
    """
    phrase_start = mention.start
    delims = list(_CLAUSE_DELIM_RE.finditer(sentence, previous_end, phrase_start))
    if not delims:
        return previous_end if first else phrase_start
    last = delims[-1]
    parenthesis = (
        last.end() == phrase_start
        and last.group().strip() == ","
        and _COMMA_AFTER_RE.match(sentence, mention.end) is not None
    )
    if parenthesis:
        return delims[-2].end() if len(delims) > 1 else (previous_end if first else phrase_start)
    return last.end()


def _clause_end(sentence: str, phrase_end: int, next_clause_start: int) -> int:
    """Where that clause ends: at the next clause, or earlier at a concluding "so the answer is ..."."""
    conclusion = _CONCLUSION_RE.search(sentence, phrase_end, next_clause_start)
    if conclusion:
        return conclusion.start()
    # The next clause starts after its delimiter; the delimiter itself belongs to neither claim.
    delims = [
        d for d in _CLAUSE_DELIM_RE.finditer(sentence, phrase_end, next_clause_start) if d.end() == next_clause_start
    ]
    return delims[-1].start() if delims else next_clause_start


def _drop_leading_fillers(text: str) -> str:
    """"then, finally a star" -> "a star": the sequence words that open a clause are no part of the claim."""
    pos = 0
    while (filler := _LEADING_FILLER_RE.match(text, pos)) is not None and filler.end() > pos:
        pos = filler.end()
        while pos < len(text) and text[pos] in _TRIM:
            pos += 1
    return text[pos:]


def _clean_claim(text: str) -> str:
    """Tidy what is left of a clause once the time phrase is cut out of it."""
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;:.!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = _drop_leading_fillers(text.strip(_TRIM))
    return text.rstrip(".!?").strip(_TRIM + "\"'")


def _sentence_claims(sentence: str, deadline: Optional[float]) -> list[tuple[TimeMention, str]]:
    mentions = find_time_mentions(sentence, deadline)
    starts, previous_end = [], 0
    for i, m in enumerate(mentions):
        starts.append(_clause_start(sentence, previous_end, m, first=i == 0))
        previous_end = m.end
    pairs = []
    for i, m in enumerate(mentions):
        next_start = starts[i + 1] if i + 1 < len(mentions) else len(sentence)
        begin, end = starts[i], _clause_end(sentence, m.end, next_start)
        before, after = sentence[begin : m.start].rstrip(), sentence[m.end : max(end, m.end)].lstrip()
        if before.endswith(",") and after.startswith(","):  # "A triangle, at 00:03, fills" -> no commas left
            before, after = before[:-1], after[1:]
        claim = _clean_claim(f"{before} {after}")
        if claim:
            pairs.append((m, claim))
    return pairs


def extract_claims(think: str, deadline: Optional[float] = None) -> dict[str, str]:
    """The `time -> claim` pairs of a reasoning, as the extraction prompt asks for them.

    Keys are zero-padded MM:SS or HH:MM:SS in whole seconds ("at 12 seconds" and "around 16 seconds" give
    "00:12" and "00:16", "1:05.6" gives "01:06", "1:02:03" gives "01:02:03"); a range is "A-B" whatever
    the dash or wording ("from 00:10 to 00:15", "between 10 and 15 seconds"). A time stated more than once
    is one key, its claims joined with "; ". Keys come in order of start time.
    """
    # key -> its claims as the keys of a dict: in order, each once, membership in constant time.
    claims: dict[str, dict[str, None]] = {}
    spans: dict[str, tuple[int, int]] = {}
    for sentence in split_sentences(think):
        check_deadline(deadline)
        for mention, claim in _sentence_claims(sentence, deadline):
            claims.setdefault(mention.key, {})[claim] = None
            spans[mention.key] = (mention.first, mention.last)
    ordered = sorted(claims, key=spans.__getitem__)  # stable: equal spans keep the reasoning's order
    return {key: "; ".join(claims[key]) for key in ordered}


# ==================================================================================================
# Consistency
# ==================================================================================================

_NUMBER = r"-?\d+(?:\.\d+)?"
# A letter or number that is not the start of a word or of a clock time.
_CHOICE_TAIL = r"(?![\w:])"


def _choice_patterns(letters: str) -> list[re.Pattern]:
    """Ways a reasoning states its choice, strongest first. Words match any case; option letters only upper
    case, so the article "a" or the pronoun "I" are never read as options."""
    choice = rf"[\"'(\[]?(?P<x>[{letters}]|{_NUMBER}){_CHOICE_TAIL}"
    return [
        re.compile(
            rf"(?i:answer)\s*(?i:is|would be|should be|must be|will be)?\s*[:=]?\s*(?i:(?:option|choice)\s*)?{choice}"
        ),
        re.compile(rf"(?i:option|choice)\s*{choice}"),
        re.compile(
            rf"(?i:so|therefore|thus|hence)\s*,?\s*(?i:(?:it is|it's|it must be|we get|we pick|pick|choose)\s+)?"
            rf"[\"'(\[]?(?P<x>[{letters}]){_CHOICE_TAIL}"
        ),
    ]


def concluded_choice(think: str, letters: str = "ABCDEFGH") -> Optional[str]:
    """The option letter or number a reasoning concludes: the last match of the strongest pattern."""
    think = "\n".join(tidy_lines(think))
    for pattern in _choice_patterns(letters):
        found = [m.group("x") for m in pattern.finditer(think)]
        if found:
            return found[-1]
    return None


def _normalise_text(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def answer_choice(answer: str, options: dict[str, str]) -> tuple[Optional[str], str]:
    """(option letter or number the final answer names, or None; the answer as plain text)."""
    text = " ".join(re.sub(r"</?answer>", "", answer or "").split())
    # "C", "(C)", "C.", "C) blue triangle", "option C"; not "A dog" (a word, as rewards.py reads it too).
    letter = re.match(r"^(?:(?i:option|choice)\s*)?\(?([A-Z])\)?(?:[.):].*)?$", text, flags=re.DOTALL)
    if letter and (not options or letter.group(1) in options):
        return letter.group(1), text
    number = re.match(rf"^({_NUMBER})(?:\s*{_SEC_UNIT})?\s*\.?$", text, flags=re.IGNORECASE)
    if number:
        return number.group(1), text
    for key, option_text in options.items():  # a free-text answer that is one of the options
        if _normalise_text(option_text) == _normalise_text(text):
            return key, text
    return None, text


def _same_choice(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.upper() == b.upper()


def judge_consistency(question: str, think: str, answer: str, deadline: Optional[float] = None) -> tuple[bool, str]:
    """(does the reasoning's conclusion agree with the final answer?, a one-sentence reason)."""
    options = question_options("\n".join(tidy_lines(question or "")))
    check_deadline(deadline)
    wanted, answer_text = answer_choice(answer, options)
    concluded = concluded_choice(think, "".join(options) or "ABCDEFGH")
    check_deadline(deadline)
    if wanted is not None and concluded is not None:
        if _same_choice(concluded, wanted):
            return True, f"The reasoning concludes {concluded}, which is the final answer."
        return False, f"The reasoning concludes {concluded}, but the final answer is {wanted}."
    # No stated choice on one side: the answer (or the text of the option it names) must appear in the
    # reasoning's last sentence. A bare option letter is no text to look for ("a" is everywhere); its
    # option's text is.
    forms = [options[wanted]] if wanted in options else ([] if wanted and wanted.isalpha() else [answer_text])
    sentences = split_sentences(think)
    last = f" {_normalise_text(sentences[-1])} " if sentences else ""
    if any(_normalise_text(f) and f" {_normalise_text(f)} " in last for f in forms):
        return True, "The reasoning's last sentence states the final answer."
    if not forms:
        return False, "The reasoning does not state which option or number it concludes."
    return False, f"The reasoning's last sentence does not state the final answer ({forms[-1]})."


def rules_reply(messages: list[dict], deadline: Optional[float] = None) -> str:
    """The rules judge's whole reply to a chat: extraction JSON, a TRUE/FALSE verdict, or UNSUPPORTED_REPLY."""
    think = read_extraction_request(messages)
    if think is not None:
        return json.dumps(extract_claims(think, deadline), ensure_ascii=False)
    fields = read_consistency_request(messages)
    if fields is not None:
        consistent, reason = judge_consistency(*fields, deadline=deadline)
        return f"{'TRUE' if consistent else 'FALSE'}\n{reason}"
    return UNSUPPORTED_REPLY
