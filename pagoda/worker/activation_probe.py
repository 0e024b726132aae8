"""The activation peak of the largest step, measured on the loaded model before the KV cache is sized.

The planner's formula (planner.activation_bytes) counts a step's fp32 buffers. This runs one step of the largest
size the scheduler makes (a prompt chunk of max_prefill_tokens, at most max_model_len, beside max_num_seqs - 1
decodes, then the LM head over max_num_seqs rows) through the path a real step takes (native stack or torch
modules), on a KV cache of just the blocks it writes, and takes the growth of the process's resident memory over
the step: the peak RSS is reset just before (/proc/self/clear_refs), after the heap's free memory went back to the
system (malloc_trim), so memory freed earlier cannot hide the step's; the KV rows the step wrote are subtracted.
Thread stacks, oneDNN scratch and allocator slack are in it, which is the point: the KV budget reserves
max(formula, measured).

CPU and Linux only (the figures come from /proc); elsewhere None, and the formula alone is reserved. The step also
warms what a first request would pay for (oneDNN primitives, OpenMP threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pagoda.config import EngineConfig, ModelConfig
from pagoda.layers.attention import AttentionBackend, BatchLayout
from pagoda.models import native_stack
from pagoda.parallel.layout import RankLayout
from pagoda.worker.kv_cache import KVCacheLayout, allocate_kv_cache, kv_bytes_per_token
from pagoda.worker.model_runner import ModelRunner

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _return_free_heap() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def can_measure(device: torch.device) -> bool:
    if device.type != "cpu" or not _STATUS.exists():
        return False
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def largest_step(engine: EngineConfig, prompt: int) -> BatchLayout:
    """Decodes first (max_num_seqs - 1 of one token, in blocks 0..), then one prompt chunk of `prompt` tokens in
    the blocks after them: every token has a slot of its own."""
    bs, decodes = engine.block_size, engine.max_num_seqs - 1
    prompt_blocks = -(-prompt // bs)
    tables = np.zeros((decodes + 1, prompt_blocks), dtype=np.int64)
    tables[:decodes, 0] = np.arange(decodes)
    tables[decodes] = decodes + np.arange(prompt_blocks)
    slots = np.concatenate([np.arange(decodes) * bs, decodes * bs + np.arange(prompt)])
    return BatchLayout(np.concatenate([np.arange(decodes + 1), [decodes + prompt]]).astype(np.int64),
                       np.array([1] * decodes + [prompt], dtype=np.int64), tables, decodes, bs,
                       torch.from_numpy(slots))


def measure_activation_peak(model: nn.Module, config: ModelConfig, engine: EngineConfig, backend: AttentionBackend,
                            kv_dtype: torch.dtype, rank: RankLayout) -> int | None:
    """The resident bytes the largest step adds on this rank (see the module doc), or None where it cannot be
    measured. Every rank of a parallel model calls it at the same point: the step's collectives pair up."""
    device = torch.device(engine.device)
    if not can_measure(device):
        return None
    prompt = min(engine.max_prefill_tokens, engine.context_for(config))  # no chunk outgrows the context served
    layout = largest_step(engine, prompt)
    tokens = int(layout.query_start[-1])
    blocks = int(layout.block_tables.max()) + 1
    caches = allocate_kv_cache(KVCacheLayout(blocks, engine.block_size, 0), config, kv_dtype, device, rank)
    stack, _ = native_stack.build(model, caches, backend)
    runner = ModelRunner(model, config, caches, engine.block_size, backend, device, stack)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=generator)
    positions = torch.from_numpy(np.concatenate([np.zeros(engine.max_num_seqs - 1, dtype=np.int64),
                                                 np.arange(prompt)]))
    dtype = next(model.parameters()).dtype
    hidden = None if rank.is_first_stage else torch.zeros(tokens, config.hidden_size, dtype=dtype)
    rows = torch.from_numpy(layout.query_start[1:] - 1)
    _return_free_heap()
    base = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")
    with torch.inference_mode():
        out = runner.forward(layout, ids, positions, hidden)
        if rank.is_last_stage:
            model.compute_logits(out[rows])
        del out
    peak = _status_bytes("VmHWM") - base
    written = tokens * kv_bytes_per_token(config, kv_dtype, rank)
    del runner, stack, caches
    _return_free_heap()
    return max(0, peak - written)
