"""The training order: a function of (seed, epoch) only, split over ranks, able to start mid-epoch.

Why not PyTorch's RandomSampler with a seeded generator: its generator advances with every epoch, so a run
resumed from a checkpoint re-seeds it and replays epoch 0's order. Here epoch e's order is always
`randperm(n, seed + e)`, and a resumed run starts it after the samples the checkpoint had consumed, so N steps
in one go and N/2 + resume + N/2 see the same samples in the same order.

It subclasses DistributedSampler so that Lightning keeps it instead of wrapping it in one of its own.
`ranks_per_group` ranks share their prompts (GRPO groups that span ranks, `video_r2.grpo.groups`): they form
one replica and read the same indices.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, length: int, shuffle: bool, seed: int, world_size: int = 1, rank: int = 0,
                 ranks_per_group: int = 1) -> None:
        if world_size % ranks_per_group:
            raise ValueError(f"data.ranks_per_group={ranks_per_group} does not divide the {world_size} ranks")
        self.length = length
        # DistributedSampler's own fields, set directly: it needs no process group then.
        self.num_replicas = world_size // ranks_per_group
        self.rank = rank // ranks_per_group
        self.shuffle, self.seed, self.drop_last = shuffle, seed, False
        self.epoch = 0
        self.num_samples = math.ceil(length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._skip = 0  # samples of `self._skip_epoch` already consumed before a resume
        self._skip_epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_consumed: int) -> None:
        """Start `epoch` after this rank's first `samples_consumed` samples of it."""
        self.epoch, self._skip_epoch, self._skip = epoch, epoch, samples_consumed

    def order(self, epoch: int) -> list[int]:
        """All replicas' indices of `epoch`, padded (by wrapping around) to a multiple of the replicas."""
        if self.shuffle:
            indices = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            indices = list(range(self.length))
        padding = self.total_size - len(indices)
        return indices + (indices * math.ceil(padding / max(1, len(indices))))[:padding]

    def __iter__(self):
        mine = self.order(self.epoch)[self.rank:self.total_size:self.num_replicas]
        if self.epoch == self._skip_epoch:
            mine = mine[self._skip:]
            self._skip_epoch = -1  # only the resumed epoch starts late
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples
