"""Rotary frequencies for each `rope_scaling` type of a Hugging Face config, and the context each one reaches.

A rotary table is made once per model for the context the engine serves (`served`: its max_model_len), so every
key in the KV cache was rotated with the same frequencies whatever step computed it. Per type:
- default: base^(-2i/d).
- linear: frequencies / factor.
- llama3: long wavelengths divided by factor, short ones kept, a smooth ramp between (Llama 3.1+).
- yarn: a per-dimension blend of interpolated (/ factor) and original frequencies over the dimensions whose
  wavelength falls between beta_fast and beta_slow rotations of the original context, and cos/sin scaled by
  the attention factor (0.1 ln(factor) + 1 unless the config gives it). Static: the same as transformers.
- dynamic (NTK): base x (factor x L / max_pos - (factor - 1))^(d / (d - 2)) for L = the served context when it
  exceeds max_position_embeddings, else the default frequencies. transformers recomputes this from the running
  sequence length at every forward, so one sequence's keys would be rotated with different frequencies as it
  grows; like vLLM we fix L (vLLM at max_position_embeddings x factor, we at the context actually served, so a
  server that stays inside the original context computes exactly the default rotary).
- longrope (Phi-3 "su"): per-dimension divisors, `long_factor` when the served context exceeds
  original_max_position_embeddings, else `short_factor`, and cos/sin scaled by sqrt(1 + ln(factor) /
  ln(original)). transformers switches sets by the running length; we choose once, by the served context.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    return {"su": "longrope"}.get(kind, kind)


def context_length(max_position_embeddings: int, scaling: dict[str, Any] | None) -> int:
    """The longest context a config's rotary reaches: max_position_embeddings, extended by the scaling factor for
    linear, dynamic and yarn (from original_max_position_embeddings when the config gives it), as vLLM derives
    it; llama3 and longrope configs state their extended length in max_position_embeddings already."""
    kind = rope_type(scaling)
    if kind in ("linear", "dynamic"):
        return int(max_position_embeddings * scaling["factor"])
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings") or max_position_embeddings
        return max(max_position_embeddings, int(original * scaling["factor"]))
    return max_position_embeddings


def _default(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, base: float, scaling: dict[str, Any], max_position_embeddings: int,
          ) -> tuple[torch.Tensor, float]:
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension(rotations: float) -> float:  # the dimension whose wavelength makes `rotations` turns
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (high-frequency dimensions), 0: interpolated
    original_freq = _default(head_dim, base)
    return original_freq / factor * (1 - keep) + original_freq * keep, float(attention)


def _dynamic(head_dim: int, base: float, scaling: dict[str, Any], max_position_embeddings: int,
             served: int) -> torch.Tensor:
    if served <= max_position_embeddings:
        return _default(head_dim, base)
    factor = scaling["factor"]
    base = base * ((factor * served / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _default(head_dim, base)


def _longrope(head_dim: int, base: float, scaling: dict[str, Any], max_position_embeddings: int,
              served: int) -> tuple[torch.Tensor, float]:
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    divisors = scaling["long_factor"] if served > original else scaling["short_factor"]
    if len(divisors) != head_dim // 2:
        raise ValueError(f"longrope factors have {len(divisors)} entries, the rotary needs {head_dim // 2}")
    return _default(head_dim, base) / torch.tensor(divisors, dtype=torch.float64), float(attention)


def rope_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None, max_position_embeddings: int,
                     served: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in float64, factor on cos and sin) for a model serving `served`
    tokens."""
    kind = rope_type(scaling)
    if kind == "default":
        return _default(head_dim, base), 1.0
    if kind == "linear":
        return _default(head_dim, base) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(_default(head_dim, base), scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, scaling, max_position_embeddings)
    if kind == "dynamic":
        return _dynamic(head_dim, base, scaling, max_position_embeddings, served), 1.0
    if kind == "longrope":
        return _longrope(head_dim, base, scaling, max_position_embeddings, served)
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
