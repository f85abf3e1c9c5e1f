"""What answers a judge request: the rules judge or a transformers model, behind one method.

`backend.complete(requests) -> completions` takes a batch of `GenerationRequest`s (each with its
deadline, a `time.monotonic()` value) and returns one `Completion` per request, or raises
`DeadlineExceeded` when it could not finish in time; the server turns that into a 504.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from video_r2.judge.rules import check_deadline, rules_reply

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """What a backend needs from one chat completion request."""

    messages: list[dict[str, str]]  # role/content pairs, content flattened to text
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    deadline: Optional[float] = None  # time.monotonic() by which the reply is due; None: no limit


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
    that the LLM would have fitted). The rules judge checks each request's deadline as it goes."""

    name = "rules"

    def setup(self, device: str) -> None:  # nothing to load
        pass

    def complete(self, requests: list[GenerationRequest]) -> list[Completion]:
        return [self._complete_one(r) for r in requests]

    @staticmethod
    def _complete_one(request: GenerationRequest) -> Completion:
        text = apply_stop(rules_reply(request.messages, request.deadline), request.stop)
        words = list(re.finditer(r"\S+", text))
        if len(words) > request.max_tokens:
            text = text[: words[request.max_tokens - 1].end()]
            words = words[: request.max_tokens]
        prompt_words = sum(len(m["content"].split()) for m in request.messages)
        return Completion(text, prompt_tokens=prompt_words, completion_tokens=len(words))


class HFBackend:
    """A transformers causal LM (or a Qwen2.5-VL used for text only) with its chat template.

    Requests of one batch that share temperature and top_p are generated together with left padding; each is
    cut back to its own max_tokens afterwards. Generation stops at the batch's earliest deadline
    (`generate(max_time=...)`), and a batch that has no time left is not started.
    """

    name = "hf"

    def __init__(self, model: str, dtype: str = "auto"):
        self.model_id = model
        self.dtype = dtype

    def setup(self, device: str) -> None:
        import torch  # heavy: only the hf backend pays for it
        import transformers

        # video_r2.model imports torch, so the rules backend never imports it.
        from video_r2.model import VISION_SPECIAL_TOKENS

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
        # A text-only judge must never emit vision placeholders: the next forward step would look for
        # image or video features that do not exist.
        self.suppress_ids = self._token_ids(list(VISION_SPECIAL_TOKENS))
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
        deadlines = [r.deadline for r in batch if r.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        check_deadline(deadline)
        prompts = [self.render(r.messages) for r in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        greedy = temperature == 0  # OpenAI's temperature 0 means "most likely token", i.e. no sampling
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p)
        if deadline is not None:  # generate stops after the step that crosses it; what it has is returned
            sampling["max_time"] = max(0.0, deadline - time.monotonic())
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
