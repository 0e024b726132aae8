"""Where each rank sits in a tensor × pipeline parallel layout, and how a model's dimensions are split.

Ranks are numbered stage-major: rank = pp_rank * tp_size + tp_rank, so the ranks of one pipeline stage form one
tensor-parallel group and rank 0 (stage 0, TP rank 0) is the driver, which schedules and serves HTTP.

Splits are contiguous and balanced (sizes differ by at most one unit), never requiring divisibility:
- attention heads by whole GQA groups when there are at least as many KV heads as TP ranks (each rank keeps
  every query head of its KV heads, so a rank's query heads map to its KV heads as h // group); with fewer KV heads
  than ranks, each KV head is replicated on tp / kv ranks that split its query heads (tp must then be a multiple
  of the KV head count);
- the MLP's intermediate dimension and the vocabulary in multiples of an alignment (the checkpoint's block size,
  so quantized blocks are never cut);
- layers over pipeline stages by count, or by an explicit list of counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_layers: tuple[int, ...] | None = None  # layers per stage, overriding the balanced split

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"tensor and pipeline parallel sizes must be at least 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.pipeline_layers is not None and len(self.pipeline_layers) != self.pipeline_parallel_size:
            raise ValueError(f"pipeline_layers gives {len(self.pipeline_layers)} stage sizes for "
                             f"{self.pipeline_parallel_size} pipeline stages")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class RankLayout:
    """One rank's place: its TP rank within its stage, its stage, and the layers [layer_start, layer_end) it
    holds."""

    tp_size: int
    pp_size: int
    rank: int
    layer_start: int
    layer_end: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def stage_rank(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """The global rank of TP rank `tp_rank` (default: this one's) in stage `pp_rank`."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    @classmethod
    def single(cls, num_layers: int) -> RankLayout:
        return cls(1, 1, 0, 0, num_layers)


def rank_layout(config: ParallelConfig, rank: int, num_layers: int) -> RankLayout:
    if not 0 <= rank < config.world_size:
        raise ValueError(f"rank {rank} is outside a world of {config.world_size}")
    stages = layer_ranges(num_layers, config.pipeline_parallel_size, config.pipeline_layers)
    start, end = stages[rank // config.tensor_parallel_size]
    return RankLayout(config.tensor_parallel_size, config.pipeline_parallel_size, rank, start, end)


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, n) in `parts` contiguous ranges whose boundaries are multiples of `align` (n itself excepted), as equal
    as the alignment allows. Raises ValueError if some range would be empty."""
    units = -(-n // align)
    if units < parts:
        raise ValueError(f"cannot split {n} (in units of {align}) into {parts} non-empty parts")
    bounds = [min(n, (units * i // parts) * align) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def layer_ranges(num_layers: int, stages: int, counts: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    if counts is None:
        return split(num_layers, stages)
    if sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"pipeline_layers {list(counts)} must be positive and add up to the model's "
                         f"{num_layers} layers")
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank computes: query heads [q_start, q_end), KV heads [kv_start, kv_end)."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start


def partition_heads(num_heads: int, num_kv_heads: int, tp: int) -> list[HeadShard]:
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} attention heads do not form groups over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        return [HeadShard(a * group, b * group, a, b) for a, b in split(num_kv_heads, tp)]
    if tp % num_kv_heads:
        raise ValueError(f"tensor parallel size {tp} exceeds the {num_kv_heads} KV heads and is not a multiple of "
                         "them: each KV head must be replicated on the same number of ranks")
    per_head = tp // num_kv_heads
    if group < per_head:
        raise ValueError(f"tensor parallel size {tp} leaves some rank without a query head ({num_heads} heads)")
    shards = []
    for kv in range(num_kv_heads):
        for a, b in split(group, per_head):
            shards.append(HeadShard(kv * group + a, kv * group + b, kv, kv + 1))
    return shards
