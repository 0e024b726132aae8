"""The collectives a model shard makes inside its tensor-parallel group, on torch.distributed.

Model code calls `tp.all_reduce(x)` after a row-parallel projection and `tp.gather_columns(x, sizes)` for
vocabulary-parallel logits; with one rank both are no-ops, so the single-process path pays nothing. The group
also counts the time it spends in collectives, for the benchmarks' compute / communication split.
"""

from __future__ import annotations

import time

import torch


class TPGroup:
    """A tensor-parallel group of `size` ranks; this rank is `rank` within it. The base class is the group of one."""

    size = 1
    rank = 0
    transport = "none"  # how all_reduce moves data: "none" (one rank), "gloo", "shm"
    native_all_reduce: int | None = None  # address of a C all-reduce (float*, int64) the native stack can call

    def __init__(self) -> None:
        self.comm_seconds = 0.0  # time inside collectives since the last reset
        self.comm_calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group, in place (x must be contiguous)."""
        return x

    def gather_columns(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[rows, sizes[rank]] on every rank -> [rows, sum(sizes)], rank 0's columns first, on every rank."""
        return x

    def reset_stats(self) -> None:
        self.comm_seconds, self.comm_calls = 0.0, 0

    def take_native_seconds(self) -> float:
        """Seconds spent in all-reduces made inside native code since the last call (0 when there are none)."""
        return 0.0

    def raise_if_failed(self) -> None:
        """Raise DistributedError if a collective made inside native code failed."""


class DistributedTPGroup(TPGroup):
    """A torch.distributed process group (gloo on the CPU, NCCL on CUDA)."""

    transport = "gloo"

    def __init__(self, group, ranks: list[int], rank: int):
        super().__init__()
        self.group = group
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(rank)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        dist.all_reduce(x, group=self.group)
        self.comm_seconds += time.perf_counter() - start
        self.comm_calls += 1
        return x

    def gather_columns(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        widest = max(sizes)
        padded = torch.nn.functional.pad(x, (0, widest - x.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        out = torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)
        self.comm_seconds += time.perf_counter() - start
        self.comm_calls += 1
        return out
