"""Sampling G completions per prompt with the vision tower run once per prompt.

`sample_completions` is what GRPO's rollout and `video-r2 evaluate` both call, so evaluation samples exactly
the way training does. The vision features of a prompt are computed once (`encode_visuals`) and shared by its
G completions, by the reference pass and, while the vision tower is frozen, by every policy update
(`PromptVisuals.for_rows`): the video is the most expensive input of a step, so it is never encoded twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from video_r2.grpo.types import Rollout, completion_mask
from video_r2.model import VISION_SPECIAL_TOKENS

# modality -> (pixel key, grid key, token type in mm_token_type_ids)
VISUALS = {"image": ("pixel_values", "image_grid_thw", 1), "video": ("pixel_values_videos", "video_grid_thw", 2)}


# ---- vision features: encoded once per prompt, shared by the G completions -------------------------


def visuals_per_row(mm_token_type_ids: Tensor, token_type: int) -> list[int]:
    """How many images (1) or videos (2) each row holds: runs of that token type. ``[B, P] -> B ints``."""
    is_type = mm_token_type_ids == token_type  # [B, P]
    starts = is_type & ~torch.nn.functional.pad(is_type, (1, 0))[:, :-1]  # [B, P]: first token of each run
    return starts.sum(dim=1).tolist()


@dataclass
class PromptVisuals:
    """Per-prompt vision features and the grid inputs the 3-D rope needs, to be spread over N rows."""

    features: dict[str, list[list[Tensor]]]  # modality -> per prompt -> its visuals' [tokens, hidden] features
    grids: dict[str, list[Tensor]]  # modality -> per prompt -> [its visuals, 3]
    seconds: list[Tensor]  # per prompt -> [its videos] second_per_grid_ts

    def for_rows(self, rows: range, G: int) -> dict[str, Any]:
        """Model kwargs for completion rows `rows` (row i belongs to prompt i // G)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        prompts = [i // G for i in rows]
        kwargs: dict[str, Any] = {"mm_encoder_outputs": {}}
        for modality, per_prompt in self.features.items():
            pixel_key, grid_key, _ = VISUALS[modality]
            pooled = tuple(f for p in prompts for f in per_prompt[p])
            if not pooled:
                continue
            kwargs["mm_encoder_outputs"][modality] = BaseModelOutputWithPooling(pooler_output=pooled)
            kwargs[grid_key] = torch.cat([self.grids[modality][p] for p in prompts])  # [visuals, 3]
            if modality == "video":
                kwargs["second_per_grid_ts"] = torch.cat([self.seconds[p] for p in prompts])  # [videos]
        return kwargs


def encode_visuals(model: torch.nn.Module, prompt: Mapping[str, Tensor]) -> PromptVisuals:
    """Run the vision tower once over the batch's prompts (``[B]`` prompts, not ``[N]`` completions)."""
    B = prompt["input_ids"].shape[0]
    features: dict[str, list[list[Tensor]]] = {}
    grids: dict[str, list[Tensor]] = {}
    seconds: list[Tensor] = [torch.zeros(0)] * B
    for modality, (pixel_key, grid_key, token_type) in VISUALS.items():
        if prompt.get(pixel_key) is None:
            continue
        grid = prompt[grid_key]  # [visuals, 3]
        encode = model.get_video_features if modality == "video" else model.get_image_features
        pooled = list(encode(prompt[pixel_key], grid, return_dict=True).pooler_output)  # visuals x [tok, H]
        counts = visuals_per_row(prompt["mm_token_type_ids"], token_type)  # B ints
        bounds = [0, *accumulate(counts)]  # prompt b's visuals are pooled[bounds[b]:bounds[b + 1]]
        features[modality] = [pooled[bounds[b]:bounds[b + 1]] for b in range(B)]
        grids[modality] = [grid[bounds[b]:bounds[b + 1]] for b in range(B)]
        if modality == "video":
            sec = prompt["second_per_grid_ts"]  # [videos]
            seconds = [sec[bounds[b]:bounds[b + 1]] for b in range(B)]
    return PromptVisuals(features, grids, seconds)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt: Mapping[str, Tensor],
    num_generations: int,
    *,
    eos_token_ids: list[int],
    pad_token_id: int,
    suppress_tokens: list[int],
    mask_truncated: bool = False,
    **generate_kwargs: Any,
) -> tuple[Rollout, PromptVisuals]:
    """G completions for each of the B prompts, the vision tower run once per prompt (not per completion).

    ``prompt``: the left-padded prompt tensors of a GRPO batch. ``generate_kwargs`` go to HF ``generate``
    (sampling settings, ``max_new_tokens``, ``synced_gpus``). Vision placeholder tokens are suppressed: one
    sampled into a completion would break every later forward. Tokens after the first EOS become padding.
    """
    G = num_generations
    visuals = encode_visuals(model, prompt)
    N = prompt["input_ids"].shape[0] * G
    prompt_ids = prompt["input_ids"].repeat_interleave(G, dim=0)  # [N, P]
    prompt_mask = prompt["attention_mask"].repeat_interleave(G, dim=0)  # [N, P]
    extra = visuals.for_rows(range(N), G)
    if "mm_token_type_ids" in prompt:  # transformers 5 drops the 3-D rope without it
        extra["mm_token_type_ids"] = prompt["mm_token_type_ids"].repeat_interleave(G, dim=0)  # [N, P]
    was_training = model.training
    model.eval()  # no dropout while sampling
    sequences = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, **extra, suppress_tokens=suppress_tokens,
        eos_token_id=eos_token_ids, pad_token_id=pad_token_id, use_cache=True, **generate_kwargs,
    )  # [N, P + L]
    model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]  # [N, L]
    up_to_eos = completion_mask(completion_ids, eos_token_ids)  # [N, L]
    completion_ids = completion_ids.masked_fill(up_to_eos == 0, pad_token_id)  # [N, L]
    mask = completion_mask(completion_ids, eos_token_ids, mask_truncated)  # [N, L]
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, mask, prompt_inputs=dict(prompt),
                      mm_token_type_ids=extra.get("mm_token_type_ids"))
    return rollout, visuals


def generation_token_ids(model: torch.nn.Module, tokenizer) -> tuple[list[int], int, list[int]]:
    """(EOS ids, pad id, suppressed vision-token ids) for ``sample_completions``."""
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []), tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    return eos_ids, pad, [i for i in ids if i is not None and i >= 0 and i != tokenizer.unk_token_id]
