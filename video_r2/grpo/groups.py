"""Groups that span ranks: k = ``ranks_per_group`` consecutive ranks share each prompt and sample G / k of
its completions each (the original recipe: 1 prompt x 8 completions per step on 8 GPUs, one per GPU).

The advantages need the whole group, so each rank gathers the rewards of the ranks it shares prompts with,
computes the group's advantages exactly as one process holding all G completions would, and keeps its own
rows. The gradient then matches that one process because the ranks' losses average to the group's loss:
"grpo" and "dr_grpo" are means over sequences (equal counts per rank), and "bnpo" divides by the group's
mean token count per rank (`bnpo_normalizer`) instead of the rank's own. With k = 1 (a whole group on every
rank) nothing is gathered and every function below is the identity.

Row order: a rank's rollout is ``[B prompts, g = G / k completions]``; the gathered group tensor is
``[B, k ranks, g]``, so rank j's completions of prompt b are the group's completions ``j*g .. j*g + g - 1``.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor


class RankGroups:
    """Which ranks share prompts, and the two collectives that make their completions one group."""

    def __init__(self, ranks_per_group: int, world_size: int, rank: int) -> None:
        if world_size % ranks_per_group:
            raise ValueError(f"rollout.ranks_per_group={ranks_per_group} does not divide the {world_size} ranks: "
                             "every group of ranks must be complete")
        self.k, self.world, self.rank = ranks_per_group, world_size, rank
        self.position = rank % ranks_per_group  # this rank's share of each group
        self.first = rank - self.position  # the first rank of this rank's group

    def _gather_group(self, local: Tensor) -> Tensor:
        """``[...]`` on every rank -> ``[k, ...]`` from the ranks of this rank's group."""
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local)
        return torch.stack(parts[self.first:self.first + self.k])

    def gather_rewards(self, raw: dict[str, list], device: torch.device, num_generations: int,
                       prompt_ids: list | None = None) -> dict[str, list[float | None]]:
        """Each reward of the whole groups, ``name -> [B*G]`` (None where a reward could not be computed)."""
        if self.k == 1:
            return {name: list(values) for name, values in raw.items()}
        if prompt_ids is not None:
            self._check_same_prompts(prompt_ids, device)
        names = list(raw)
        local = torch.tensor([[math.nan if x is None else float(x) for x in raw[n]] for n in names],
                             dtype=torch.float64, device=device)  # [R, B*g]
        g = num_generations // self.k
        B = local.shape[1] // g
        gathered = self._gather_group(local)  # [k, R, B*g]
        group = gathered.view(self.k, len(names), B, g).permute(1, 2, 0, 3).reshape(len(names), -1)  # [R, B*G]
        return {n: [None if math.isnan(x) else x for x in group[i].tolist()] for i, n in enumerate(names)}

    def local_rows(self, group_rows: int, num_generations: int) -> Tensor:
        """Indices of this rank's completions among the ``B*G`` group rows, in its rollout's order."""
        rows = torch.arange(group_rows)
        if self.k == 1:
            return rows
        g = num_generations // self.k
        return rows.view(-1, self.k, g)[:, self.position, :].reshape(-1)

    def bnpo_normalizer(self, mask: Tensor, device: torch.device) -> Tensor | None:
        """The group's unmasked tokens divided by k (None with k = 1: the rank's own count is the group's)."""
        if self.k == 1:
            return None
        count = mask.sum().to(device=device, dtype=torch.float64).reshape(1)
        return self._gather_group(count).sum() / self.k

    def _check_same_prompts(self, prompt_ids: list, device: torch.device) -> None:
        """Ranks of one group must hold the same prompts, else their completions are not one group."""
        digest = zlib.crc32(repr(list(prompt_ids)).encode()) & 0x7FFFFFFF
        seen = self._gather_group(torch.tensor([digest], dtype=torch.long, device=device)).flatten().tolist()
        if len(set(seen)) != 1:
            raise RuntimeError(
                f"rollout.ranks_per_group={self.k}, but ranks {self.first}..{self.first + self.k - 1} got different "
                f"prompts (rank {self.rank}: {list(prompt_ids)}). Give the data module the same value "
                "(data.init_args.ranks_per_group) so that they share their prompts."
            )
