"""Reference attention backend: torch scaled_dot_product_attention over the paged cache.

It is the oracle the fast backends are tested against, and it is simple rather than fast:
- all slot indices and masks are built once per step, not per layer;
- a prompt chunk with nothing cached before it attends to its own fresh k, v (no cache read at all);
- decodes are batched in one SDPA call over one gather of their context; a chunk that continues a cached
  prefix gathers its own context.
Each gather copies the context once per layer, which the fast backend avoids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagoda.layers.attention import Attention, AttentionBackend, BatchLayout
from pagoda.layers.kv_quant import CODE_MAX, dequantize_rows, quantize_rows


@dataclass
class PrefillSpan:
    q_start: int
    q_end: int
    slots: torch.Tensor | None  # context slots, or None when the queries are the whole context
    masks: dict[int | None, torch.Tensor | None]  # by sliding window; None means plain causal


@dataclass
class ReferenceMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_slots: torch.Tensor | None = None  # [Bd, L]
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # [Bd, 1, 1, L]
    prefills: list[PrefillSpan] = field(default_factory=list)


def _slots(block_table: np.ndarray, length: int, block_size: int) -> np.ndarray:
    """Cache slots of positions [0, length) for each row of block tables: [..., length]."""
    pos = np.arange(length)
    return block_table[..., pos // block_size] * block_size + pos % block_size


def _allowed(q_pos: np.ndarray, k_len: int, window: int | None) -> np.ndarray:
    """[..., q, k] True where a query at q_pos may attend key position k (causal, optionally windowed)."""
    k_pos = np.arange(k_len)
    ok = k_pos <= q_pos[..., None]
    if window is not None:
        ok &= q_pos[..., None] - k_pos < window
    return ok


class ReferenceBackend(AttentionBackend):
    def __init__(self, device: torch.device):
        self.device = device

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def build_metadata(self, layout: BatchLayout, windows: set[int | None]) -> ReferenceMetadata:
        md = ReferenceMetadata(slot_mapping=layout.slot_mapping, num_decodes=layout.num_decodes)
        bs = layout.block_size
        nd = layout.num_decodes
        if nd:
            lens = layout.context_lens[:nd]
            longest = int(lens.max())
            md.decode_slots = self._tensor(_slots(layout.block_tables[:nd], longest, bs))
            for w in windows:
                ok = _allowed(lens - 1, longest, w)  # [Bd, L]
                md.decode_masks[w] = self._tensor(ok[:, None, None, :])
        for i in range(nd, len(layout.context_lens)):
            q_start, q_end = int(layout.query_start[i]), int(layout.query_start[i + 1])
            ctx = int(layout.context_lens[i])
            fresh = q_end - q_start == ctx
            slots = None if fresh else self._tensor(_slots(layout.block_tables[i], ctx, bs))
            q_pos = np.arange(ctx - (q_end - q_start), ctx)
            masks = {w: None if (fresh and w is None) else self._tensor(_allowed(q_pos, ctx, w)) for w in windows}
            md.prefills.append(PrefillSpan(q_start, q_end, slots, masks))
        return md

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: ReferenceMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        store, load = _cache_codec(k_cache.dtype, layer.head_dim, q.dtype)
        # through uint8 views: index_copy_ and indexing have no CPU kernels for the fp8 dtypes
        k_cache.view(torch.uint8).index_copy_(0, md.slot_mapping, store(k).view(torch.uint8))
        v_cache.view(torch.uint8).index_copy_(0, md.slot_mapping, store(v).view(torch.uint8))
        num_tokens = q.shape[0]
        out = q.new_empty(num_tokens, layer.num_heads, layer.head_dim)
        window = layer.sliding_window
        nd = md.num_decodes
        if nd:
            keys = load(k_cache, md.decode_slots).transpose(1, 2)  # [Bd, Hkv, L, D]
            values = load(v_cache, md.decode_slots).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), keys, values, attn_mask=md.decode_masks[window],
                                               scale=layer.scale, enable_gqa=True)
            out[:nd] = o.squeeze(2)
        for span in md.prefills:
            qs = q[span.q_start:span.q_end].transpose(0, 1)  # [H, n, D]
            if span.slots is None:
                keys, values = k[span.q_start:span.q_end], v[span.q_start:span.q_end]
                if k_cache.dtype != k.dtype:  # attend to what the cache holds, as a later chunk would
                    keys, values = _round_trip(store, keys, q.dtype), _round_trip(store, values, q.dtype)
            else:
                keys, values = load(k_cache, span.slots), load(v_cache, span.slots)
            mask = span.masks[window]
            o = F.scaled_dot_product_attention(qs, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                                               is_causal=mask is None, scale=layer.scale, enable_gqa=True)
            out[span.q_start:span.q_end] = o.transpose(0, 1)
        return out.view(num_tokens, layer.num_heads * layer.head_dim)


def _cache_codec(cache_dtype: torch.dtype, head_dim: int, compute_dtype: torch.dtype):
    """(store: k or v [T, Hkv, D] -> cache rows, load: (cache, slots) -> [..., Hkv, D] in compute_dtype)."""
    if cache_dtype in CODE_MAX:  # 8-bit codes and a scale per row (layers/kv_quant.py)
        def store(x: torch.Tensor) -> torch.Tensor:
            return quantize_rows(x, cache_dtype)

        def load(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            rows = cache.view(torch.uint8)[slots].view(cache_dtype)
            return dequantize_rows(rows, head_dim).to(compute_dtype)
    else:
        def store(x: torch.Tensor) -> torch.Tensor:
            return x.to(cache_dtype)

        def load(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            return cache[slots].to(compute_dtype)
    return store, load


def _round_trip(store, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache gives it back."""
    rows = store(x)
    if rows.dtype in CODE_MAX:
        return dequantize_rows(rows, x.shape[-1]).to(dtype)
    return rows.to(dtype)
