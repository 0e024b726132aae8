"""ModelShard: what a model file needs to build its share of a model on one rank (layers, heads, slices)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.parallel.comm import TPGroup
from pagoda.parallel.layout import HeadShard, RankLayout, partition_heads, split


@dataclass
class ModelShard:
    layout: RankLayout
    tp: TPGroup = field(default_factory=TPGroup)
    # Split boundaries of the MLP and the vocabulary are multiples of this (the checkpoint's quantization block,
    # so a rank's slice of a quantized tensor is whole blocks).
    align: int = 32

    @classmethod
    def single(cls, num_layers: int) -> ModelShard:
        return cls(RankLayout.single(num_layers))

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    def holds_layer(self, index: int) -> bool:
        return self.layout.layer_start <= index < self.layout.layer_end

    def heads(self, num_heads: int, num_kv_heads: int) -> HeadShard:
        return partition_heads(num_heads, num_kv_heads, self.tp_size)[self.tp_rank]

    def slice_of(self, n: int) -> tuple[int, int]:
        """This rank's range of a dimension split over the TP group (MLP intermediate, vocabulary)."""
        return self.ranges(n)[self.tp_rank]

    def ranges(self, n: int) -> list[tuple[int, int]]:
        return split(n, self.tp_size, self.align if n >= self.align * self.tp_size else 1)
