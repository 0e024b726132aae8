"""Fast CPU attention backend: the native kernel `pagoda/kernels/paged_attention.cpp` over the paged KV cache.

It owns the glue between a step and the kernel: the step's metadata (contiguous int64 tensors and their raw
addresses, built once per step and shared by every layer) and the per-layer call (write k, v into the cache,
then decode and prefill attention read the context in place through the block tables, with no gather).
Semantics are the reference backend's (attention_reference.py), which is the oracle in the tests.

The kernel computes in fp32 over an fp32, fp16, bf16, int8 or fp8 KV cache (KV_DTYPES; fp16 and bf16 rows are
widened on load, new rows rounded to nearest even, as torch's .to(torch.float16) and .to(torch.bfloat16); 8-bit
rows carry their scale, layers/kv_quant.py, whose codes the kernel reproduces). q, k, v of
another dtype are converted to fp32 (and the output back); a cache of another dtype is not supported here:
attention_select.py picks the reference backend for it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from pagoda import kernels
from pagoda.layers.attention import Attention, AttentionBackend, BatchLayout
from pagoda.layers.kv_quant import kv_row

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# KV cache dtypes the kernel reads, and the code it knows each by.
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3, torch.float8_e4m3fn: 4,
             torch.float8_e5m2: 5}

_ARGTYPES = {
    # k, k_stride, v, v_stride, slots, num_tokens, kv_heads, head_dim, k_cache, v_cache, kv_dtype
    "paged_cache_write": [_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _P, _P, _I64],
    # q, q_stride, out, out_stride, k_cache, v_cache, kv_dtype, block_tables, table_stride, context_lens,
    # num_seqs, num_heads, num_kv_heads, head_dim, block_size, window, scale, num_threads
    "paged_attention_decode": [_P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                               _F32, _INT],
    # as decode, with query_start, first, last instead of num_seqs
    "paged_attention_prefill": [_P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64,
                                _I64, _I64, _F32, _INT],
}


def load_kernel() -> ctypes.CDLL:
    """The compiled kernel with its signatures declared. Raises kernels.KernelBuildError."""
    lib = kernels.load("paged_attention")
    for name, argtypes in _ARGTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@dataclass
class CpuMetadata:
    """One step's batch for the kernel. The *_ptr fields are addresses into the tensors held here, so they stay
    valid for as long as this object lives (the whole step)."""

    num_tokens: int
    num_decodes: int
    num_requests: int
    block_size: int
    table_stride: int
    num_threads: int
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, table_stride] int64
    context_lens: torch.Tensor  # [B] int64
    query_start: torch.Tensor  # [B + 1] int64
    slots_ptr: int = 0
    tables_ptr: int = 0
    lens_ptr: int = 0
    starts_ptr: int = 0

    def __post_init__(self) -> None:
        self.slots_ptr = self.slot_mapping.data_ptr()
        self.tables_ptr = self.block_tables.data_ptr()
        self.lens_ptr = self.context_lens.data_ptr()
        self.starts_ptr = self.query_start.data_ptr()


def _int64(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device="cpu", dtype=torch.int64).contiguous()
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _fp32_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] as fp32 with each token's heads packed (stride D, then 1); any token stride is fine, so
    the q, k, v views of a fused projection pass through without a copy."""
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


class CpuPagedBackend(AttentionBackend):
    def __init__(self):
        self.lib = load_kernel()

    def build_metadata(self, layout: BatchLayout, windows: set[int | None]) -> CpuMetadata:
        tables = _int64(layout.block_tables)
        return CpuMetadata(
            num_tokens=int(layout.query_start[-1]), num_decodes=layout.num_decodes,
            num_requests=len(layout.context_lens), block_size=layout.block_size, table_stride=tables.shape[1],
            num_threads=torch.get_num_threads(), slot_mapping=_int64(layout.slot_mapping), block_tables=tables,
            context_lens=_int64(layout.context_lens), query_start=_int64(layout.query_start))

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, md: CpuMetadata) -> torch.Tensor:
        # The kernel indexes the cache as [2, num_slots, Hkv, row], densely packed: check before touching it.
        if kv_cache.dtype not in KV_DTYPES or not kv_cache.is_contiguous() or not kv_cache.is_cpu:
            raise ValueError(f"the cpu attention backend needs a contiguous fp32, fp16, bf16, int8 or fp8 KV cache in "
                             f"CPU memory, got {kv_cache.dtype} on {kv_cache.device}")
        out_dtype = q.dtype
        q, k, v = _fp32_rows(q), _fp32_rows(k), _fp32_rows(v)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        if num_tokens != md.num_tokens or kv_cache.shape[2:] != (num_kv_heads, kv_row(kv_cache.dtype, head_dim)):
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and the KV cache {tuple(kv_cache.shape)} "
                             f"do not match the step ({md.num_tokens} tokens)")
        lib = self.lib
        kv_dtype = KV_DTYPES[kv_cache.dtype]
        k_cache = kv_cache.data_ptr()
        v_cache = k_cache + kv_cache.stride(0) * kv_cache.element_size()
        lib.paged_cache_write(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), md.slots_ptr, num_tokens,
                              num_kv_heads, head_dim, k_cache, v_cache, kv_dtype)
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32)
        window = layer.sliding_window or 0
        row = num_heads * head_dim
        if md.num_decodes:
            lib.paged_attention_decode(q.data_ptr(), q.stride(0), out.data_ptr(), row, k_cache, v_cache, kv_dtype,
                                       md.tables_ptr, md.table_stride, md.lens_ptr, md.num_decodes, num_heads,
                                       num_kv_heads, head_dim, md.block_size, window, layer.scale, md.num_threads)
        if md.num_decodes < md.num_requests:
            lib.paged_attention_prefill(q.data_ptr(), q.stride(0), out.data_ptr(), row, k_cache, v_cache, kv_dtype,
                                        md.tables_ptr, md.table_stride, md.lens_ptr, md.starts_ptr, md.num_decodes,
                                        md.num_requests, num_heads, num_kv_heads, head_dim, md.block_size, window,
                                        layer.scale, md.num_threads)
        out = out.view(num_tokens, row)
        return out if out_dtype == torch.float32 else out.to(out_dtype)
