"""The judge that TAR queries, served over an OpenAI-compatible API (LitServe).

`serve/judge_app.py` is the command; this module holds the pieces, so that tests and benchmarks can import
them without starting anything:

1. the **rules judge**: pure functions that answer the two prompts of `video_r2.judge_prompts` without a
   model (`extract_claims`, `judge_consistency`, `rules_reply`);
2. two **backends** behind one `complete(requests) -> completions` method: `RulesBackend` and
   `HFBackend` (a transformers causal LM with its chat template, batched with left padding);
3. the **LitServe glue**: `JudgeSpec` (OpenAI spec plus `/v1/models`, request limits and the model name
   check) and `JudgeAPI` (decode → predict → encode, and the API-key check).

The server speaks the subset of the OpenAI chat API that `openai` clients and vLLM users expect, so training
can switch between this server and `vllm serve MODEL --port 8011` by changing a URL.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import litserve as ls
from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec

from video_r2.formats import format_clock as seconds_to_clock, question_options  # noqa: F401 (re-exported)
from video_r2.judge_prompts import read_consistency_request, read_extraction_request

logger = logging.getLogger(__name__)

UNSUPPORTED_REPLY = (
    "unsupported by the rules backend: it only answers the two prompts of video_r2.judge_prompts "
    "(timestamped-claim extraction and reasoning/answer consistency). Serve a real model "
    "(--backend hf, or vLLM) for anything else."
)

# ==================================================================================================
# 1. The rules judge
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
# its groups: a/b (clock), sa/sb (seconds).
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
# Extends a mention to the left over "at around the", "(", "[" and to the right over "mark", ")" ...
_PHRASE_LEFT_RE = re.compile(rf"(?:(?:\b(?:{_PREPOSITIONS})\s+(?:the\s+)?)+|[(\[]\s*)$", re.IGNORECASE)
_PHRASE_RIGHT_RE = re.compile(r"^(?:\s*(?:seconds?\s+)?(?:mark|timestamp|time\s*stamp)\b|\s*[)\]])", re.IGNORECASE)

_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])|\s*\n+\s*")
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
    r"^(?:first(?:ly)?|second(?:ly)?|then|next|finally|later|afterwards|after that|subsequently|initially|"
    r"and|but|so|meanwhile|also)\b[\s,]*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TimeMention:
    """A time found in a sentence: its JSON key and the character span of the whole time phrase."""

    key: str
    start: int  # phrase start, prepositions and brackets included
    end: int


def _mention_key(match: re.Match) -> str:
    g = match.groupdict()
    if g["a1"] or g["a2"]:
        return f"{g['a1'] or g['a2']}-{g['b1'] or g['b2']}"
    if g["sa1"] or g["sa2"]:
        return f"{seconds_to_clock(float(g['sa1'] or g['sa2']))}-{seconds_to_clock(float(g['sb1'] or g['sb2']))}"
    if g["a3"]:
        return g["a3"]
    return seconds_to_clock(float(g["sa3"]))


def find_time_mentions(sentence: str) -> list[TimeMention]:
    """Every timestamp or time range in `sentence`, in order, with the span of the phrase that states it."""
    mentions = []
    for match in _MENTION_RE.finditer(sentence):
        start, end = match.span()
        left = _PHRASE_LEFT_RE.search(sentence[:start])
        if left:
            start = left.start()
        right = _PHRASE_RIGHT_RE.match(sentence[end:])
        if right:
            end += right.end()
        mentions.append(TimeMention(_mention_key(match), start, end))
    return mentions


def split_sentences(text: str) -> list[str]:
    """Sentences of a reasoning; a period inside "00:03.5" or "e.g." followed by lowercase does not split."""
    return [s.strip() for s in _SENTENCE_SPLIT_RE.split(text) if s and s.strip()]


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
        and re.match(r"\s*,", sentence[mention.end :]) is not None
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


def _clean_claim(text: str) -> str:
    """Tidy what is left of a clause once the time phrase is cut out of it."""
    text = re.sub(r"\(\s*\)|\[\s*\]", " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,;:.!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = text.strip(" ,;:-–—")
    while True:
        stripped = _LEADING_FILLER_RE.sub("", text, count=1).strip(" ,;:-–—")
        if stripped == text:
            break
        text = stripped
    return text.rstrip(".!?").strip(" ,;:-–—\"'")


def _sentence_claims(sentence: str) -> list[tuple[str, str]]:
    mentions = find_time_mentions(sentence)
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
            pairs.append((m.key, claim))
    return pairs


def extract_claims(think: str) -> dict[str, str]:
    """The `time -> claim` pairs of a reasoning, as the extraction prompt asks for them.

    Keys keep clock times as written ("00:03", "1:02:03"), write ranges as "A-B" whatever the dash or
    wording ("from 00:10 to 00:15", "between 10 and 15 seconds"), and turn "at 16 seconds" into "00:16".
    A time that appears twice gets its claims joined with "; " (a JSON object cannot repeat a key).
    """
    claims: dict[str, str] = {}
    for sentence in split_sentences(think):
        for key, claim in _sentence_claims(sentence):
            if key not in claims:
                claims[key] = claim
            elif claim not in claims[key]:
                claims[key] = f"{claims[key]}; {claim}"
    return claims


# ---- consistency --------------------------------------------------------------------------------

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
    for pattern in _choice_patterns(letters):
        found = [m.group("x") for m in pattern.finditer(think)]
        if found:
            return found[-1]
    return None


def _normalise_text(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def answer_choice(answer: str, options: dict[str, str]) -> tuple[Optional[str], str]:
    """(option letter or number the final answer names, or None; the answer as plain text)."""
    text = re.sub(r"</?answer>", "", answer or "").strip()
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


def judge_consistency(question: str, think: str, answer: str) -> tuple[bool, str]:
    """(does the reasoning's conclusion agree with the final answer?, a one-sentence reason)."""
    options = question_options(question)
    wanted, answer_text = answer_choice(answer, options)
    concluded = concluded_choice(think, "".join(options) or "ABCDEFGH")
    if wanted is not None and concluded is not None:
        if _same_choice(concluded, wanted):
            return True, f"The reasoning concludes {concluded}, which is the final answer."
        return False, f"The reasoning concludes {concluded}, but the final answer is {wanted}."
    # No stated choice on one side: the answer (or the text of the option it names) must appear in the
    # reasoning's last sentence.
    # A bare option letter is no text to look for ("a" is everywhere); its option's text is.
    forms = [options[wanted]] if wanted in options else ([] if wanted and wanted.isalpha() else [answer_text])
    sentences = split_sentences(think)
    last = f" {_normalise_text(sentences[-1])} " if sentences else ""
    if any(_normalise_text(f) and f" {_normalise_text(f)} " in last for f in forms):
        return True, "The reasoning's last sentence states the final answer."
    if not forms:
        return False, "The reasoning does not state which option or number it concludes."
    return False, f"The reasoning's last sentence does not state the final answer ({forms[-1]})."


def rules_reply(messages: list[dict]) -> str:
    """The rules backend's whole reply to a chat: extraction JSON, a TRUE/FALSE verdict, or UNSUPPORTED_REPLY."""
    think = read_extraction_request(messages)
    if think is not None:
        return json.dumps(extract_claims(think), ensure_ascii=False)
    fields = read_consistency_request(messages)
    if fields is not None:
        consistent, reason = judge_consistency(*fields)
        return f"{'TRUE' if consistent else 'FALSE'}\n{reason}"
    return UNSUPPORTED_REPLY


# ==================================================================================================
# 2. Backends
# ==================================================================================================


@dataclass
class GenerationRequest:
    """What a backend needs from one chat completion request."""

    messages: list[dict[str, str]]  # role/content pairs, content flattened to text
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    """One reply, with the token counts the OpenAI `usage` block reports."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


def apply_stop(text: str, stop: list[str]) -> str:
    """Cut `text` at the first stop string, as the OpenAI API does (the stop string itself is dropped)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


class RulesBackend:
    """Deterministic, no model. Temperature does not matter; max_tokens counts whitespace-separated words
    (fewer than a real tokenizer would count, so a limit that suits an LLM judge never cuts a rules reply
    that the LLM would have fitted)."""

    name = "rules"

    def setup(self, device: str) -> None:  # nothing to load
        pass

    def complete(self, requests: list[GenerationRequest]) -> list[Completion]:
        return [self._complete_one(r) for r in requests]

    @staticmethod
    def _complete_one(request: GenerationRequest) -> Completion:
        text = apply_stop(rules_reply(request.messages), request.stop)
        words = list(re.finditer(r"\S+", text))
        if len(words) > request.max_tokens:
            text = text[: words[request.max_tokens - 1].end()]
            words = words[: request.max_tokens]
        prompt_words = sum(len(m["content"].split()) for m in request.messages)
        return Completion(text, prompt_tokens=prompt_words, completion_tokens=len(words))


class HFBackend:
    """A transformers causal LM (or a Qwen2.5-VL used for text only) with its chat template.

    Requests of one batch that share temperature and top_p are generated together with left padding; each is
    cut back to its own max_tokens afterwards.
    """

    name = "hf"

    def __init__(self, model: str, dtype: str = "auto"):
        self.model_id = model
        self.dtype = dtype

    def setup(self, device: str) -> None:
        import torch  # heavy: only the hf backend pays for it
        import transformers

        self.torch = torch
        self.device = device
        self.tokenizer = self._load_tokenizer(transformers)
        self.tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.model_id, dtype=dtype)
        except ValueError:
            # Qwen2.5-VL (and other vision-language models) are not registered as causal LMs in every
            # transformers version; loaded as image-text-to-text they still generate from text alone.
            model = transformers.AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype)
        self.model = model.to(device).eval()
        self.stop_ids = self._stop_token_ids()
        self.suppress_ids = self._vision_token_ids()
        logger.info("hf backend: loaded %s on %s", self.model_id, device)

    def _load_tokenizer(self, transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_id)
        if getattr(tokenizer, "chat_template", None) is None:
            # Some checkpoints keep the chat template with the processor only.
            try:
                processor = transformers.AutoProcessor.from_pretrained(self.model_id)
                tokenizer.chat_template = getattr(processor, "chat_template", None)
            except Exception:  # noqa: BLE001 - no processor: fall back to a plain transcript below
                pass
        return tokenizer

    def _token_ids(self, tokens: list[str]) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in tokens if t in vocab]

    def _stop_token_ids(self) -> list[int]:
        ids = set(self._token_ids(["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"]))
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _vision_token_ids(self) -> list[int]:
        # A text-only judge must never emit vision placeholders: the next forward step would look for
        # image or video features that do not exist.
        return self._token_ids(
            ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat, through the model's chat template when it has one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def complete(self, requests: list[GenerationRequest]) -> list[Completion]:
        results: list[Optional[Completion]] = [None] * len(requests)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.top_p), []).append(i)
        for (temperature, top_p), indices in groups.items():
            batch = [requests[i] for i in indices]
            for i, completion in zip(indices, self._generate(batch, temperature, top_p)):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _generate(self, batch: list[GenerationRequest], temperature: float, top_p: float) -> list[Completion]:
        torch = self.torch
        prompts = [self.render(r.messages) for r in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        greedy = temperature == 0  # OpenAI's temperature 0 means "most likely token", i.e. no sampling
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=max(r.max_tokens for r in batch),
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.tokenizer.pad_token_id,
                suppress_tokens=self.suppress_ids or None,
                **sampling,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
        prompt_lengths = enc["attention_mask"].sum(dim=1).tolist()
        completions = []
        for request, ids, prompt_len in zip(batch, new_tokens, prompt_lengths):
            ids = ids[: request.max_tokens]
            stop_at = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
            ids = ids[:stop_at]
            text = apply_stop(self.tokenizer.decode(ids, skip_special_tokens=True), request.stop)
            completions.append(Completion(text, prompt_tokens=int(prompt_len), completion_tokens=len(ids)))
        return completions


def make_backend(name: str, model: Optional[str] = None, dtype: str = "auto"):
    """The backend called `name` ("rules" or "hf")."""
    if name == "rules":
        return RulesBackend()
    if name == "hf":
        if not model:
            raise ValueError("--backend hf needs --model PATH_OR_HUB_ID")
        return HFBackend(model, dtype=dtype)
    raise ValueError(f"unknown backend {name!r}; choose 'rules' or 'hf'")


# ==================================================================================================
# 3. LitServe: the OpenAI spec with our limits, and the API
# ==================================================================================================


@dataclass
class Limits:
    """What a single request may ask for; anything beyond is refused with a 4xx before it is queued."""

    max_tokens: int = 4096  # the most max_tokens a request may ask for
    default_max_tokens: int = 1024  # used when a request gives none
    max_n: int = 8  # choices per request
    max_messages: int = 256


def _flatten_content(content: Any) -> str:
    """OpenAI message content (a string or a list of parts) as plain text; non-text parts are dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content if getattr(part, "type", None) == "text")


def _error(status: int, message: str, code: str) -> HTTPException:
    # The body mirrors OpenAI's error object, so `openai` clients show the message itself.
    return HTTPException(status, detail={"message": message, "type": "invalid_request_error", "code": code})


class JudgeSpec(OpenAISpec):
    """OpenAISpec plus `GET /v1/models`, the served model name and request limits.

    Requests are checked here, in the API process, so that a bad one is refused with a clear 4xx before it
    reaches the inference worker (where an error would cost a whole batch, or arrive as an error chunk inside
    an already-started 200 stream).
    """

    def __init__(self, served_model_name: str, limits: Limits):
        super().__init__()
        self.served_model_name = served_model_name
        self.limits = limits
        self.created = int(time.time())

    def pre_setup(self, lit_api: "ls.LitAPI"):
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/models/{model_id:path}", self.retrieve_model, ["GET"])

    def _unknown_model(self, name: str) -> HTTPException:
        message = f"The model `{name}` does not exist; this server serves `{self.served_model_name}`."
        return _error(404, message, "model_not_found")

    def _model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "video-r2"}

    async def list_models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, model_id: str) -> JSONResponse:
        if model_id != self.served_model_name:
            raise self._unknown_model(model_id)
        return JSONResponse(self._model_card())

    def check(self, request: ChatCompletionRequest) -> None:
        """Raise a 4xx HTTPException for a request this server will not run."""
        limits = self.limits
        if request.model and request.model != self.served_model_name:
            raise self._unknown_model(request.model)
        if not request.messages:
            raise _error(400, "messages must hold at least one message", "invalid_messages")
        if len(request.messages) > limits.max_messages:
            raise _error(400, f"at most {limits.max_messages} messages per request", "too_many_messages")
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
            message = f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}"
            raise _error(400, message, "invalid_max_tokens")
        if request.n is not None and not 1 <= request.n <= limits.max_n:
            raise _error(400, f"n must be between 1 and {limits.max_n}, got {request.n}", "invalid_n")
        if request.temperature is not None and not 0 <= request.temperature <= 2:
            raise _error(400, f"temperature must be between 0 and 2, got {request.temperature}", "invalid_temperature")
        if request.top_p is not None and not 0 < request.top_p <= 1:
            raise _error(400, f"top_p must be in (0, 1], got {request.top_p}", "invalid_top_p")

    async def chat_completion(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks):
        self.check(request)
        if not request.model:
            request.model = self.served_model_name  # echoed back in the response
        return await super().chat_completion(request, background_tasks)


class JudgeAPI(ls.LitAPI):
    """decode (OpenAI request → GenerationRequest) → predict (backend) → encode (OpenAI message dicts).

    With max_batch_size > 1 LitServe hands `predict` a list and expects one list per yielded step; with 1 it
    hands a single request. Both go through `backend.complete(list)`.
    """

    def __init__(self, backend, spec: JudgeSpec, api_key: Optional[str] = None, **kwargs):
        super().__init__(spec=spec, **kwargs)
        self.backend = backend
        self.limits = spec.limits
        self.api_key = api_key

    def setup(self, device: str) -> None:
        # Runs in the inference worker. Ctrl+C in a terminal reaches the whole process group; the main process
        # then stops this worker itself (SIGTERM), so the worker ignores SIGINT instead of dying mid-request
        # with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.backend.setup(device)

    def authorize(self, request: Request) -> None:
        """FastAPI dependency on every route: the key as `Authorization: Bearer KEY` (what `openai` clients
        send) or `X-API-Key: KEY` (what LitServe clients send). `/health` stays open for load balancers."""
        if not self.api_key or request.url.path == "/health":
            return
        bearer = request.headers.get("authorization", "")
        given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            error = _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_api_key")
            error.headers = {"WWW-Authenticate": "Bearer"}
            raise error

    def decode_request(self, request: ChatCompletionRequest) -> GenerationRequest:
        stop = request.stop or []
        return GenerationRequest(
            messages=[{"role": m.role, "content": _flatten_content(m.content)} for m in request.messages],
            max_tokens=request.max_completion_tokens or request.max_tokens or self.limits.default_max_tokens,
            temperature=0.0 if request.temperature is None else float(request.temperature),
            top_p=1.0 if request.top_p is None else float(request.top_p),
            stop=[stop] if isinstance(stop, str) else list(stop),
        )

    def predict(self, x):
        if isinstance(x, list):  # batched
            yield self.backend.complete(x)
        else:
            yield self.backend.complete([x])[0]

    @staticmethod
    def _message(c: Completion) -> dict:
        return {
            "role": "assistant",
            "content": c.text,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        }

    def encode_response(self, outputs):
        for step in outputs:
            yield [self._message(c) for c in step] if isinstance(step, list) else self._message(step)


class RequestSizeLimit:
    """ASGI middleware: refuses a request body over `max_bytes` with 413, from Content-Length when the client
    sends it (before reading anything) and by counting otherwise."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        error = {"message": f"request body exceeds {self.max_bytes} bytes", "type": "invalid_request_error",
                 "code": "request_too_large"}
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, detail=f"request body exceeds {self.max_bytes} bytes")
            return message

        return await self.app(scope, counting_receive, send)


