"""Drive scheduler + runner directly on a checkpoint (no tokenizer needed): for random-weight models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pagoda.config import CacheConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler, SchedulerConfig
from pagoda.layers.attention_reference import ReferenceBackend
from pagoda.loader import Checkpoint
from pagoda.loader.hf_loader import hf_weights, read_config
from pagoda.request import Request
from pagoda.sampling_params import SamplingParams
from pagoda.worker.kv_cache import allocate_kv_cache, kv_bytes_per_token, plan_kv_cache
from pagoda.worker.model_loader import build_model
from pagoda.worker.model_runner import ModelRunner

CPU = torch.device("cpu")


def hf_checkpoint(directory: Path) -> Checkpoint:
    config = read_config(directory)
    return Checkpoint(directory, config, lambda dtype: hf_weights(directory, dtype), tokenizer=None)


class Harness:
    def __init__(self, checkpoint: Checkpoint, *, num_blocks: int = 256, block_size: int = 16, max_num_seqs: int = 16,
                 budget: int = 64, dtype: torch.dtype = torch.float32, prefix_caching: bool = True):
        self.config = checkpoint.config
        self.model = build_model(checkpoint, dtype, CPU)
        per_block = kv_bytes_per_token(self.config, dtype) * block_size
        layout = plan_kv_cache(self.config, CacheConfig(block_size, num_blocks * per_block), dtype)
        kv = allocate_kv_cache(layout, self.config, dtype, CPU)
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
