"""vLLM as GRPO's rollout engine: one in-process engine per rank, colocated with the policy.

This is TRL's ``vllm_mode="colocate"``: every rank holds its own engine beside its copy (or shard) of the
policy, samples its own share of the rollout with it, and after every optimizer step receives the current
weights. What differs from HF ``generate`` (`video_r2.grpo.rollout.sample_completions`) and what does not:

* **Same inputs.** The engine is fed the batch's own prompt token ids (the video placeholders already
  expanded by our processor) and the frames our data pipeline decoded and stamped, with their real
  timing (`VideoMetadata`: fps, frame indices, ``do_sample_frames=False``), so it sees what the policy sees.
* **Same outputs.** Each prompt is one request with ``n = G``; completion ``j`` of prompt ``b`` is row
  ``b * G + j``. Completions stop at the same EOS ids, the vision special tokens are banned, tokens after
  the first EOS become padding and `completion_mask` is applied exactly as on the HF path: a `Rollout`
  built here is indistinguishable in layout from one built there.
* **Weights.** `push_weights` sends the policy's weights under their HF names with vLLM's
  ``reload_weights`` (the CPU backend repacks its linear weights, so ``model.load_weights`` does not work
  there), LoRA merged on the fly (``W + scale * B @ A``, DoRA's magnitude applied; the policy is never
  modified), gathered one layer at a time under FSDP1 and FSDP2 so no rank ever holds the whole model
  (`video_r2.grpo.weights`). After a push
  the encoder and prefix caches are reset: their entries were computed with the old weights (a stale
  encoder cache entry even kills the engine on the next video request).
* **Log-probs.** The engine returns the log-probs of the tokens it sampled (``SamplingParams(logprobs=0)``
  with ``logprobs_mode="processed_logprobs"``: after temperature, as the policy's). They are *not* used by the
  loss (the policy recomputes its own ``old_logps``, as with HF); `logp_gap` measures how far they are
  from the policy's, and GRPOModule logs it every step (``train/vllm/logp_gap_mean`` / ``_max``). They are
  those of the sampling distribution, so the banned vision tokens' share (and top-k / top-p, when on) shows
  in the gap. Measured on the CPU (tiny model): fixed completions agree to ~5e-7 nats on text; on video up
  to ~1e-2, because transformers 5 starts the text after a video at ``start + max(h, w) / merge`` on the
  3-D rope while vLLM (like the original Qwen2.5-VL code) starts it after the video's largest position; with
  vLLM's positions fed to the HF model the two agree to ~5e-7 there too.

Environment: the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); on the CPU its KV
cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (``rollout.vllm_kv_cache_gb``). Install: ``pip install
video-r2[vllm]`` (CUDA), or ``scripts/setup_vllm.sh`` for the CPU test environment.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from video_r2.grpo.config import RolloutArgs
from video_r2.grpo.rollout import PromptVisuals, encode_visuals
from video_r2.grpo.types import Rollout, completion_mask
from video_r2.grpo.weights import hf_weights

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (``pip install video-r2[vllm]``, or the CPU venv of setup_vllm.sh)."""
    return importlib.util.find_spec("vllm") is not None


def _require_vllm() -> None:
    if not vllm_available():
        raise ImportError(
            "rollout.rollout_engine='vllm' needs vLLM, which is not installed here: pip install 'video-r2[vllm]' "
            "on a CUDA machine, or scripts/setup_vllm.sh for the CPU test environment (.venv-vllm)"
        )


