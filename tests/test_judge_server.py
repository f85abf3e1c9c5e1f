"""The judge server (`serve/judge_app.py`): the rules judge as functions, then the real server as a subprocess
on a free port, spoken to with the `openai` client exactly as training (or a vLLM user) would.

One rules server (with an API key) is shared by the module; the SIGTERM test and the hf backend start their
own. The hf test uses the session's tiny `make-demo` checkpoint (`tiny_demo` in conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from judge_process import Server, start_server, stop_server  # noqa: F401

from video_r2.judge_prompts import consistency_messages, extraction_messages
from video_r2.judge_server import (
    UNSUPPORTED_REPLY,
    extract_claims,
    judge_consistency,
    rules_reply,
    seconds_to_clock,
)

APP = Path(__file__).resolve().parents[1] / "serve" / "judge_app.py"
MODEL = "video-r2-judge"
KEY = "test-key"
MAX_REQUEST_BYTES = 64_000
QUESTION = "What fills the screen at 00:03?\nA) red circle\nB) green square\nC) blue triangle\nD) yellow star"


# ------------------------------------------------------------------------------------------------
# the rules judge, as pure functions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "think, expected",
    [
        ("At 00:03 a blue triangle fills the screen, so the answer is C.", {"00:03": "a blue triangle fills the screen"}),
        ("The blue triangle first appears at 00:02, so the answer is 2.", {"00:02": "The blue triangle first appears"}),
        ("The man opens the door at 1:02:03.", {"1:02:03": "The man opens the door"}),
        ("From 00:10 to 00:15 the man runs.", {"00:10-00:15": "the man runs"}),
        ("A red circle is shown (00:00-00:02).", {"00:00-00:02": "A red circle is shown"}),
        ("00:02–00:05: a blue triangle fills the screen.", {"00:02-00:05": "a blue triangle fills the screen"}),
        ("A dog barks 00:04 — 00:06.", {"00:04-00:06": "A dog barks"}),
        ("Between 00:20 and 00:25 a car passes.", {"00:20-00:25": "a car passes"}),
        ("At 16 seconds the screen goes dark.", {"00:16": "the screen goes dark"}),
        ("Between 10 and 15 seconds music plays.", {"00:10-00:15": "music plays"}),
        ("Around the 1:02 mark a dog barks.", {"1:02": "a dog barks"}),
        ("A blue triangle, at 00:03, fills the screen.", {"00:03": "A blue triangle fills the screen"}),
        (
            "A red circle appears at 00:01 and a blue triangle at 00:04. Then, at 00:06, a star.",
            {"00:01": "A red circle appears", "00:04": "a blue triangle", "00:06": "a star"},
        ),
        ("The clip lasts 16 seconds and is 16:9. No time here.", {}),
    ],
)
def test_extract_claims_finds_each_time_form_with_its_clause(think, expected):
    assert extract_claims(think) == expected


def test_seconds_to_clock():
    assert [seconds_to_clock(s) for s in (16, 75.5, 3725)] == ["00:16", "01:15.5", "01:02:05"]


@pytest.mark.parametrize(
    "think, answer, verdict",
    [
        ("At 00:03 a blue triangle fills the screen, so the answer is C.", "C", True),
        ("At 00:03 a blue triangle fills the screen, so the answer is C.", "A", False),
        ("The blue triangle first appears at 00:02, so the answer is 2.", "2", True),
        ("The blue triangle first appears at 00:02, so the answer is 2.", "3", False),
        ("Option B looks close, but the triangle means option C.", "C", True),  # the last option mentioned
        ("I think it is the blue triangle. Therefore C.", "(C)", True),
        ("The answer is D.", "D. yellow star", True),
        ("It is the blue triangle.", "C", True),  # no letter: the option's text is in the last sentence
        ("It is the blue triangle.", "A", False),
        ("Nothing decides it.", "B", False),
    ],
)
def test_judge_consistency_verdicts(think, answer, verdict):
    consistent, reason = judge_consistency(QUESTION, think, answer)
    assert consistent is verdict and reason


def test_rules_judge_reads_every_synthetic_record():
    """The synthetic dataset's own reasoning: one claim at the stated time, and a TRUE verdict for its answer."""
    import random
    import re

    from video_r2.synthetic import make_record, random_segments

    rng = random.Random(0)
    for _ in range(40):
        record = make_record(rng, "v.mp4", random_segments(rng, 8, 3), numeric_fraction=0.5)
        question = record["conversations"][0]["value"]
        think, answer = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", record["conversations"][1]["value"]).groups()
        ((key, claim),) = extract_claims(think).items()
        assert key in think and "answer" not in claim and claim.lower().endswith(("fills the screen", "starts to fill the screen"))
        assert judge_consistency(question, think, answer)[0] is True
        wrong = "A" if answer == "B" else "B"
        assert judge_consistency(question, think, wrong)[0] is False


