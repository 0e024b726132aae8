"""Sizes the KV cache from a memory budget and allocates it: one tensor, one view per layer.

The budget is a size the user gave, or "auto" (`kv_cache_budget`): the memory this host still has once the weights
are loaded (MemAvailable, capped by a cgroup limit), times `memory_utilization`, shared by the ranks on the host,
less each rank's activation reserve (planner.activation_bytes), and never more than the scheduler can use
(max_num_seqs requests of max_model_len tokens). The cache is an anonymous mapping: zero pages until a block is
first written, so an idle server's RSS does not include the cache it may grow into.

With parallelism each rank holds its layers' keys and values for its KV heads, in the same blocks: the budget is
per rank, and the block count is the one every rank can afford (the ranks' shares may differ when heads or
layers do not split evenly), so one block table serves them all.
"""

from __future__ import annotations

import mmap
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagoda.config import CacheConfig, ModelConfig
from pagoda.layers.kv_quant import kv_row
from pagoda.parallel.layout import ParallelConfig, RankLayout, partition_heads, rank_layout

KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


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
    return 2 * layers * kv_heads * kv_row(dtype, config.head_dim) * element


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


def max_bytes_per_token(config: ModelConfig, dtype: torch.dtype, parallel: ParallelConfig | None = None) -> int:
    """The largest rank's KV bytes per token (every rank holds the same blocks)."""
    parallel = parallel or ParallelConfig()
    return max(kv_bytes_per_token(config, dtype, rank_layout(parallel, r, config.num_hidden_layers))
               for r in range(parallel.world_size))


@dataclass(frozen=True)
class KVBudget:
    """How many bytes a rank gives its KV cache, and why (logged, and served on /v1/engine)."""

    bytes: int
    reason: str


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def host_memory() -> tuple[int, int]:
    """(memory available on this host, ranks sharing it). With several ranks (torch.distributed initialised),
    measured after every rank has loaded its weights, and the same answer on every rank: the host with the least
    memory per rank, so that the ranks agree on one block count."""
    from pagoda.planner import local_memory_bytes

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_memory_bytes(), 1
    dist.barrier()  # every rank's weights are loaded
    reports: list[tuple[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (socket.gethostname(), local_memory_bytes()))
    hosts: dict[str, list[int]] = {}
    for host, available in reports:
        hosts.setdefault(host, []).append(available)
    # ranks of one host may measure at slightly different moments: take the host's smallest measurement
    return min(((min(values), len(values)) for values in hosts.values()), key=lambda m: m[0] / m[1])


def kv_cache_budget(cache: CacheConfig, bytes_per_token: int, *, available: int, ranks_on_host: int,
                    activation_reserve: int, max_num_seqs: int, max_model_len: int,
                    max_model_len_is_set: bool) -> KVBudget:
    """A rank's KV-cache bytes: `cache.kv_cache_memory` when set, else "auto" (see the module doc), where
    `available` is this host's memory left with every local rank's weights loaded.

    Raises ValueError, with the numbers, when "auto" cannot hold one request of max_model_len tokens and the user
    asked for that length (a default length is lowered to what fits by the engine instead)."""
    if cache.kv_cache_memory is not None:
        return KVBudget(cache.kv_cache_memory, "set")
    share = int(cache.memory_utilization * available) // max(1, ranks_on_host)
    budget = share - activation_reserve
    wanted = max_num_seqs * max_model_len * bytes_per_token  # more than the scheduler can ever hold is waste
    one_request = max_model_len * bytes_per_token
    how = (f"{cache.memory_utilization:g} x {_gib(available)} available"
           + (f" / {ranks_on_host} ranks" if ranks_on_host > 1 else "")
           + f" - {_gib(activation_reserve)} activations")
    if budget < (one_request if max_model_len_is_set else bytes_per_token * cache.block_size):
        raise ValueError(
            f"the KV cache does not fit: {how} leaves {_gib(max(0, budget))} for it, and one request of "
            f"max_model_len {max_model_len} tokens needs {_gib(one_request)} ({bytes_per_token} B/token); lower "
            f"--max-model-len or --max-num-seqs, free memory, or give --kv-cache-memory a size")
    if wanted <= budget:
        return KVBudget(wanted, f"auto: {max_num_seqs} requests x {max_model_len} tokens ({how} = {_gib(budget)})")
    return KVBudget(budget, f"auto: {how}")


def plan_kv_cache(config: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                  parallel: ParallelConfig | None = None, budget: int | None = None) -> KVCacheLayout:
    """Blocks that fit the budget (default: `cache.kv_cache_memory`) on every rank; bytes_per_token is the largest
    rank's share."""
    per_token = max_bytes_per_token(config, dtype, parallel)
    budget = cache.kv_cache_memory if budget is None else budget
    if budget is None:
        raise ValueError("an automatic KV cache size is resolved by kv_cache_budget first")
    num_blocks = budget // (per_token * cache.block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no block of {cache.block_size} tokens "
            f"({per_token * cache.block_size} bytes each); give the KV cache more memory")
    return KVCacheLayout(num_blocks, cache.block_size, per_token)


def allocate_kv_cache(layout: KVCacheLayout, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device, rank: RankLayout | None = None) -> list[torch.Tensor]:
    """Zeroed (masked slots must hold finite values), shaped [2, num_slots, Hkv, row] per layer of the rank (row: D,
    or D + 4 for an 8-bit cache, see kv_row).

    On the CPU the memory is an anonymous mapping: the kernel hands out zero pages and commits each one when it is
    first written, so memory is taken as blocks are used, not at start-up."""
    layers, kv_heads = kv_shape(config, rank)
    shape = (layers, 2, layout.num_tokens, kv_heads, kv_row(dtype, config.head_dim))
    if device.type != "cpu":
        return list(torch.zeros(shape, dtype=dtype, device=device).unbind(0))
    element = torch.empty((), dtype=dtype).element_size()
    count = layers * 2 * layout.num_tokens * kv_heads * shape[-1]
    pages = mmap.mmap(-1, max(1, count * element), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cache = torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps the mapping alive
    return list(cache.unbind(0))