def _install_error_handlers(app) -> None:
    """Every error as OpenAI's `{"error": {"message": ...}}`, so `openai` clients print the reason; a request
    that does not parse or validate is a 400, as with OpenAI and vLLM (FastAPI's default is a 422)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail), "type": kind, "code": None}
        return JSONResponse({"error": error}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        message = f"malformed request: {problems}"
        error = {"message": message, "type": "invalid_request_error", "code": "invalid_request"}
        return JSONResponse({"error": error}, status_code=400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def build_server(
    backend,
    served_model_name: str,
    limits: Limits,
    api_key: Optional[str] = None,
    max_batch_size: int = 1,
    batch_timeout: float = 0.02,
    workers: int = 1,
    timeout: float = 60.0,
    max_request_bytes: int = 1 << 20,
    accelerator: str = "auto",
) -> ls.LitServer:
    """A LitServer hosting `backend` behind the OpenAI chat API."""
    spec = JudgeSpec(served_model_name, limits)
    api = JudgeAPI(
        backend,
        spec=spec,
        api_key=api_key,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout if max_batch_size > 1 else 0.0,
    )
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers,
        timeout=timeout,
        middlewares=[(RequestSizeLimit, {"max_bytes": max_request_bytes})],
        model_metadata={"served_model_name": served_model_name, "backend": backend.name},
    )
    _install_error_handlers(server.app)
    return server
