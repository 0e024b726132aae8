"""Sizes the KV cache from a memory budget and allocates it: one tensor, one view per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.config import CacheConfig, ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


@dataclass(frozen=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int
    bytes_per_token: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def max_concurrency(self, context_len: int) -> float:
        """How many requests of context_len tokens fit at once."""
        blocks_per_request = -(-context_len // self.block_size)
        return self.num_blocks / blocks_per_request


def plan_kv_cache(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> KVCacheLayout:
    per_token = kv_bytes_per_token(config, dtype)
    num_blocks = cache.kv_cache_memory // (per_token * cache.block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of {cache.block_size} tokens "
            f"({per_token * cache.block_size} bytes each); give the KV cache more memory")
    return KVCacheLayout(num_blocks, cache.block_size, per_token)


def allocate_kv_cache(layout: KVCacheLayout, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device) -> list[torch.Tensor]:
    """Zeroed (masked slots must hold finite values), shaped [2, num_slots, Hkv, D] per layer."""
    cache = torch.zeros(config.num_hidden_layers, 2, layout.num_tokens, config.num_key_value_heads,
                        config.head_dim, dtype=dtype, device=device)
    return list(cache.unbind(0))
