"""Which rows each step and each rank train on. Each optimizer step sees one global batch (micro batch x accumulation
x processes) of a seeded permutation, so a run's data order depends on the seed and the global batch alone."""
from __future__ import annotations

from typing import Optional

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batch_indices(order: list[int], step_in_epoch: int, global_batch: int) -> list[int]:
    """The step's global batch; the last one of an epoch is filled up from the start of the order."""
    start = step_in_epoch * global_batch
    return [order[(start + i) % len(order)] for i in range(global_batch)]


def rank_share(indices: list[int], world: int, rank: int, lengths: Optional[list[int]] = None) -> list[int]:
    """This rank's rows of the step's global batch: an equal number each. In order (rank 0 the first run of them), or,
    given the rows' lengths, longest first, each to the rank with the fewest tokens so far, so that no rank waits on
    another at the step's all-reduce: the step's gradient is the same whatever the split (the loss is the mean over
    the global batch's label tokens), and every rank computes the same split."""
    per_rank = len(indices) // world
    if lengths is None:
        return indices[rank * per_rank:(rank + 1) * per_rank]
    shares, loads = [[] for _ in range(world)], [0] * world
    for i in sorted(indices, key=lambda i: -lengths[i]):
        r = min((r for r in range(world) if len(shares[r]) < per_rank), key=lambda r: loads[r])
        shares[r].append(i)
        loads[r] += lengths[i]
    return shares[rank]
