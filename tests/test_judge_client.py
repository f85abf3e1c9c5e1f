"""The TAR judge client against a real local HTTP server (see `judge_server` in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from video_r2.judge import JudgeClient, JudgeUnavailableError, parse_claims, parse_verdict
from video_r2.judge.prompts import consistency_messages, extraction_messages

THINK = "At 00:03 a blue triangle fills the screen, so the answer is C."


def client_for(url: str, **options) -> JudgeClient:
    settings = dict(model="judge", timeout=2.0, retries=0, max_concurrency=16, cache=True, temperature=0.0)
    settings.update(options)
    return JudgeClient(url, **settings)


# -- tolerant parsing (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        '{"00:03": "A blue triangle fills the screen."}',
        'Here are the claims:\n```json\n{"00:03": "A blue triangle fills the screen."}\n```\nDone {sic}.',
        "Sure! {'00:03': 'A blue triangle fills the screen.'} Hope this helps.",
        '<think>I see {"00:99": "x"}? no.</think>{"00:03": "A blue triangle fills the screen."}',
        '[{"00:03": "A blue triangle fills the screen."}]',
    ],
)
def test_parse_claims_reads_json_in_prose_fences_and_single_quotes(reply):
    assert parse_claims(reply) == {"00:03": "A blue triangle fills the screen."}


def test_parse_claims_empty_object_is_an_answer_and_garbage_is_not():
    assert parse_claims("No timestamps here: {}") == {}
    assert parse_claims("I cannot find any timestamps.") is None
    assert parse_claims('{"00:03": "unterminated') is None


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("TRUE\nThe reasoning concludes C.", True),
        ("false\nIt concludes B.", False),
        ("**Verdict: TRUE** - consistent.\nreason", True),
        ("```\nFALSE\n```\nbecause", False),
        ("<think>Is it TRUE? Hmm.</think>\nFALSE\nIt says B.", False),
        ("The reasoning is consistent.\nTRUE", None),  # the verdict must be on the first line
        ("TRUEST answer", True),  # the original reads a first line that starts with TRUE as TRUE
        ("false: it concludes B", False),
        ("Verdict: TRUE, not FALSE", None),  # both words and neither first: undecidable, as in the original
        ("UNTRUE", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_parse_claims_reads_a_null_claim_as_empty():
    assert parse_claims('{"00:03": null, "00:05": "A star."}') == {"00:03": "", "00:05": "A star."}


# -- the prompts follow the original's structure, rules and output format ------------------------


def test_extraction_prompt_asks_for_normalised_keys_as_the_original():
    system, user = extraction_messages("At 16 seconds a dog barks.")
    assert system["role"] == "system" and user["role"] == "user"
    for section in ("Goal:", "Output format (STRICT):", "Content rules:"):
        assert section in system["content"]
    for section in ("STRICT KEYS FORMAT:", "VALUES:", "The text:\nAt 16 seconds a dog barks.\n"):
        assert section in user["content"]
    text = system["content"] + user["content"]
    for rule in ("MM:SS or HH:MM:SS", "leading zeros", '"00:42-00:45"', "single hyphen", "plain seconds",
                 "rounded to the nearest second", '"around 16 seconds" becomes "00:16"', "≤ 10 words",
                 "mentioned more than once becomes a single key", "ascending", "return exactly {}"):
        assert rule in text, rule
    assert user["content"].endswith("At 16 seconds a dog barks.\n")


def test_consistency_prompt_is_an_audit_in_the_original_layout():
    system, user = consistency_messages(" Which shape? ", THINK, "C")
    assert system["role"] == "system" and "auditor" in system["content"]
    assert user["content"].startswith("QUESTION:\nWhich shape?\n\nTHINK (model's internal reasoning):\n" + THINK)
    assert "\n\nANSWER (model's final answer):\nC\n\nTASK:\n1) " in user["content"]
    assert "TRUE or FALSE" in user["content"] and "1-3 sentences" in user["content"]
    empty = consistency_messages("", "", "")[1]["content"]
    assert empty.startswith("QUESTION:\n(none)\n\nTHINK (model's internal reasoning):\n(missing)\n\nANSWER")


def test_prompt_readers_give_the_fields_back():
    from video_r2.judge.prompts import read_consistency_request, read_extraction_request

    tricky = "At 00:03 a star.\n\nANSWER (model's final answer):\nquoted\nThe text:\n"
    assert read_extraction_request(extraction_messages(tricky)) == tricky
    assert read_consistency_request(consistency_messages("Q?", tricky, "C")) == ("Q?", tricky.strip(), "C")
    assert read_extraction_request(consistency_messages("Q?", THINK, "C")) is None
    assert read_consistency_request(extraction_messages(THINK)) is None
    assert read_extraction_request([{"role": "user", "content": "hello"}]) is None


# -- the client over HTTP -----------------------------------------------------------------------


def test_sends_the_shared_prompts_unchanged_and_parses_prose_wrapped_json(judge_server):
    judge_server.reply = lambda messages, n: (200, 'The claims are:\n```json\n{"00:03": "A blue triangle."}\n```', 0)
    client = client_for(judge_server.base_url)

    claims = asyncio.run(client.extract_claims(THINK))
    verdict_reply = "TRUE\nIt concludes C."
    judge_server.reply = lambda messages, n: (200, verdict_reply, 0)
    verdict = asyncio.run(client.check_consistency("Which shape?", THINK, "C"))

    assert claims == {"00:03": "A blue triangle."}
    assert verdict is True
    assert judge_server.requests == [extraction_messages(THINK), consistency_messages("Which shape?", THINK, "C")]


def test_retries_a_500_then_succeeds(judge_server):
    judge_server.reply = lambda messages, n: (500, "overloaded", 0) if n == 0 else (200, "FALSE\nno", 0)
    client = client_for(judge_server.base_url, retries=2)

    assert asyncio.run(client.check_consistency("q", THINK, "B")) is False
    assert len(judge_server.requests) == 2
    assert client.counters()["judge/failures"] == 0


def test_a_500_after_all_retries_is_none_and_counted(judge_server):
    judge_server.reply = lambda messages, n: (503, "down", 0)
    client = client_for(judge_server.base_url, retries=1)

    assert asyncio.run(client.extract_claims(THINK)) is None
    assert len(judge_server.requests) == 2  # the first try and one retry
    assert client.counters()["judge/failures"] == 1


def test_a_request_past_its_deadline_is_none_without_waiting_for_the_server(judge_server):
    judge_server.reply = lambda messages, n: (200, "{}", 3.0)
    client = client_for(judge_server.base_url, timeout=0.3, retries=0)

    start = time.perf_counter()
    claims = asyncio.run(client.extract_claims(THINK))

    assert claims is None
    assert time.perf_counter() - start < 2.0
    assert client.counters()["judge/failures"] == 1


def test_a_judge_that_is_not_running_fails_the_step_with_a_useful_error(closed_port_url):
    client = client_for(closed_port_url, retries=0)
    before = client.counters()

    async def step():
        return await asyncio.gather(*(client.extract_claims(f"At 00:0{i} a thing.") for i in range(4)))

    assert client.run(step()) == [None] * 4
    with pytest.raises(JudgeUnavailableError) as error:
        client.check_failure_rate(since=before)
    root = closed_port_url.removesuffix("/v1")
    assert closed_port_url in str(error.value)
    assert f"curl {root}/health" in str(error.value)
    client.close()


def test_failures_below_the_limit_do_not_raise(judge_server):
    judge_server.reply = lambda messages, n: (400, "bad", 0) if "00:00" in json.dumps(messages) else (200, "{}", 0)
    client = client_for(judge_server.base_url, max_failure_fraction=0.5)
    before = client.counters()

    async def step():
        return await asyncio.gather(*(client.extract_claims(f"At 00:0{i} a thing.") for i in range(4)))

    assert asyncio.run(step()) == [None, {}, {}, {}]
    client.check_failure_rate(since=before)  # 1 of 4 failed: under the limit
    assert client.counters()["judge/failures"] == 1


def test_concurrency_is_bounded_and_calls_overlap(judge_server):
    judge_server.reply = lambda messages, n: (200, "{}", 0.1)
    client = client_for(judge_server.base_url, max_concurrency=4)

    async def step():
        return await asyncio.gather(*(client.extract_claims(f"At 00:{i:02d} thing {i}.") for i in range(12)))

    start = time.perf_counter()
    assert client.run(step()) == [{}] * 12
    elapsed = time.perf_counter() - start

    assert judge_server.max_in_flight == 4
    assert elapsed < 0.9  # 3 waves of 0.1 s, not 12 calls one after another (1.2 s)
    client.close()


def test_identical_prompts_are_judged_once_in_flight_and_from_the_cache(judge_server):
    judge_server.reply = lambda messages, n: (200, '{"00:03": "A blue triangle."}', 0.1)
    client = client_for(judge_server.base_url)

    async def step():
        return await asyncio.gather(*(client.extract_claims(THINK) for _ in range(5)))

    first = client.run(step())
    second = client.run(step())

    assert first == second == [{"00:03": "A blue triangle."}] * 5
    assert len(judge_server.requests) == 1
    assert client.counters() == {
        "judge/requests": 10, "judge/calls": 1, "judge/cache_hits": 9, "judge/failures": 0, "judge/unparsed": 0,
        "judge/malformed": 0, "judge/auth_failures": 0,
    }
    client.close()


def test_disk_cache_survives_a_new_client_and_is_keyed_by_model(judge_server, tmp_path):
    judge_server.reply = lambda messages, n: (200, "TRUE\nok", 0)
    path = tmp_path / "judge_cache.jsonl"
    asyncio.run(client_for(judge_server.base_url, cache=path).check_consistency("q", THINK, "C"))

    again = client_for(judge_server.base_url, cache=path)
    assert asyncio.run(again.check_consistency("q", THINK, "C")) is True
    assert len(judge_server.requests) == 1
    assert again.counters()["judge/cache_hits"] == 1

    other_model = client_for(judge_server.base_url, cache=path, model="another-judge")
    asyncio.run(other_model.check_consistency("q", THINK, "C"))
    assert len(judge_server.requests) == 2


def test_unparseable_replies_are_failures_and_not_cached(judge_server):
    judge_server.reply = lambda messages, n: (200, "I would rather not say.", 0) if n == 0 else (200, "TRUE", 0)
    client = client_for(judge_server.base_url)

    assert asyncio.run(client.check_consistency("q", THINK, "C")) is None
    assert asyncio.run(client.check_consistency("q", THINK, "C")) is True
    assert client.counters()["judge/unparsed"] == 1
    assert len(judge_server.requests) == 2


def test_run_works_from_inside_a_running_event_loop(judge_server):
    judge_server.reply = lambda messages, n: (200, "TRUE", 0)
    client = client_for(judge_server.base_url)

    async def training_code_inside_a_loop():
        return client.run(client.check_consistency("q", THINK, "C"))  # asyncio.run would refuse here

    assert asyncio.run(training_code_inside_a_loop()) is True
    client.close()


def test_from_env_reads_the_original_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_API_BASE", "http://judge-host:9000/v1/")
    monkeypatch.setenv("SERVED_MODEL", "Qwen2.5-72B-Instruct")
    monkeypatch.setenv("OPENAI_API_KEY", "secret")

    client = JudgeClient.from_env(max_concurrency=32)

    assert (client.base_url, client.model, client.api_key) == ("http://judge-host:9000/v1", "Qwen2.5-72B-Instruct", "secret")
    assert client.max_concurrency == 32
    assert "curl http://judge-host:9000/health" in client.health_hint


def test_a_copy_of_a_used_client_works_on_its_own(judge_server):
    import copy

    judge_server.reply = lambda messages, n: (200, "TRUE", 0)
    client = client_for(judge_server.base_url)
    assert client.run(client.check_consistency("q", THINK, "C")) is True

    twin = copy.deepcopy(client)  # what ddp_spawn's pickling and Lightning's hparam copies do
    assert twin.run(twin.check_consistency("q", THINK, "B")) is True
    assert twin.counters()["judge/calls"] == 2 and len(judge_server.requests) == 2
    client.close()
    twin.close()


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",  # a proxy's page with status 200
        {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop"}]},  # no message
        {"id": "x", "object": "chat.completion", "choices": []},
        {"unexpected": "shape"},
    ],
)
def test_a_reply_that_is_not_a_chat_completion_is_a_counted_failure_naming_the_url(judge_server, body):
    judge_server.reply = lambda messages, n: (200, body, 0)
    client = client_for(judge_server.base_url, retries=0)
    before = client.counters()

    assert asyncio.run(client.extract_claims(THINK)) is None  # no crash deep inside the reward
    assert client.counters()["judge/failures"] == 1
    with pytest.raises(JudgeUnavailableError) as error:
        client.check_failure_rate(since=before)
    assert judge_server.base_url in str(error.value)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_reported_as_an_authentication_error(judge_server, status):
    judge_server.reply = lambda messages, n: (status, "invalid api key", 0)
    client = client_for(judge_server.base_url, retries=0)
    before = client.counters()

    assert asyncio.run(client.check_consistency("q", THINK, "B")) is None
    with pytest.raises(JudgeUnavailableError, match="refused authentication .*OPENAI_API_KEY") as error:
        client.check_failure_rate(since=before)
    assert "health" not in str(error.value)  # /health needs no key: checking it would not help


def test_by_default_the_judge_samples_at_the_servers_temperature_uncached_as_the_original(judge_server):
    """The original sends no temperature; a deterministic, cached judge is our opt-in (temperature 0)."""
    judge_server.reply = lambda messages, n: (200, "TRUE", 0)
    plain = JudgeClient(judge_server.base_url, "judge", retries=0)
    for _ in range(2):
        assert asyncio.run(plain.check_consistency("q", THINK, "C")) is True
    assert len(judge_server.requests) == 2 and "temperature" not in judge_server.bodies[0]  # asked twice
    deterministic = JudgeClient(judge_server.base_url, "judge", retries=0, temperature=0.0, cache=True)
    for _ in range(2):
        asyncio.run(deterministic.check_consistency("q", THINK, "C"))
    assert len(judge_server.requests) == 3 and judge_server.bodies[2]["temperature"] == 0.0
