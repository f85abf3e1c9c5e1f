"""Accuracy: how well an answer matches the record's reference, by question type.

Types as the original infers them from the reference when a record gives none: multiple choice, numerical,
regression (partial credit), OCR (1 - word error rate), else free-form (mean ROUGE-1/2/L). Our departures
are listed in `video_r2.rewards`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import jiwer
from rouge_score import rouge_scorer

from video_r2.formats import extract_answer, option_letter


def _reference_answer(sample: dict) -> str | None:
    reference = sample.get("answer", sample.get("solution"))
    if reference is None:
        return None
    reference = str(reference)
    return extract_answer(reference) or reference.strip()  # Video-R1 wraps solutions in <answer> tags


def _question_type(sample: dict) -> str | None:
    return sample.get("question_type") or sample.get("problem_type")


# ---------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # thousands separators: 1,234.5
_NUMBER_TOKEN = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")

_TYPE_ALIASES = {
    "multiple choice": "multiple_choice",
    "multiple_choice": "multiple_choice",
    "multiple-choice": "multiple_choice",
    "mc": "multiple_choice",
    "numerical": "numerical",
    "numeric": "numerical",
    "number": "numerical",
    "ocr": "ocr",
    "free-form": "free_form",
    "free_form": "free_form",
    "free form": "free_form",
    "open-ended": "free_form",
    "regression": "regression",
}


def parse_number(text: str) -> float | None:
    """`text` as a number, allowing thousands separators ("1,234.5"); None if it is not one.

    If `text` is not a number on its own but holds exactly one number ("2 cars"), that one is used.
    """
    text = text.strip().rstrip(".")
    if _PLAIN_NUMBER.fullmatch(text) or _GROUPED_NUMBER.fullmatch(text):
        return float(text.replace(",", ""))
    found = [token for token in _NUMBER_TOKEN.findall(text) if any(c.isdigit() for c in token)]
    return float(found[0].replace(",", "")) if len(found) == 1 else None


def _has_decimal(text: str) -> bool:
    return "." in text.strip().rstrip(".")  # a full stop ending a sentence is not a decimal point


def _numerical_score(prediction: str, reference: str) -> float:
    predicted, expected = parse_number(prediction), parse_number(reference)
    if predicted is None or expected is None:
        return 0.0
    # As in the original: "2.0" for "2" (or "2" for "2.5") is wrong, whatever the value.
    if _has_decimal(prediction) != _has_decimal(reference):
        return 0.0
    return 1.0 if abs(round(predicted, 2) - round(expected, 2)) < 1e-9 else 0.0


def _regression_score(prediction: str, reference: str) -> float:
    predicted, expected = parse_number(prediction), parse_number(reference)
    if predicted is None or expected is None:
        return 0.0
    if expected == 0:  # the original divided by 1e-9 here and gave 0 even to an exact answer
        return 1.0 if predicted == 0 else 0.0
    return min(1.0, max(0.0, 1.0 - abs(predicted - expected) / abs(expected)))


def _ocr_score(prediction: str, reference: str) -> float:
    prediction, reference = " ".join(prediction.split()), " ".join(reference.split())
    if not reference:
        return 1.0 if not prediction else 0.0
    if not prediction:  # jiwer refuses an empty hypothesis; every reference word was deleted
        return 0.0
    return max(0.0, 1.0 - jiwer.wer(reference, prediction))


@functools.cache
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def _free_form_score(prediction: str, reference: str) -> float:
    scores = _rouge().score(reference, prediction)
    return sum(score.fmeasure for score in scores.values()) / len(scores)


def _multiple_choice_score(prediction: str, reference: str) -> float:
    expected = option_letter(reference)
    if expected is None:  # a record typed multiple choice whose answer is the option's text
        return 1.0 if " ".join(prediction.lower().split()) == " ".join(reference.lower().split()) else 0.0
    return 1.0 if option_letter(prediction) == expected else 0.0


_SCORERS: dict[str, Callable[[str, str], float]] = {
    "multiple_choice": _multiple_choice_score,
    "numerical": _numerical_score,
    "ocr": _ocr_score,
    "free_form": _free_form_score,
    "regression": _regression_score,
}


_OCR_REFERENCE = re.compile(r"[A-Za-z0-9\s\-:]+")


def infer_question_type(reference: str) -> str:
    """The question type a bare reference implies, by the original recipe's rules in its order.

    An option letter is multiple choice; a number is numerical, or regression when it has more than
    3 decimals ("3.14159"); up to 5 words of letters, digits, spaces, "-" and ":" are OCR (scored by
    word error rate, so an exact "Paris" gets 1); anything else is free-form. Departure: the original
    took any reference starting with A-E as an option ("Dog" as option D); here only `option_letter`'s
    forms are ("D", "D)", "(D)", "D. dog", "B yellow").
    """
    text = reference.strip()
    if option_letter(text) is not None:
        return "multiple_choice"
    number = text.rstrip(".")
    if _PLAIN_NUMBER.fullmatch(number) or _GROUPED_NUMBER.fullmatch(number):
        return "regression" if "." in number and len(number.split(".")[-1]) > 3 else "numerical"
    if len(text.split()) <= 5 and _OCR_REFERENCE.fullmatch(text):
        return "ocr"
    return "free_form"


def normalize_question_type(question_type: str | None) -> str | None:
    """A record's type name in this module's spelling, or None if it is missing or unknown."""
    if not question_type:
        return None
    return _TYPE_ALIASES.get(question_type.strip().lower())


def score_answer(prediction: str, reference: str, question_type: str | None = None) -> float:
    """How well `prediction` (the text inside `<answer>`) matches `reference`, in [0, 1].

    `question_type` as the record gives it ("multiple choice", "numerical", "OCR", "free-form",
    "regression"; `problem_type` spellings too); when missing or unknown, it is inferred.
    """
    kind = normalize_question_type(question_type) or infer_question_type(reference)
    return float(_SCORERS[kind](prediction.strip(), reference.strip()))
