"""The judge server (`serve/judge_app.py`): the rules judge as functions, then the real server as a subprocess
on a free port, spoken to with the `openai` client exactly as training (or a vLLM user) would.

One rules server (with an API key) is shared by the module; the tests of shutdown (SIGTERM, SIGKILL), of huge
requests and deadlines, and of the hf backend start their own. The hf test uses the session's tiny `make-demo` checkpoint (`tiny_demo` in conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import psutil
import pytest

from judge_process import start_server, stop_server

from video_r2.judge.prompts import consistency_messages, extraction_messages
from video_r2.judge.rules import UNSUPPORTED_REPLY, extract_claims, judge_consistency, rules_reply

MODEL = "video-r2-judge"
KEY = "test-key"
MAX_REQUEST_BYTES = 64_000
MAX_REASONING_CHARS = 20_000
QUESTION = "What fills the screen at 00:03?\nA) red circle\nB) green square\nC) blue triangle\nD) yellow star"


# ------------------------------------------------------------------------------------------------
# the rules judge, as pure functions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "think, expected",
    [
        ("At 00:03 a blue triangle fills the screen, so the answer is C.", {"00:03": "a blue triangle fills the screen"}),
        ("The blue triangle first appears at 00:02, so the answer is 2.", {"00:02": "The blue triangle first appears"}),
        ("The man opens the door at 1:02:03.", {"01:02:03": "The man opens the door"}),
        ("From 00:10 to 00:15 the man runs.", {"00:10-00:15": "the man runs"}),
        ("A red circle is shown (00:00-00:02).", {"00:00-00:02": "A red circle is shown"}),
        ("00:02–00:05: a blue triangle fills the screen.", {"00:02-00:05": "a blue triangle fills the screen"}),
        ("A dog barks 00:04 — 00:06.", {"00:04-00:06": "A dog barks"}),
        ("Between 00:20 and 00:25 a car passes.", {"00:20-00:25": "a car passes"}),
        ("At 16 seconds the screen goes dark.", {"00:16": "the screen goes dark"}),
        ("Between 10 and 15 seconds music plays.", {"00:10-00:15": "music plays"}),
        ("Around the 1:02 mark a dog barks.", {"01:02": "a dog barks"}),
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


# The keys the extraction prompt asks for: zero-padded MM:SS or HH:MM:SS, whole seconds, "A-B" ranges.
NORMALISED = {
    "At 12 seconds a dog barks.": {"00:12": "a dog barks"},
    "Around 16 seconds the screen goes dark.": {"00:16": "the screen goes dark"},
    "At 1:05.6 a bird sings.": {"01:06": "a bird sings"},
    "At 00:03.4 a star appears.": {"00:03": "a star appears"},
    "At 75 seconds the lights go out.": {"01:15": "the lights go out"},
    "At 1:02:03.5 a door opens.": {"01:02:04": "a door opens"},
    "From 0:10.4 to 0:15.6 a man runs.": {"00:10-00:16": "a man runs"},
    "From 59:58 to 1:00:02 a bell rings.": {"59:58-01:00:02": "a bell rings"},
    "From 00:15 to 00:12 it rains.": {"00:12-00:15": "it rains"},  # back to front: put in order
}


@pytest.mark.parametrize("think, expected", NORMALISED.items())
def test_extracted_keys_are_normalised_as_the_prompt_asks(think, expected):
    assert extract_claims(think) == expected


def test_one_time_written_twice_is_one_key_and_keys_follow_the_clock():
    think = "At 0:09 the dog sits. At 00:03 a cat runs. At 3 seconds, a bird sings. At 00:03 a cat runs."
    claims = extract_claims(think)
    assert list(claims) == ["00:03", "00:09"]
    assert claims["00:03"] == "a cat runs; a bird sings"


def test_rules_judge_time_grows_linearly_with_the_reasoning():
    """One long sentence full of times was quadratic before (each mention re-read the text before it)."""
    def reasoning(n: int) -> str:
        return "".join(f"at 00:{i % 60:02d} shape {i} appears, " for i in range(n))

    def best_time(text: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            extract_claims(text)
            times.append(time.perf_counter() - started)
        return min(times)

    small, large = reasoning(1500), reasoning(6000)  # about 40 KB and 160 KB
    assert len(extract_claims(small)) == 60
    ratio = best_time(large) / best_time(small)
    assert ratio < 8, f"4x the input took {ratio:.1f}x the time"


@pytest.mark.parametrize(
    "think",
    [
        "then " * 40_000 + "at 00:03 a star.",  # a clause opened by a long run of filler words
        "At 00:03 x" + " " * 200_000 + "y.",  # a long run of blanks inside a line
        "".join(f"At 00:03 claim {i}. " for i in range(20_000)),  # one key, very many claims
        "9" * 200_000 + " seconds at 1" + "1" * 100_000,  # long digit runs
        "the answer is " * 20_000,
    ],
)
def test_pathological_reasoning_is_parsed_quickly(think):
    started = time.perf_counter()
    extract_claims(think)
    judge_consistency(QUESTION + "\n" * 50_000, think, " " * 50_000 + "C")
    assert time.perf_counter() - started < 3


def test_the_rules_judge_stops_at_its_deadline():
    from video_r2.judge.rules import DeadlineExceeded

    think = "".join(f"at 00:{i % 60:02d} shape {i} appears, " for i in range(20_000))
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        extract_claims(think, deadline=time.monotonic() + 0.05)
    assert time.perf_counter() - started < 1


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
        "--max-reasoning-chars", str(MAX_REASONING_CHARS),
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
    system, user = extraction_messages("At 00:03 a star.")
    parts = [system, {"role": "user", "content": [{"type": "text", "text": user["content"]}]}]
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
        {f"{i // 60:02d}:{i % 60:02d}": f"shape {i} appears"} for i in range(64)]  # "00:60" is 01:00


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


def test_reasoning_over_the_limit_is_refused_before_it_is_parsed(rules_server, client):
    too_long = "At 00:03 a star. " * (MAX_REASONING_CHARS // 17 + 1)
    for messages in (extraction_messages(too_long), consistency_messages(QUESTION, too_long, "C")):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages)
        assert refused.value.status_code == 413
        assert str(MAX_REASONING_CHARS) in str(refused.value) and "--max-reasoning-chars" in str(refused.value)
    just_fits = "At 00:03 a star. " * (MAX_REASONING_CHARS // 17 - 1)
    reply = client.chat.completions.create(model=MODEL, messages=extraction_messages(just_fits))
    assert json.loads(reply.choices[0].message.content) == {"00:03": "a star"}


def test_normalised_keys_come_back_through_the_server(client):
    for think, expected in NORMALISED.items():
        reply = client.chat.completions.create(model=MODEL, messages=extraction_messages(think), temperature=0)
        assert json.loads(reply.choices[0].message.content) == expected


def test_docs_and_openapi_need_the_key(rules_server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        refused = httpx.get(f"{rules_server.root}{path}")
        assert refused.status_code == 401, path
        assert "API key" in refused.json()["error"]["message"]
        assert httpx.get(f"{rules_server.root}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = httpx.get(f"{rules_server.root}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert allowed.status_code == 200 and "/v1/chat/completions" in allowed.json()["paths"]
    assert httpx.get(f"{rules_server.root}/info").status_code == 401


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
            "01:02": "a green square appears",
            "00:16": "the screen goes dark",
            "01:02:03-01:02:05": "a yellow star spins",
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


# ------------------------------------------------------------------------------------------------
# a request too big for the judge cannot wedge it
# ------------------------------------------------------------------------------------------------

BIG_BYTES = 900_000


def big_reasoning(size: int = BIG_BYTES) -> str:
    """One long sentence full of times: the shape that took minutes before parsing was made linear."""
    text = "".join(f"at 00:{i % 60:02d} shape {i} appears, " for i in range(size // 25 + 1))
    return text[:size]


async def _big_and_normal(base_url: str) -> tuple[object, float, object, float]:
    """Send the big request, and a normal one a moment later; (reply or error, seconds) for each."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=30) as c:
        async def timed(messages, delay):
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                result = await c.chat.completions.create(model=MODEL, messages=messages)
            except openai.APIStatusError as e:
                result = e
            return result, time.monotonic() - started

        (big, big_s), (normal, normal_s) = await asyncio.gather(
            timed(extraction_messages(big_reasoning()), 0), timed(extraction_messages("At 00:03 a star."), 0.2))
    return big, big_s, normal, normal_s