def test_rules_reply_answers_the_two_prompts_and_refuses_others():
    assert json.loads(rules_reply(extraction_messages("At 00:03 a star."))) == {"00:03": "a star"}
    assert rules_reply(extraction_messages("No times.")) == "{}"
    assert rules_reply(consistency_messages(QUESTION, "so the answer is C", "C")).startswith("TRUE\n")
    assert rules_reply(consistency_messages(QUESTION, "so the answer is C", "B")).startswith("FALSE\n")
    assert rules_reply([{"role": "user", "content": "Write a poem."}]) == UNSUPPORTED_REPLY


# ------------------------------------------------------------------------------------------------
# the server as a subprocess
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("judge-rules"),
        "--backend", "rules", "--api-key", KEY,
        "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-tokens-limit", "2048",
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(rules_server):
    with openai.OpenAI(base_url=rules_server.base_url, api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def test_startup_log_tells_where_to_point_training(rules_server):
    # The announcement is logged once /health first answers; give the poller a moment after ours.
    deadline = time.monotonic() + 5
    while "judge ready" not in rules_server.log_tail() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = rules_server.log_tail()
    assert f"base_url: {rules_server.base_url}, model: {MODEL}" in log
    assert f"--model.init_args.judge.init_args.base_url {rules_server.base_url}" in log
    assert f"OPENAI_API_BASE={rules_server.base_url} SERVED_MODEL={MODEL}" in log


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_non_streaming_extraction(client):
    think = "At 00:03 a blue triangle fills the screen, and at 16 seconds the screen goes dark."
    response = client.chat.completions.create(model=MODEL, messages=extraction_messages(think), temperature=0, max_tokens=256)
    assert response.model == MODEL
    assert json.loads(response.choices[0].message.content) == {
        "00:03": "a blue triangle fills the screen", "00:16": "the screen goes dark"}
    assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens > 0


def test_n_choices_and_content_parts(client):
    text = extraction_messages("At 00:03 a star.")[0]["content"]
    parts = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    response = client.chat.completions.create(model=MODEL, messages=parts, n=2)
    assert [c.message.content for c in response.choices] == ['{"00:03": "a star"}'] * 2


def test_streaming_consistency(client):
    chunks = client.chat.completions.create(
        model=MODEL, messages=consistency_messages(QUESTION, "so the answer is C.", "A"), stream=True, max_tokens=64)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("FALSE\n") and "A" in text


def test_max_tokens_cuts_the_reply(client):
    think = "At 00:01 a red circle fills the screen. At 00:03 a blue triangle fills the screen."
    response = client.chat.completions.create(model=MODEL, messages=extraction_messages(think), max_tokens=3)
    assert len(response.choices[0].message.content.split()) == 3
    assert response.usage.completion_tokens == 3


def test_other_prompts_get_a_clear_unsupported_reply(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}])
    assert response.choices[0].message.content.startswith("unsupported by the rules backend")


def test_api_key_is_required_except_for_health(rules_server):
    assert httpx.get(f"{rules_server.root}/health").status_code == 200
    for key in ("wrong-key", "EMPTY"):
        with openai.OpenAI(base_url=rules_server.base_url, api_key=key, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model=MODEL, messages=extraction_messages("At 00:01 x."))
    no_header = httpx.post(f"{rules_server.base_url}/chat/completions", json={"model": MODEL, "messages": []})
    assert no_header.status_code == 401


