"""Stateless building blocks shared by the model files: norms, rotary embeddings, activations."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers.rope import rope_frequencies


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, or * (1 + w) for Gemma, computed in float32 like the reference models."""

    def __init__(self, dim: int, eps: float, add_unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps
        self.add_unit_offset = add_unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        weight = self.weight.float() + 1.0 if self.add_unit_offset else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half (NeoX) layout, from a cos/sin table made once for `positions`
    positions (the context served); `scaling` is a config's rope_scaling (layers/rope.py), resolved against the
    model's max_position_embeddings (default: `positions`)."""

    def __init__(self, head_dim: int, positions: int, base: float, scaling: dict[str, Any] | None = None,
                 freq_factors: torch.Tensor | None = None, max_position_embeddings: int | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(head_dim, base, scaling, max_position_embeddings or positions,
                                                      positions)
        if freq_factors is not None:  # GGUF stores llama3 scaling as per-frequency divisors
            inv_freq = inv_freq / freq_factors.double()
        angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", (angles.cos() * attention_factor).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * attention_factor).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]; positions: [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for a fused [.., 2 * I] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    if act == "silu":
        return F.silu(gate) * up
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh") * up
    if act == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"activation {act!r} is not supported")
