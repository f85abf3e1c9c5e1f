"""What a GRPO step logs about its rewards and completions, as plain floats."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from video_r2.grpo.types import _eos_positions


def reward_stats(
    rewards: Mapping[str, Sequence[float | None]], total: Tensor, num_generations: int
) -> dict[str, float]:
    """Reward metrics for logging, as plain floats.

    Per reward (over its valid, non-None values): ``rewards/<name>/mean``, ``/std``, ``/none_frac`` and
    ``/missing_groups`` (groups left out by :func:`combine_rewards`). Of the total ``[N]``: ``reward/mean``,
    ``reward/std``, ``reward/group_std_mean`` (mean within-group std: the signal GRPO learns from) and
    ``reward/frac_groups_all_equal`` (groups with zero advantage, i.e. no learning signal).
    All stds are unbiased (0 where fewer than 2 values).
    """
    G = num_generations
    stats: dict[str, float] = {}
    for name, values in rewards.items():
        raw = torch.tensor([float("nan") if x is None else float(x) for x in values])  # [N]
        valid = raw[~torch.isnan(raw)]  # [n_valid]
        stats[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
        stats[f"rewards/{name}/std"] = _std(valid)
        stats[f"rewards/{name}/none_frac"] = torch.isnan(raw).float().mean().item()
        stats[f"rewards/{name}/missing_groups"] = float(torch.isnan(raw).view(-1, G).all(dim=1).sum())
    total = total.detach().float().cpu()  # [N]
    grouped = total.view(-1, G)  # [B, G]
    stats["reward/mean"] = total.mean().item()
    stats["reward/std"] = _std(total)
    stats["reward/group_std_mean"] = grouped.std(dim=1).mean().item()  # G >= 2, so defined
    stats["reward/frac_groups_all_equal"] = (grouped == grouped[:, :1]).all(dim=1).float().mean().item()
    return stats


def _std(x: Tensor) -> float:
    return x.std().item() if x.numel() >= 2 else 0.0


def completion_length_stats(completion_ids: Tensor, eos_token_ids: int | Iterable[int] | Tensor) -> dict[str, float]:
    """Completion lengths (tokens up to and including the first EOS; L if none) as plain floats:
    ``completions/mean_length``, ``/min_length``, ``/max_length`` and ``/truncated_frac`` (rows without EOS).
    Measured from the ids, so it is the same whether or not truncated completions are masked.
    """
    has_eos, first = _eos_positions(completion_ids, eos_token_ids)  # [N], [N]
    lengths = torch.where(has_eos, first + 1, completion_ids.shape[1]).float()  # [N]
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/truncated_frac": (~has_eos).float().mean().item(),
    }


def completion_log(completions: Sequence[str], samples: Sequence[Mapping], rewards: Mapping[str, Tensor],
                   tar_details: Sequence | None, step: int, source: Mapping) -> dict:
    """One step's completions in `video-r2 evaluate`'s JSON layout, so that `video-r2 inspect` reads either.

    `samples[i]` is the record of completion i; `rewards` the step's values ([N], NaN where a reward had none);
    `tar_details` the TAR reasons per completion (or None without TAR); `source` says where the frames came
    from (model, data_path, video_folder, subtitles_folder, sampling, draw_timestamps, draw_subtitles).
    """
    rows = []
    for i, (text, sample) in enumerate(zip(completions, samples, strict=True)):
        row = {"id": f"{sample.get('id')} #{i}", "question_type": sample.get("question_type"), "completion": text,
               "question": sample.get("question"), "answer": sample.get("answer"), "video": sample.get("video")}
        for name, values in rewards.items():
            value = float(values[i])
            row[name] = None if value != value else value  # NaN: the reward had no value
        if tar_details is not None:
            detail = tar_details[i]
            row.update(grounded=detail.grounded, consistent=detail.consistent, tar_details=detail.to_dict())
        rows.append(row)
    log = {**source, "step": step, "num_samples": len(rows)}
    for name in rewards:
        valid = [r[name] for r in rows if r[name] is not None]
        log[name] = sum(valid) / len(valid) if valid else None
    log["samples"] = rows
    return log