@pytest.mark.parametrize("limit_flags", [(), ("--max-reasoning-chars", "2000000")], ids=["refused", "answered"])
def test_a_900_kb_request_is_settled_within_5_s_and_others_are_still_served(tmp_path, limit_flags):
    server = start_server(tmp_path, "--backend", "rules", "--max-request-bytes", "2000000", *limit_flags)
    try:
        big, big_s, normal, normal_s = asyncio.run(_big_and_normal(server.base_url))
        assert big_s < 5, f"the 900 KB request took {big_s:.1f} s"
        if limit_flags:
            # 00:00 .. 00:59, each with hundreds of claims: cut at the default max_tokens, but answered.
            assert big.choices[0].message.content.startswith('{"00:00": "shape 0 appears; shape 60 appears;')
        else:
            assert isinstance(big, openai.APIStatusError) and big.status_code == 413
        assert json.loads(normal.choices[0].message.content) == {"00:03": "a star"}
        assert normal_s < 5
    finally:
        stop_server(server)


def test_a_request_past_the_timeout_gets_504_promptly_and_frees_the_worker(tmp_path):
    server = start_server(tmp_path, "--backend", "rules", "--timeout", "0.3",
                          "--max-request-bytes", "2000000", "--max-reasoning-chars", "2000000")
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=30) as c:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as late:
                c.chat.completions.create(model=MODEL, messages=extraction_messages(big_reasoning()))
            assert late.value.status_code == 504 and "--timeout" in str(late.value)
            assert time.monotonic() - started < 3
            # The worker dropped the big request at its deadline: the next one is answered at once.
            started = time.monotonic()
            reply = c.chat.completions.create(model=MODEL, messages=extraction_messages("At 00:03 a star."))
            assert reply.choices[0].message.content == '{"00:03": "a star"}'
            assert time.monotonic() - started < 1
            # A stream has answered 200 before the text exists: the deadline ends it with an error instead.
            started = time.monotonic()
            with pytest.raises(openai.APIError, match="--timeout"):
                chunks = c.chat.completions.create(model=MODEL, messages=extraction_messages(big_reasoning()),
                                                   stream=True)
                "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert time.monotonic() - started < 3
        assert httpx.get(f"{server.root}/health").status_code == 200
    finally:
        stop_server(server)