def test_64_concurrent_requests_are_all_answered(rules_server):
    async def ask_all():
        async with openai.AsyncOpenAI(base_url=rules_server.base_url, api_key=KEY, max_retries=0, timeout=60) as c:
            calls = [
                c.chat.completions.create(model=MODEL, messages=extraction_messages(f"At 00:{i:02d} shape {i} appears."))
                for i in range(64)
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(ask_all())
    assert [json.loads(r.choices[0].message.content) for r in replies] == [
        {f"00:{i:02d}": f"shape {i} appears"} for i in range(64)]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(rules_server, client):
    url, headers = f"{rules_server.base_url}/chat/completions", {"Authorization": f"Bearer {KEY}"}
    good = {"model": MODEL, "messages": extraction_messages("At 00:03 a star.")}

    def post(**kwargs) -> httpx.Response:
        return httpx.post(url, headers={**headers, **kwargs.pop("headers", {})}, timeout=30, **kwargs)

    refused = {
        "not JSON": post(content=b"{not json", headers={"content-type": "application/json"}),
        "no messages": post(json={"model": MODEL}),
        "messages not a list": post(json={"model": MODEL, "messages": "hi"}),
        "empty messages": post(json={"model": MODEL, "messages": []}),
        "absurd max_tokens": post(json={**good, "max_tokens": 10**9}),
        "negative max_tokens": post(json={**good, "max_tokens": -1}),
        "absurd n": post(json={**good, "n": 10_000}),
        "bad temperature": post(json={**good, "temperature": 99}),
        "unknown model": post(json={**good, "model": "gpt-9"}),
        "oversized": post(json={**good, "messages": extraction_messages("x" * (2 * MAX_REQUEST_BYTES))}),
    }
    statuses = {name: r.status_code for name, r in refused.items()}
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert statuses["oversized"] == 413 and statuses["unknown model"] == 404
    assert "max_tokens" in refused["absurd max_tokens"].json()["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=good["messages"], max_tokens=10**6)
    assert post(json=good).json()["choices"][0]["message"]["content"] == '{"00:03": "a star"}'
    assert json.loads(client.chat.completions.create(**good).choices[0].message.content) == {"00:03": "a star"}


def test_judge_client_reads_claims_and_verdicts_from_the_rules_server(rules_server):
    from video_r2.judge import JudgeClient

    think = (
        "The video opens on a red circle (00:00-00:02). At 00:03 a blue triangle fills the screen, and around "
        "the 1:02 mark a green square appears. At 16 seconds the screen goes dark. From 1:02:03 to 1:02:05 a "
        "yellow star spins, so the answer is C."
    )
    judge = JudgeClient(base_url=rules_server.base_url, model=MODEL, api_key=KEY, cache=False, retries=0)
    try:
        assert judge.run(judge.extract_claims(think)) == {
            "00:00-00:02": "The video opens on a red circle",
            "00:03": "a blue triangle fills the screen",
            "1:02": "a green square appears",
            "00:16": "the screen goes dark",
            "1:02:03-1:02:05": "a yellow star spins",
        }
        assert judge.run(judge.check_consistency(QUESTION, think, "C")) is True
        assert judge.run(judge.check_consistency(QUESTION, think, "B")) is False
        assert judge.counters()["judge/failures"] == 0
    finally:
        judge.close()


def test_tar_through_the_rules_server_scores_right_reasoning_high_and_wrong_low(rules_server):
    """TAR end to end (JudgeClient -> rules server, real MiniLM) on records shaped like the synthetic ones.

    Segments are 10 s long so that TAR's default 2 s buffer cannot reach a neighbouring segment.
    """
    from video_r2.judge import JudgeClient
    from video_r2.rewards import RewardContext, tar_reward

    grounding = {"00:00-00:10": "A red circle fills the screen.", "00:10-00:20": "A blue triangle fills the screen.",
                 "00:20-00:30": "A green square fills the screen."}
    sample = {"question": QUESTION, "answer": "C", "question_type": "multiple choice", "temporal_grounding": grounding}
    completions = [
        "<think>At 00:15 a blue triangle fills the screen, so the answer is C.</think><answer>C</answer>",
        "<think>At 00:15 a red circle fills the screen, so the answer is A.</think><answer>A</answer>",  # wrong claim
        "<think>At 00:15 a blue triangle fills the screen, so the answer is C.</think><answer>A</answer>",  # gate
        "<think>At 00:26 a blue triangle fills the screen, so the answer is C.</think><answer>C</answer>",  # wrong time
    ]
    judge = JudgeClient(base_url=rules_server.base_url, model=MODEL, api_key=KEY, cache=False, retries=0)
    try:
        scores = tar_reward(completions, [sample] * len(completions), RewardContext(judge=judge))
    finally:
        judge.close()
    assert scores == [1.0, 0.0, 0.0, 0.0]


def test_sigterm_shuts_down_cleanly_with_batching(tmp_path):
    server = start_server(tmp_path, "--backend", "rules", "--max-batch-size", "4")
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "LitServe runs its inference and API workers as child processes"

    async def ask_four():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=30) as c:
            return await asyncio.gather(*(
                c.chat.completions.create(model=MODEL, messages=extraction_messages(f"At 00:0{i} a star.")) for i in range(4)))

    try:
        replies = asyncio.run(ask_four())
        assert [r.choices[0].message.content for r in replies] == [f'{{"00:0{i}": "a star"}}' for i in range(4)]
    finally:
        started = time.monotonic()
        returncode = stop_server(server)
    assert returncode == 0, server.log_tail()
    assert time.monotonic() - started < 20
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert "judge stopped" in server.log_tail()


def test_hf_backend_answers_with_the_tiny_checkpoint(tiny_demo, tmp_path):
    server = start_server(tmp_path, "--backend", "hf", "--model", str(tiny_demo / "model"), "--max-batch-size", "2")
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60) as c:
            assert [m.id for m in c.models.list()] == [MODEL]
            response = c.chat.completions.create(
                model=MODEL, messages=extraction_messages("At 00:03 a blue triangle."), temperature=0, max_tokens=6)
            assert isinstance(response.choices[0].message.content, str)
            assert 1 <= response.usage.completion_tokens <= 6 and response.usage.prompt_tokens > 20
            again = c.chat.completions.create(
                model=MODEL, messages=extraction_messages("At 00:03 a blue triangle."), temperature=0, max_tokens=6)
            assert again.choices[0].message.content == response.choices[0].message.content  # greedy is repeatable
            chunks = c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=1.0, max_tokens=4, stream=True)
            assert isinstance("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), str)

        async def two_at_once():  # one left-padded batch of two prompts of different lengths
            async with openai.AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60) as c:
                return await asyncio.gather(*(
                    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=3,
                                              temperature=0)
                    for text in ("hi", "a much longer prompt that needs padding on the left")))

        assert all(r.usage.completion_tokens <= 3 for r in asyncio.run(two_at_once()))
    finally:
        assert stop_server(server) == 0, server.log_tail()
