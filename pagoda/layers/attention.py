"""Attention over the paged KV cache: the per-step context, the layer, and the backend interface.

The runner opens one `forward_context` per step; every Attention layer reads its metadata and its own
KV-cache view from it. Model files never see request state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class BatchLayout:
    """The step's flattened batch as the runner built it (numpy, host side).

    Requests are ordered decodes first (one query token each), then the others. Request i owns query tokens
    [query_start[i], query_start[i + 1]) and, after this step, has context_lens[i] tokens in the cache,
    the last of which are its queries.
    """

    query_start: np.ndarray  # [B + 1] int64
    context_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, max_blocks] int64, padded with 0
    num_decodes: int
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each query token


class AttentionBackend(ABC):
    @abstractmethod
    def build_metadata(self, layout: BatchLayout, windows: set[int | None]) -> Any:
        """Everything the layers need for this step, computed once and shared by every layer."""

    @abstractmethod
    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any) -> torch.Tensor:
        """Write k, v into the cache at the step's slots, then attend. q: [T, H, D]; k, v: [T, Hkv, D];
        kv_cache: [2, num_slots, Hkv, D]. Returns [T, H * D]."""


@dataclass
class ForwardContext:
    backend: AttentionBackend
    metadata: Any
    kv_caches: list[torch.Tensor]  # one [2, num_slots, Hkv, D] view per layer


_context: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext):
    global _context
    if _context is not None:
        raise RuntimeError("forward contexts do not nest: one model forward at a time")
    _context = ctx
    try:
        yield ctx
    finally:
        _context = None


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("attention called outside a forward_context")
    return _context


class Attention(nn.Module):
    """Paged attention for one layer. Holds no weights: projections and rotary live in the model file."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        return ctx.backend.forward(self, q, k, v, ctx.kv_caches[self.layer_idx], ctx.metadata)
