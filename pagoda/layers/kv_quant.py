"""8-bit KV-cache rows in torch: the oracle of the native kernels' codes (kernels/paged_attention.cpp).

A row is one token's keys (or values) of one KV head: D values stored as D codes and then the row's fp32 scale
(4 bytes), in a tensor of the cache's dtype with a last dimension of D + 4. scale = max|x| / code_max (127 for
int8, 448 for fp8 e4m3, 57344 for fp8 e5m2; 0 for a zero row, whose codes are 0); codes = x / scale rounded to
nearest even (int8: torch.round, clamped to +-127; fp8: torch's conversion); value = code x scale. A scale per row
keeps each head's dynamic range: the relative error of a value is at most 2^-8 of its row's largest (int8), or
2^-4 (e4m3) / 2^-3 (e5m2) of itself.
"""

from __future__ import annotations

import torch

CODE_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # the 8-bit cache dtypes
SCALE_BYTES = 4


def kv_row(dtype: torch.dtype, head_dim: int) -> int:
    """Elements of one KV row (a token's KV head) in a cache of `dtype`: D, or D + 4 for 8-bit codes (D + 4 bytes,
    a little over half of fp16's 2 D)."""
    return head_dim + SCALE_BYTES if dtype in CODE_MAX else head_dim


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] (any float dtype; computed in fp32) -> rows [..., D + 4] of `dtype`: codes, then the scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / CODE_MAX[dtype]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.where(scale > 0, x / safe, torch.zeros_like(x))
    codes = y.round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else y.to(dtype)
    out = torch.empty(*x.shape[:-1], x.shape[-1] + 4, dtype=torch.uint8)
    out[..., :-4] = codes.view(torch.uint8)
    out[..., -4:] = scale.contiguous().view(torch.uint8)
    return out.view(dtype)


def dequantize_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """rows [..., D + 4] of an 8-bit cache dtype -> values [..., D] in fp32."""
    raw = rows.view(torch.uint8)
    scale = raw[..., head_dim:].contiguous().view(torch.float32)
    return raw[..., :head_dim].view(rows.dtype).float() * scale