WEDGED_SERVER = """
import sys, time
from video_r2.judge.backends import Completion
from video_r2.judge.server import Limits, build_server

class Wedged:  # ignores its deadline, as a long call into C code would
    name = "wedged"
    def setup(self, device):
        pass
    def complete(self, requests):
        time.sleep(3)
        return [Completion("late") for _ in requests]

if __name__ == "__main__":
    port = int(sys.argv[sys.argv.index("--port") + 1])
    build_server(Wedged(), "m", Limits(), timeout=0.5, accelerator="cpu").run(
        host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
"""


def test_health_is_503_while_a_worker_is_busy_past_its_deadline(tmp_path):
    script = tmp_path / "wedged_server.py"
    script.write_text(WEDGED_SERVER)
    server = start_server(tmp_path, script=script)
    try:
        with httpx.Client(base_url=server.root, timeout=30) as http:
            async def ask_and_watch():
                async with httpx.AsyncClient(base_url=server.root, timeout=30) as c:
                    ask = asyncio.create_task(c.post("/v1/chat/completions", json={"messages": [
                        {"role": "user", "content": "hi"}]}))
                    await asyncio.sleep(2.0)  # past the 0.5 s deadline and the 1 s grace, still sleeping
                    during = (await c.get("/health")).status_code
                    return await ask, during

            reply, during = asyncio.run(ask_and_watch())
            assert reply.status_code == 504 and during == 503
            time.sleep(1.5)  # the worker has finished its sleep
            assert http.get("/health").status_code == 200
    finally:
        stop_server(server)


def test_health_reports_a_worker_busy_past_its_deadline():
    from video_r2.judge.watchdog import DeadlineBoard

    board = DeadlineBoard(workers=2)
    assert not board.overdue()
    board.busy(1, time.monotonic() + 60)
    assert not board.overdue()
    board.busy(0, time.monotonic() - 5)
    assert board.overdue()
    board.idle(0)
    assert not board.overdue()


def test_workers_end_when_the_server_is_killed(tmp_path):
    server = start_server(tmp_path, "--backend", "rules")
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert any("inference-worker" in " ".join(p.cmdline()) or p.name() == "python" for p in children)
    server.proc.kill()  # SIGKILL: no handler runs, LitServe cannot stop anything itself
    server.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left behind after SIGKILL: {[(p.pid, p.cmdline()) for p in alive]}"


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
