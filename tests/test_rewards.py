"""Rewards: accuracy per question type, format, and TAR (pure matching, real MiniLM, a real judge server)."""

from __future__ import annotations

import re

import pytest

from video_r2.judge import JudgeClient, JudgeUnavailableError
from video_r2.judge.prompts import read_consistency_request, read_extraction_request
from video_r2.rewards import (
    REWARDS,
    RewardContext,
    compute_rewards,
    get_embedder,
    get_reward,
    match_claims,
    parse_timestamp_key,
    score_answer,
)

GROUNDING = {"00:00-00:02": "A red circle fills the screen.", "00:02-00:05": "A blue triangle fills the screen."}
QUESTION = "Which colour is the shape at 00:03? A) red B) green C) blue D) yellow"


def table(scores: dict[tuple[str, str], float]):
    """A similarity function from a hand-written table (missing pairs score 0)."""
    return lambda a, b: [[scores.get((x, y), 0.0) for y in b] for x in a]


def same_text(a, b):
    return [[1.0 if x == y else 0.0 for y in b] for x in a]


# -- timestamps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "span"),
    [
        ("00:03", (3, 3)),
        ("1:02:03", (3723, 3723)),
        ("00:10-00:15", (10, 15)),
        ("00:10 – 00:15", (10, 15)),
        ("00:10—00:15", (10, 15)),
        ("00:10 to 00:15", (10, 15)),
        ("[00:01:05 - 00:01:10]", (65, 70)),
        ("00:15-00:10", (10, 15)),  # reversed: swapped
        ("00:03.5", (4, 4)),  # Python's round: half to even
        ("00:02.5", (2, 2)),
        ("00:02.4-00:04.6", (2, 5)),
        ("12", (12, 12)),  # plain seconds, as the original reads them
        ("00:75", (75, 75)),  # seconds past 59, as the original reads them
        ("12.6", (13, 13)),
        ("00:10+", (10, 10)),  # a trailing "+" is ignored
        ("0:05", (5, 5)),
    ],
)
def test_parse_timestamp_key_reads_points_and_ranges(key, span):
    assert parse_timestamp_key(key) == span


@pytest.mark.parametrize("key", ["12s", "00:10-end", "00:10-EOF", "00:10-", "start", "", "1:2:3:4", "00:01-00:02-00:03",
                                 "-5", "nan"])
def test_parse_timestamp_key_drops_open_ends_and_junk(key):
    assert parse_timestamp_key(key) is None


# -- match_claims, hand-computed ----------------------------------------------------------------


def test_ranges_and_points_match_their_events():
    predicted = {"00:03": "A blue triangle fills the screen.", "00:00-00:02": "A red circle fills the screen."}
    assert match_claims(predicted, GROUNDING, same_text) == 1.0


def test_spans_that_touch_exactly_at_the_buffer_overlap():
    reference = {"00:03-00:05": "event"}
    # Widened by 2 s each: [7, 11] and [1, 7] touch at 7 s.
    assert match_claims({"00:09": "event"}, reference, same_text, buffer_seconds=2.0) == 1.0
    # One second further: [8, 12] and [1, 7] are apart.
    assert match_claims({"00:10": "event"}, reference, same_text, buffer_seconds=2.0) == 0.0
    assert match_claims({"00:01": "event"}, reference, same_text, buffer_seconds=1.0) == 1.0  # [0, 2] and [2, 6]
    assert match_claims({"00:00": "event"}, reference, same_text, buffer_seconds=1.0) == 0.0


def test_a_reference_event_is_used_only_once():
    predicted = {"00:03": "triangle", "00:04": "triangle again"}
    similarity = table({("triangle", "event"): 0.9, ("triangle again", "event"): 0.95})
    assert match_claims(predicted, {"00:03": "event"}, similarity) == 0.5


def test_matching_is_greedy_by_start_time_and_takes_the_most_similar_event():
    # P1 (earlier) prefers E2, leaving P2 nothing it is similar enough to: 1 of 2 match (an optimal
    # assignment would find 2; the paper's greedy rule does not).
    predicted = {"00:06": "P2", "00:04": "P1"}  # dict order must not matter
    reference = {"00:05": "E2", "00:04": "E1"}
    similarity = table({("P1", "E1"): 0.8, ("P1", "E2"): 0.9, ("P2", "E2"): 0.9})
    assert match_claims(predicted, reference, similarity) == 0.5


