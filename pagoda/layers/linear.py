"""Linear and embedding layers whose weights start uninitialised: the loader fills every one.

A layer may hold a slice of one or more checkpoint tensors (a fused q/k/v projection, a tensor-parallel shard):
its `shards` say which, in the checkpoint's coordinates, and the loader (models/loading.py) and the GGUF
quantizer (layers/quantized.py) read exactly those slices, so no rank ever materialises a whole tensor it does not
hold. Without `shards` a parameter is its checkpoint tensor of the same name, whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.parallel.comm import TPGroup


@dataclass(frozen=True)
class WeightShard:
    """Part of a layer's weight: rows (dim 0) or columns (dim 1) [start, stop) of checkpoint tensor `source`
    (a module name next to this layer, e.g. "q_proj", or a full module name such as "model.embed_tokens").
    Row shards fill the weight's rows in order; a column shard is the whole weight."""

    source: str
    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shards: list[WeightShard] | None = None, bias_here: bool = True):
        """`bias_here`: False on the ranks of a row-parallel layer other than the first, whose bias is zero so
        the all-reduce adds it once."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shards = shards
        self.bias_here = bias_here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def column_shards(sources: list[tuple[str, int, int]]) -> list[WeightShard]:
    return [WeightShard(name, 0, start, stop) for name, start, stop in sources]


class Embedding(nn.Module):
    """Token embeddings; with tensor parallelism each rank holds rows [vocab_start, vocab_end) and the lookups
    of the other rows come from the other ranks (zeros here, summed by an all-reduce)."""

    def __init__(self, num_embeddings: int, dim: int, vocab_range: tuple[int, int] | None = None,
                 tp: TPGroup | None = None, source: str | None = None):
        super().__init__()
        self.vocab_start, self.vocab_end = vocab_range or (0, num_embeddings)
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.tp = tp or TPGroup()
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, dim), requires_grad=False)
        if self.tp.size > 1 or source is not None:
            self.shards = [WeightShard(source or "embed_tokens", 0, self.vocab_start, self.vocab_end)]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.lookup(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_end - self.vocab_start)
        rows = self.lookup(local.masked_fill(outside, 0))
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0).contiguous()
        return self.tp.all_reduce(rows)
