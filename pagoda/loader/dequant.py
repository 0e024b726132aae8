"""Dequantize GGUF tensor data to float32 torch tensors, vectorized in torch (no loops over blocks).

Owns the GGML block layouts (as in ggml-quants.c / gguf.quants): each `_<type>` function takes the raw
bytes as a uint8 tensor of shape [n_blocks, type_size] and returns float32 values of shape
[n_blocks, block_size]. Results are bit-identical to `gguf.quants.dequantize` (same float32 operations
in the same order, no fused multiply-add); the one exception is F16 signalling NaNs, which come back quiet.
Speed (SmolLM2-135M Q4_1, 2 cores, best of 7): token_embd Q8_0 52 ms vs gguf 156 ms; all 272 tensors 0.13 s vs 1.0 s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.constants import QK_K

_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of each block -> float32 of shape [n_blocks, 1]."""
    return b.view(torch.float16)[:, offset // 2 : offset // 2 + 1].float()


def _fields(b: torch.Tensor, width: int) -> torch.Tensor:
    """Bytes [..., m] -> uint8 [..., 8 // width, m]: row k holds bits [k*width, (k+1)*width) of each byte.

    Works on four bytes at a time through an int32 view (m must be a multiple of 4)."""
    x = b.contiguous().view(torch.int32)
    mask = int.from_bytes(bytes([(1 << width) - 1] * 4), "little")
    return torch.stack([(x >> s) & mask for s in range(0, 8, width)], dim=-2).view(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _fields(b[:, 2:], 4).reshape(-1, 32).view(torch.int8).sub_(8)
    return q.float().mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _fields(b[:, 4:], 4).reshape(-1, 32)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_quants(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 32 high bits (little-endian uint32, bit j -> element j) + nibbles -> uint8 in [0, 32)."""
    nib = (qh.contiguous().view(torch.int32) >> _NIBBLE_SHIFTS).bitwise_and_(0xF)  # [n, 8]: bits 4i..4i+3
    # v * 0x02040810 = v<<4 + v<<11 + v<<18 + v<<25 (no overlap): bit i of v lands on bit 4 of byte i.
    high = nib.mul_(0x02040810).bitwise_and_(0x10101010).view(torch.uint8)
    return _fields(qs, 4).reshape(-1, 32).bitwise_or_(high)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _q5_quants(b[:, 2:6], b[:, 6:]).view(torch.int8).sub_(16)
    return q.float().mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _q5_quants(b[:, 4:8], b[:, 8:])
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, d, dmin = b[:, :16].contiguous(), _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    # 16 6-bit scales: low 4 bits from bytes 0..7 (low nibbles, then high), high 2 bits from bytes 8..11.
    low, high = _fields(b[:, 96:104], 4).reshape(n, 16), _fields(b[:, 104:108], 2).reshape(n, 16)
    sc = low.bitwise_or_(high << 4).view(torch.int8).sub_(32)
    dl = (_f16(b, 108) * sc.float()).unsqueeze(-1)
    ql = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    hm = _fields(b[:, :32], 1).reshape(n, 16, 16)
    q = ql.bitwise_or_(hm << 2).view(torch.int8).sub_(4)  # = ql - 4 where the hmask bit is clear
    return q.float().mul_(dl).reshape(n, QK_K)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, as float32 [n, 8, 1].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    d, m, md = s.contiguous().view(torch.int32).unbind(1)  # four bytes at a time
    lo6, lo4, hi2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
    parts = (d & lo6, (md & lo4) | ((d >> 2) & hi2), m & lo6, ((md >> 4) & lo4) | ((m >> 2) & hi2))
    both = torch.stack(parts, dim=1).view(torch.uint8).float()  # [n, 16]: 8 scales, 8 mins
    return both[:, :8].unsqueeze(-1), both[:, 8:].unsqueeze(-1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl, ml = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn
    q = _fields(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl, ml = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn
    q = _fields(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    q.bitwise_or_(_fields(b[:, 16:48], 1) << 4)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    low = _fields(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = low.bitwise_or_(high << 4).view(torch.int8).sub_(32)
    return q.float().reshape(n, 16, 16).mul_(dl).reshape(n, QK_K)


_FLOAT: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: lambda b: b.view(torch.float32).clone(),
    T.F16: lambda b: b.view(torch.float16).float(),
    T.BF16: lambda b: b.view(torch.bfloat16).float(),  # exact: bf16 -> f32 is a 16-bit shift
}
_BLOCKS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
SUPPORTED_TYPES: frozenset[T] = frozenset(_FLOAT) | frozenset(_BLOCKS)


def _raw_bytes(data: np.ndarray) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 torch tensor sharing memory with `data` (read, never written)."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # the mmap is read-only; we only read from it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(raw)


def dequantize(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF tensor data (as GGUFReader gives it) -> float32 tensor of `shape` (numpy order, slowest first).

    The result owns its memory (it never aliases `data`, so it outlives the file's memory map)."""
    qtype = T(qtype)
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"cannot dequantize GGML type {qtype.name}; supported types: {names}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = _raw_bytes(data)
    row = shape[-1] if shape else 1
    if row % block_size or raw.numel() != math.prod(shape) // block_size * type_size:
        raise ValueError(f"{raw.numel()} bytes of {qtype.name} data do not hold a tensor of shape {shape}")
    if qtype in _FLOAT:
        return _FLOAT[qtype](raw).reshape(shape)
    return _BLOCKS[qtype](raw.reshape(-1, type_size)).reshape(shape)