def test_similarity_threshold_is_inclusive():
    reference = {"00:03": "event"}
    assert match_claims({"00:03": "claim"}, reference, table({("claim", "event"): 0.75})) == 1.0
    assert match_claims({"00:03": "claim"}, reference, table({("claim", "event"): 0.7499})) == 0.0
    assert match_claims({"00:03": "claim"}, reference, table({("claim", "event"): 0.8}), similarity_threshold=0.9) == 0


def test_score_is_matches_over_readable_predicted_claims():
    predicted = {"00:03": "A blue triangle fills the screen.", "00:30": "A dog barks.", "soon": "dropped",
                 "00:01-end": "x"}
    assert match_claims(predicted, GROUNDING, same_text) == 0.5  # 1 of the 2 readable claims


def test_claim_set_follows_the_original():
    from video_r2.rewards import claim_set

    claims = {"00:09": "late", "00:05": "first spelling", "0:05": "second spelling", "00:07": None, "00:08": "  ",
              "00:00-00:10": "whole clip", "12": "plain seconds"}
    # "0:05" and "00:05" are one claim (the later text wins); null and blank texts are dropped;
    # the order is by span midpoint: 5, 5 (the range's midpoint, after the point: stable), 9, 12.
    assert claim_set(claims) == [(5, 5, "second spelling"), (0, 10, "whole clip"), (9, 9, "late"),
                                 (12, 12, "plain seconds")]


def test_a_plain_seconds_claim_counts_in_tar():
    # "at 12 seconds" normalised by a judge to "12": the original counts it; before it fell out of both sides.
    reference = {"00:10-00:14": "A dog barks."}
    assert match_claims({"12": "A dog barks.", "00:40": "A cat."}, reference, same_text) == 0.5


def test_visiting_by_midpoint_decides_which_claim_takes_a_shared_event():
    # Both claims overlap the one event; the point claim's midpoint (6) comes before the range's (7.5),
    # so it is visited first and takes the event, even though the range starts earlier.
    reference = {"00:05-00:08": "event"}
    predicted = {"00:00-00:15": "range", "00:06": "point"}
    sims = table({("range", "event"): 0.9, ("point", "event"): 0.8})
    assert match_claims(predicted, reference, sims) == 0.5


def test_empty_sides_score_zero_without_calling_similarity():
    def never(a, b):
        raise AssertionError("similarity must not be called")

    assert match_claims({}, GROUNDING, never) == 0.0
    assert match_claims({"00:03": "x"}, {}, never) == 0.0
    assert match_claims({"soon": "x"}, GROUNDING, never) == 0.0


# -- real MiniLM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return get_embedder()


def test_minilm_is_loaded_once_and_tells_a_paraphrase_from_an_unrelated_claim(minilm):
    assert get_embedder() is minilm
    reference = {"00:02-00:05": "A blue triangle fills the screen."}
    paraphrase = {"00:03": "A blue triangle covers the screen."}
    unrelated = {"00:03": "A man is cooking pasta in a kitchen."}

    scores = minilm.similarity(
        ["A blue triangle covers the screen.", "A man is cooking pasta in a kitchen."], ["A blue triangle fills the screen."]
    )
    assert float(scores[0][0]) > 0.85 and float(scores[1][0]) < 0.3
    assert match_claims(paraphrase, reference, minilm.similarity) == 1.0
    assert match_claims(unrelated, reference, minilm.similarity) == 0.0


# -- TAR end to end, against a real HTTP judge that follows rules ---------------------------------


def rules_judge(messages, n):
    """Extraction: each "At MM:SS <claim>" of the reasoning. Consistency: TRUE iff it ends on the answer."""
    think = read_extraction_request(messages)
    if think is not None:
        claims = dict(re.findall(r"[Aa]t (\d\d:\d\d(?:-\d\d:\d\d)?),? ([^,.]+)", think))
        body = ", ".join(f'"{key}": "{claim}."' for key, claim in claims.items())
        return 200, f"Here you go:\n```json\n{{{body}}}\n```", 0.0
    question, think, answer = read_consistency_request(messages)
    consistent = think.rstrip(".").endswith(f"the answer is {answer}")
    return 200, f"{'TRUE' if consistent else 'FALSE'}\nReason.", 0.0


