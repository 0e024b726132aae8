"""Drive scheduler + runner directly on a checkpoint (no tokenizer needed): for random-weight models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pagoda.config import CacheConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler, SchedulerConfig
from pagoda.layers.attention import BatchLayout
from pagoda.layers.attention_reference import ReferenceBackend
from pagoda.loader import Checkpoint
from pagoda.loader.hf_loader import hf_tensors, read_config
from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.kv_cache import allocate_kv_cache, kv_bytes_per_token, plan_kv_cache
from pagoda.worker.model_loader import build_model
from pagoda.worker.model_runner import ModelRunner

CPU = torch.device("cpu")


def random_q4(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q4_1 values: codes uint8 [N, K] in [0, 15], fp16 d and m [N, K/32] (w = d * c + m, centred near 0)."""
    from pagoda.layers.quantized import GROUP

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // GROUP, generator=g) * 0.02).to(torch.float16)
    m = (-8 * d.float() + torch.randn(n, k // GROUP, generator=g) * 0.01).to(torch.float16)
    return codes, d, m


def hf_checkpoint(directory: Path) -> Checkpoint:
    config = read_config(directory)
    return Checkpoint(directory, config, lambda: hf_tensors(directory), tokenizer=None)


class Harness:
    def __init__(self, checkpoint: Checkpoint, *, num_blocks: int = 256, block_size: int = 16, max_num_seqs: int = 16,
                 budget: int = 64, dtype: torch.dtype = torch.float32, prefix_caching: bool = True,
                 kv_dtype: torch.dtype | None = None):
        self.config = checkpoint.config
        self.model = build_model(checkpoint, dtype, CPU)
        kv_dtype = kv_dtype or dtype
        per_block = kv_bytes_per_token(self.config, kv_dtype) * block_size
        layout = plan_kv_cache(self.config, CacheConfig(block_size, num_blocks * per_block), kv_dtype)
        kv = allocate_kv_cache(layout, self.config, kv_dtype, CPU)
        self.runner = ModelRunner(self.model, self.config, kv, block_size, ReferenceBackend(CPU), CPU)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, layout.num_tokens),
                                   KVCacheManager(num_blocks, block_size, prefix_caching))
        self.num_steps = 0

    def generate(self, prompts: list[list[int]], max_tokens: int, **params) -> list[list[int]]:
        reqs = [Request(f"r{i}", list(p), SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                         **params), frozenset(), max_tokens)
                for i, p in enumerate(prompts)]
        for r in reqs:
            self.scheduler.add_request(r)
        while self.scheduler.has_unfinished_requests():
            out = self.scheduler.schedule()
            if not out.empty:  # empty when every running request was just preempted
                self.scheduler.update_from_output(out, self.runner.execute(out))
            self.num_steps += 1
        self.scheduler.kv_cache.check_integrity()
        assert self.scheduler.kv_cache.pool.num_free_blocks == self.scheduler.kv_cache.num_blocks
        return [r.output_token_ids for r in reqs]


@torch.inference_mode()
def sequence_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """log_softmax of an LLM's logits at every position of `ids`, from one prefill of the whole sequence
    (teacher forcing). Blocks come from the engine's pool, so no cached prefix is overwritten, and go back."""
    from pagoda.layers.attention import BatchLayout, ForwardContext, forward_context

    runner, pool = llm.engine.runner, llm.engine.scheduler.kv_cache.pool
    n, bs = len(ids), runner.block_size
    taken = pool.allocate(-(-n // bs))
    blocks = np.array([b.block_id for b in taken], dtype=np.int64)
    slots = torch.from_numpy(blocks[np.arange(n) // bs] * bs + np.arange(n) % bs)
    layout = BatchLayout(np.array([0, n]), np.array([n]), blocks[None, :], 0, bs, slots)
    try:
        metadata = runner.backend.build_metadata(layout, runner.windows)
        with forward_context(ForwardContext(runner.backend, metadata, runner.kv_caches)):
            hidden = runner.model(torch.tensor(ids), torch.arange(n))
        return torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1)
    finally:
        pool.free(taken)


def paged_layout(requests: list[tuple[int, int]], block_size: int, seed: int = 0,
                 spare_blocks: int = 0) -> tuple[BatchLayout, np.ndarray]:
    """The BatchLayout of a step with (query tokens, context length) per request, decodes first, whose blocks
    are a random permutation of the pool (plus `spare_blocks` nobody owns). Returns it and the query tokens'
    positions."""
    rng = np.random.default_rng(seed)
    blocks_per_request = [-(-ctx // block_size) for _, ctx in requests]
    owner = rng.permutation(sum(blocks_per_request) + spare_blocks)
    tables = np.zeros((len(requests), max(blocks_per_request)), dtype=np.int64)
    used = 0
    for i, count in enumerate(blocks_per_request):
        tables[i, :count] = owner[used:used + count]
        used += count
    counts = np.array([n for n, _ in requests], dtype=np.int64)
    query_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    context_lens = np.array([ctx for _, ctx in requests], dtype=np.int64)
    positions = np.concatenate([np.arange(ctx - n, ctx) for n, ctx in requests])
    rows = np.repeat(np.arange(len(requests)), counts)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    num_decodes = int(np.searchsorted(counts > 1, True))
    return BatchLayout(query_start, context_lens, tables, num_decodes, block_size, torch.from_numpy(slots)), positions


def random_attention_step(requests: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                          block_size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random step for one attention layer: q, k, v, a random fp32 cache whose block tables are shuffled (a
    few blocks owned by nobody), and its BatchLayout."""
    layout, _ = paged_layout(requests, block_size, seed, spare_blocks=3)
    gen = torch.Generator().manual_seed(seed)
    total = int(layout.query_start[-1])
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_blocks = sum(-(-ctx // block_size) for _, ctx in requests) + 3
    cache = torch.randn(2, num_blocks * block_size, num_kv_heads, head_dim, generator=gen)
    return q, k, v, cache, layout
