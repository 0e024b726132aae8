"""Sizes the KV cache from a memory budget and allocates it: one tensor, one view per layer.

With parallelism each rank holds its layers' keys and values for its KV heads, in the same blocks: the budget is
per rank, and the block count is the one every rank can afford (the ranks' shares may differ when heads or
layers do not split evenly), so one block table serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.config import CacheConfig, ModelConfig
from pagoda.parallel.layout import ParallelConfig, RankLayout, partition_heads, rank_layout

KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type. "auto": fp16 for an fp32 model on the CPU, else the model's dtype.

    Why fp16 by default on the CPU: decode attention reads every cached key and value of every request at every
    step, so at large batches it is bound by memory traffic, which fp16 halves (and twice the tokens fit the
    same budget). The native kernel widens fp16 rows to fp32 and computes in fp32; fp16 keeps 11 significant
    bits (relative error <= 2^-11) and the range of K/V activations. llama.cpp's default cache is fp16 too.
    "float32" keeps the cache exact (the tests that compare greedy tokens with transformers ask for it)."""
    if name != "auto" and name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported; choose one of auto, "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    if name != "auto":
        return KV_CACHE_DTYPES[name]
    return torch.float16 if device.type == "cpu" and model_dtype == torch.float32 else model_dtype


def kv_shape(config: ModelConfig, layout: RankLayout | None = None) -> tuple[int, int]:
    """(layers, KV heads) of a rank's cache (the whole model's without a layout)."""
    if layout is None:
        return config.num_hidden_layers, config.num_key_value_heads
    heads = partition_heads(config.num_attention_heads, config.num_key_value_heads, layout.tp_size)
    return layout.num_layers, heads[layout.tp_rank].num_kv_heads


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, layout: RankLayout | None = None) -> int:
    """Keys and values of one token across a rank's layers (all layers without a layout)."""
    element = torch.empty((), dtype=dtype).element_size()
    layers, kv_heads = kv_shape(config, layout)
    return 2 * layers * kv_heads * config.head_dim * element


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


def plan_kv_cache(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                  parallel: ParallelConfig | None = None) -> KVCacheLayout:
    """Blocks that fit `cache.kv_cache_memory` on every rank; bytes_per_token is the largest rank's share."""
    parallel = parallel or ParallelConfig()
    per_token = max(kv_bytes_per_token(config, dtype, rank_layout(parallel, r, config.num_hidden_layers))
                    for r in range(parallel.world_size))
    num_blocks = cache.kv_cache_memory // (per_token * cache.block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={cache.kv_cache_memory} bytes holds no block of {cache.block_size} tokens "
            f"({per_token * cache.block_size} bytes each); give the KV cache more memory")
    return KVCacheLayout(num_blocks, cache.block_size, per_token)


def allocate_kv_cache(layout: KVCacheLayout, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device, rank: RankLayout | None = None) -> list[torch.Tensor]:
    """Zeroed (masked slots must hold finite values), shaped [2, num_slots, Hkv, D] per layer of the rank."""
    layers, kv_heads = kv_shape(config, rank)
    cache = torch.zeros(layers, 2, layout.num_tokens, kv_heads, config.head_dim, dtype=dtype, device=device)
    return list(cache.unbind(0))