def sample(**overrides):
    record = {"question": QUESTION, "answer": "C", "temporal_grounding": GROUNDING, "question_type": "multiple choice"}
    record.update(overrides)
    return record


@pytest.fixture
def context(judge_server, minilm):
    judge_server.reply = rules_judge
    judge = JudgeClient(judge_server.base_url, "judge", timeout=2.0, retries=0)
    yield RewardContext(judge=judge, embedder=minilm)
    judge.close()


class CountingEmbedder:
    """The real MiniLM, counting how many encode calls a step makes."""

    def __init__(self, embedder):
        self.embedder, self.calls = embedder, 0

    def encode(self, texts):
        self.calls += 1
        return self.embedder.encode(texts)


def test_tar_step_hand_computed(context, judge_server):
    context.embedder = CountingEmbedder(context.embedder)
    completions = [
        # both claims match their events, reasoning supports the answer: 1.0
        "<think>At 00:01 a red circle fills the screen, at 00:03 a blue triangle fills the screen, "
        "so the answer is C.</think><answer>C</answer>",
        # one of two claims matches (the other is far from any event): 0.5
        "<think>At 00:03 a blue triangle fills the screen, at 00:20 a blue triangle fills the screen, "
        "so the answer is C.</think><answer>C</answer>",
        # aligned, but the reasoning concludes C while the answer says B: the gate is FALSE
        "<think>At 00:03 a blue triangle fills the screen, so the answer is C.</think><answer>B</answer>",
        # no timestamps: the judge lists nothing, no consistency call
        "<think>A blue triangle fills the screen, so the answer is C.</think><answer>C</answer>",
        # an empty <think>: no judge call at all
        "<think></think><answer>C</answer>",
    ]
    values = get_reward("tar")(completions, [sample()] * len(completions), context)

    assert values == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert context.embedder.calls == 1  # every claim and event of the step in one call
    kinds = [("extract" if read_extraction_request(m) is not None else "consistency") for m in judge_server.requests]
    assert kinds.count("extract") == 4 and kinds.count("consistency") == 3
    metrics = context.metrics()
    assert metrics["tar/gate_false"] == 1 and metrics["tar/no_claims"] == 1
    assert metrics["judge/failures"] == 0


def test_tar_is_none_not_zero_when_the_judge_fails_and_the_step_raises_past_the_limit(context, judge_server):
    good = "<think>At 00:03 a blue triangle fills the screen, so the answer is C.</think><answer>C</answer>"
    bad = "<think>At 00:01 a red circle fills the screen, so the answer is C.</think><answer>C</answer>"
    judge_server.reply = lambda messages, n: (500, "x", 0) if "red circle" in str(messages) else rules_judge(messages, n)

    assert get_reward("tar")([good, good, good, bad], [sample()] * 4, context) == [1.0, 1.0, 1.0, None]
    assert context.metrics()["tar/none"] == 1

    # 3 of 5 requests fail (the good completion's two are answered from the cache): above half
    with pytest.raises(JudgeUnavailableError, match="curl"):
        get_reward("tar")([bad, bad, bad, good], [sample()] * 4, context)


def test_tar_without_reference_grounding_is_zero_and_asks_nothing(context, judge_server):
    completion = "<think>At 00:03 a blue triangle fills the screen, so the answer is C.</think><answer>C</answer>"
    assert get_reward("tar")([completion], [sample(temporal_grounding=None)], context) == [0.0]
    assert judge_server.requests == []