class VLLMEngine:
    """One in-process vLLM engine: sampling GRPO rollouts and receiving the policy's weights.

    Args:
        model_path: the checkpoint the engine starts from (the policy's ``backbone.name_or_path``); the
            first `push_weights(full=True)` makes it equal to the policy, whatever was loaded since.
        args: the rollout settings (sampling and the ``vllm_*`` knobs).
        eos_token_ids, pad_token_id, suppress_tokens: as for `sample_completions`.
        dtype: the engine's weight dtype (``args.vllm_dtype == "auto"``: this one).
        seed: the engine's own seed (each request also carries its own, see `sample`).
    """

    def __init__(
        self,
        model_path: str,
        args: RolloutArgs,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        suppress_tokens: Sequence[int],
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        _require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(args.vllm_kv_cache_gb))))
        from vllm import LLM

        self.args = args
        self.eos_token_ids, self.pad_token_id = list(eos_token_ids), pad_token_id
        self.suppress_tokens = list(suppress_tokens)
        self.sleeping = False
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            dtype=args.vllm_dtype if args.vllm_dtype != "auto" else str(dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=args.vllm_max_model_len or max_model_len,
            logprobs_mode="processed_logprobs",  # after temperature: the distribution the policy's log-probs use
            limit_mm_per_prompt={"image": 0, "video": 1},
            enforce_eager=on_cpu,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # One engine per rank inside the trainer's own processes (TRL's colocate mode): vLLM joins the
            # process group that is already there instead of starting its own.
            kwargs["distributed_executor_backend"] = "external_launcher"
            rank = torch.distributed.get_rank()  # it reads torchrun's variables; Lightning's launcher sets fewer
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(rank % max(1, torch.cuda.device_count())) if not on_cpu else "0")
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
            kwargs["enable_sleep_mode"] = args.vllm_sleep
        elif args.vllm_sleep:
            log.warning("rollout.vllm_sleep is ignored on the CPU (vLLM's sleep mode needs CUDA)")
        start = time.perf_counter()
        self.llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
        log.info("vLLM engine for %s ready in %.1f s", model_path, time.perf_counter() - start)

    @classmethod
    def for_module(cls, module) -> "VLLMEngine":
        """The engine of a `GRPOModule` (its checkpoint, sampling settings, token ids and seed)."""
        r = module.rollout_args
        dtype = next(module.model.parameters()).dtype
        engine = cls(module.backbone.name_or_path, r,
                     eos_token_ids=module.eos_token_ids, pad_token_id=module.pad_token_id,
                     suppress_tokens=module.suppressed_tokens, dtype=dtype,
                     seed=(int(r.seed or 0) + module.global_rank) % 2**31)  # numpy seeds are 32-bit
        engine.push_weights(module.model, full=True)  # the policy may differ from the checkpoint (resume, LoRA)
        return engine

    # ---- sampling ----------------------------------------------------------------------------------

    def sampling_params(self, num_generations: int, seed: int | None, **overrides: Any):
        from vllm import SamplingParams

        a = self.args
        params = dict(
            n=num_generations, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k or 0,
            repetition_penalty=a.repetition_penalty, max_tokens=a.max_completion_length,
            stop_token_ids=self.eos_token_ids, logprobs=0, seed=seed, detokenize=False,
            logit_bias={t: -100.0 for t in self.suppress_tokens} or None,  # vision tokens are never sampled
        )
        params.update(overrides)
        return SamplingParams(**params)

    def requests(self, prompt: Mapping[str, Tensor], samples: Sequence[Mapping] | None) -> list[dict]:
        """One vLLM prompt per batch row: its unpadded token ids and, for a video prompt, our frames."""
        if prompt.get("pixel_values") is not None:
            raise NotImplementedError("rollout_engine='vllm' takes video and text prompts; this batch has images")
        has_video = prompt.get("pixel_values_videos") is not None
        types = prompt.get("mm_token_type_ids")
        out = []
        for b, (ids, keep) in enumerate(zip(prompt["input_ids"], prompt["attention_mask"])):
            keep = keep.bool()
            # vLLM expands each video placeholder itself: hand it one token per video, as the chat template wrote it
            row_types = None if types is None else types[b][keep]
            request: dict[str, Any] = {"prompt_token_ids": collapse_runs(ids[keep], row_types)}
            videos = (samples[b].get("videos") if samples is not None else None) or []
            if has_video and not videos:
                raise ValueError(
                    "rollout_engine='vllm' needs the decoded frames of each prompt (batch['samples'][i]['videos'] "
                    "and ['video_metadata'], which VideoR2Dataset(stage='grpo') provides); this batch has none"
                )
            if videos:
                metadata = samples[b]["video_metadata"]
                request["multi_modal_data"] = {"video": [vllm_video(v, m) for v, m in zip(videos, metadata)]}
                request["mm_processor_kwargs"] = {"do_resize": False}  # sized by our budget already, as the policy's
            out.append(request)
        return out

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        prompt: Mapping[str, Tensor],
        samples: Sequence[Mapping] | None,
        num_generations: int,
        *,
        seed: int | None = None,
        mask_truncated: bool = False,
        **overrides: Any,
    ) -> tuple[Rollout, PromptVisuals, Tensor]:
        """G completions for each of the B prompts, in `sample_completions`' layout.

        Returns the rollout, the policy's vision features of the prompts (for the log-prob passes that
        follow, as on the HF path) and the engine's log-probs ``[N, L]`` of the sampled tokens (0 on padding).
        ``overrides`` replace sampling settings (``temperature=0`` for greedy).
        """
        G = num_generations
        self.wake_up()
        requests = self.requests(prompt, samples)
        # vLLM seeds completion j of a request with seed + j: requests b step by G so no two rows share a stream
        params = [self.sampling_params(G, None if seed is None else (seed + b * G) % 2**62, **overrides)
                  for b in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.sleep()
        for b, o in enumerate(outputs):
            if len(o.prompt_token_ids) != int(prompt["attention_mask"][b].sum()):
                raise RuntimeError(
                    f"vLLM expanded prompt {b} to {len(o.prompt_token_ids)} tokens, the policy's has "
                    f"{int(prompt['attention_mask'][b].sum())}: its video processing differs from ours (frame size?)")
        tokens = [list(c.token_ids) for o in outputs for c in o.outputs]  # N lists, row b * G + j
        logprobs = [[(lp[t].logprob if lp else 0.0) for t, lp in zip(c.token_ids, c.logprobs or [])]
                    for o in outputs for c in o.outputs]
        L = max(1, max(len(t) for t in tokens))
        completion_ids = torch.full((len(tokens), L), self.pad_token_id, dtype=torch.long)  # [N, L]
        engine_logps = torch.zeros(len(tokens), L, dtype=torch.float32)  # [N, L]
        for i, (t, lp) in enumerate(zip(tokens, logprobs)):
            completion_ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            engine_logps[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        up_to_eos = completion_mask(completion_ids, self.eos_token_ids)  # [N, L]
        completion_ids = completion_ids.masked_fill(up_to_eos == 0, self.pad_token_id)  # [N, L]
        engine_logps = engine_logps * up_to_eos  # [N, L]
        mask = completion_mask(completion_ids, self.eos_token_ids, mask_truncated)  # [N, L]

        device = prompt["input_ids"].device
        visuals = encode_visuals(model, prompt)
        types = prompt.get("mm_token_type_ids")
        rollout = Rollout(
            prompt["input_ids"].repeat_interleave(G, dim=0),  # [N, P]
            prompt["attention_mask"].repeat_interleave(G, dim=0),  # [N, P]
            completion_ids.to(device), mask.to(device), prompt_inputs=dict(prompt),
            mm_token_type_ids=None if types is None else types.repeat_interleave(G, dim=0),  # [N, P]
        )
        return rollout, visuals, engine_logps.to(device)

    @torch.no_grad()
    def completion_logps(self, requests: list[dict], completions: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engine's log-probs of fixed completions (one per request), from vLLM's prompt log-probs.

        Taken at temperature 1 (vLLM computes prompt log-probs from the raw logits); for tests and checks.
        """
        from vllm import SamplingParams

        self.wake_up()
        full = [{**r, "prompt_token_ids": r["prompt_token_ids"] + list(c)} for r, c in zip(requests, completions)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(full, params, use_tqdm=False)
        self.sleep()
        out = []
        for c, o in zip(completions, outputs):
            P = len(o.prompt_token_ids) - len(c)  # the prompt as vLLM expanded its video placeholders
            rows = o.prompt_logprobs[P:]  # one {token: Logprob} per completion token
            out.append([row[t].logprob for row, t in zip(rows, c)])
        return out

    # ---- weights -----------------------------------------------------------------------------------

    @torch.no_grad()
    def push_weights(self, model: torch.nn.Module, full: bool = False,
                     fsdp_root: torch.nn.Module | None = None) -> int:
        """Send the policy's current weights to the engine; returns how many tensors went.

        ``full=False`` sends only what can have changed (the trainable weights, LoRA layers merged).
        Collective under FSDP1 and FSDP2: every rank calls it, each pushing into its own engine;
        ``fsdp_root`` is FSDP1's root unit when it wraps ``model`` from above (`video_r2.grpo.weights`).
        """
        self.wake_up(tags=["weights"])
        sent = 0

        def stream() -> Iterator[tuple[str, Tensor]]:
            nonlocal sent
            for chunk in hf_weights(model, trainable_only=not full, fsdp_root=fsdp_root):  # gathered when vLLM asks for the next one
                sent += len(chunk)
                yield from chunk

        # One in-process call that consumes the stream: vLLM loads and repacks layer by layer as tensors arrive.
        # A partial push leaves the frozen layers as they are, by design; vLLM would warn about each one each step.
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}")
                 for name in ("inplace", "layerwise")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.WARNING if full else logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": stream(), "is_checkpoint_format": True})
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        self.reset_caches()
        self.wake_up(tags=["kv_cache"])
        return sent

    def reset_caches(self) -> None:
        """Forget what was computed with the old weights: vision encoder outputs and cached prefixes."""
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    # ---- memory (GPU sleep mode) -------------------------------------------------------------------

    def sleep(self) -> None:
        if self.args.vllm_sleep and torch.cuda.is_available() and not self.sleeping:
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped: the update gets the GPU
            self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.sleeping:
            self.llm.wake_up(tags=tags)
            self.sleeping = tags is not None and "kv_cache" not in tags

    def close(self) -> None:
        del self.llm


# ---- inputs ----------------------------------------------------------------------------------------


def vllm_video(frames: Tensor, metadata: Any) -> tuple[Any, dict]:
    """Our frames (uint8 ``[T, C, H, W]``) and their `VideoMetadata` as vLLM's video input.

    ``do_sample_frames=False``: the frames are the sampled ones already; vLLM's processor must not resample.
    """
    get = metadata.get if isinstance(metadata, Mapping) else lambda k, d=None: getattr(metadata, k, d)
    array = frames.permute(0, 2, 3, 1).contiguous().numpy()  # [T, H, W, 3]
    indices = list(get("frames_indices", None) or range(array.shape[0]))
    return array, {
        "fps": float(get("fps")),
        "duration": float(get("duration")),
        "total_num_frames": int(get("total_num_frames")),
        "frames_indices": [int(i) for i in indices],
        "video_backend": "torchcodec",
        "do_sample_frames": False,
    }


def collapse_runs(ids: Tensor, types: Tensor | None) -> list[int]:
    """Token ids ``[P]`` with each run of vision placeholder tokens (``types`` != 0) cut to its first token."""
    if types is None or not bool(types.any()):
        return ids.tolist()
    vision = types != 0  # [P]
    follows = vision & torch.nn.functional.pad(vision, (1, 0))[:-1] & (ids == torch.roll(ids, 1))  # [P]
    return ids[~follows].tolist()


# ---- weights under their HF names, a layer at a time -----------------------------------------------


# ---- the gap between the engine's log-probs and the policy's ---------------------------------------


def logp_gap(engine_logps: Tensor, policy_logps: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max ``|engine - policy|`` over the counted completion tokens ``[N, L]``, in nats."""
    m = mask.bool()
    if not m.any():
        return {"vllm/logp_gap_mean": 0.0, "vllm/logp_gap_max": 0.0}
    gap = (engine_logps.float() - policy_logps.float()).abs()[m]
    return {"vllm/logp_gap_mean": gap.mean().item(), "vllm/logp_gap_max": gap.max().item()}


def importance_weights(policy_logps: Tensor, engine_logps: Tensor, mask: Tensor, cap: float) -> Tensor:
    """TRL's truncated importance sampling: ``min(exp(policy - engine), cap)`` per sampled token ``[N, L]``
    (1 where ``mask`` is 0), detached: the tokens came from the engine, the loss is the policy's."""
    ratio = torch.exp((policy_logps.float() - engine_logps.float()).clamp(max=math.log(cap)))  # [N, L]
    return torch.where(mask.bool(), ratio, torch.ones_like(ratio)).detach()


__all__ = ["VLLMEngine", "vllm_available", "vllm_video", "collapse_runs", "hf_weights", "importance_weights",
           "logp_gap"]