# -- accuracy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "kind", "expected"),
    [
        # multiple choice: the letter, with or without ")"/"." and option text
        ("C", "C", "multiple choice", 1.0),
        ("C) blue", "C", "multiple choice", 1.0),
        ("c.", "C", None, 1.0),
        ("(C)", "C) blue", None, 1.0),
        ("B) green", "C", None, 0.0),
        ("Dog", "D", None, 0.0),  # the original took any leading A-E as an option letter
        ("D", "Dog", None, 0.0),  # and "Dog" as a reference is not option D (it is OCR, as one word)
        ("B", "B yellow", None, 1.0),  # "B yellow" names option B, as in the original
        ("B yellow", "B", None, 1.0),
        ("A dog", "B", None, 0.0),  # English, not option A
        # inferred types, by the original's rules: one word is OCR (an exact answer scores 1)
        ("Paris", "Paris", None, 1.0),
        ("blue", "blue", None, 1.0),
        ("red", "blue", None, 0.0),
        ("STOP THERE NOW", "STOP HERE NOW", None, pytest.approx(2 / 3)),
        # more than 3 decimals: regression, partial credit
        ("3.4558", "3.14159", None, pytest.approx(1 - (3.4558 - 3.14159) / 3.14159)),
        ("Blue", "blue", "multiple choice", 1.0),  # a record that gives the option's text as the answer
        # numerical: equal to 2 decimals, thousands separators, decimal in one side only is wrong
        ("2", "2", "numerical", 1.0),
        ("2 shapes", "2", None, 1.0),
        ("1,000", "1000", None, 1.0),  # the original read the comma as a decimal point
        ("3.14159", "3.14", None, 1.0),
        ("3.146", "3.14", None, 0.0),
        ("2.0", "2", None, 0.0),  # as in the original
        ("2", "2.5", "numerical", 0.0),
        ("two", "2", None, 0.0),
        # OCR: 1 - word error rate
        ("STOP HERE NOW", "STOP HERE NOW", "OCR", 1.0),
        ("STOP THERE NOW", "STOP HERE NOW", "OCR", pytest.approx(2 / 3)),
        ("", "STOP", "OCR", 0.0),
        ("a b c d e f", "x", "OCR", 0.0),  # WER above 1 is clipped
        # regression: 1 - relative error, clipped
        ("9", "10", "regression", pytest.approx(0.9)),
        ("30", "10", "regression", 0.0),
        ("0", "0", "regression", 1.0),  # the original gave 0 here
        # free-form: mean of ROUGE-1/2/L F
        ("a red circle", "a red circle", "free-form", 1.0),
        ("nothing alike", "a red circle", "free-form", 0.0),
    ],
)
def test_score_answer_per_type(prediction, reference, kind, expected):
    assert score_answer(prediction, reference, kind) == expected


def test_free_form_partial_overlap_is_the_mean_of_rouge_scores():
    # ROUGE-1 F 2/3 (2 of 3 words on each side), ROUGE-2 F 1/2, ROUGE-L F 2/3
    assert score_answer("a red square", "a red circle", "free-form") == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    # Untyped, a short plain reference is OCR (1 - WER: one of three words wrong), as in the original;
    # punctuation makes it free-form.
    assert score_answer("a red square", "a red circle") == pytest.approx(2 / 3)
    assert score_answer("a red square.", "a red circle.") == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_accuracy_reward_reads_the_answer_block_and_the_record_type():
    completions = ["<think>x</think><answer>C) blue</answer>", "no tags C", "<answer>2</answer>", "<answer>9</answer>"]
    samples = [
        sample(),
        sample(),
        {"problem": "How many?", "solution": "<answer>2</answer>", "problem_type": "numerical"},
        {"question": "How far?", "answer": "10", "question_type": "regression"},
    ]
    assert get_reward("accuracy")(completions, samples, RewardContext()) == [1.0, 0.0, 1.0, pytest.approx(0.9)]


# -- format, registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>At 00:03 a blue triangle.</think><answer>C</answer>", 1.0),
        ("<think>a\nb</think>\n\n<answer>C</answer>", 1.0),
        ("  <think>a</think><answer>C</answer>\n", 0.0),  # the original's fullmatch: nothing around
        ("<answer>C</answer><think>a</think>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think><answer>C</answer> extra", 0.0),
        ("<think>a</think><answer>C</answer><answer>D</answer>", 1.0),  # .*? may span tags, as in the original
        ("<think>a<think>b</think><answer>C</answer>", 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert get_reward("format")([completion], [{}], RewardContext()) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("  <think>a\nb</think>\n\n<answer>C</answer>\n", 1.0),
        ("<think>a</think><answer>C</answer><answer>D</answer>", 0.0),
        ("<think>a<think>b</think><answer>C</answer>", 0.0),
    ],
)
def test_strict_format_reward(completion, expected):
    assert get_reward("format")([completion], [{}], RewardContext(strict_format=True)) == [expected]


def test_registry_and_compute_rewards():
    assert {"accuracy", "format", "tar"} <= set(REWARDS)
    with pytest.raises(KeyError, match="known rewards"):
        get_reward("nope")
    completions = ["<think>so C</think><answer>C</answer>", "<answer>A</answer>"]
    result = compute_rewards(["accuracy", "format"], completions, [sample(), sample()], RewardContext())
    assert result == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0]}
