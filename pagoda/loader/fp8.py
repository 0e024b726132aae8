"""FP8 (e4m3) checkpoints: linear weights stored as float8_e4m3fn with scales, in the layouts vLLM reads.

- llm-compressor / compressed-tensors (`quantization_config.quant_method` "compressed-tensors", a config group
  whose weights are `{"type": "float", "num_bits": 8}`): `<layer>.weight_scale` per tensor (strategy "tensor",
  one value), per output channel ("channel", [N, 1]) or per block ("block", [N / bn, K / bk] for
  `block_structure` [bn, bk]); value = fp8 x scale.
- Hugging Face / vLLM "fp8" (`quant_method` "fp8", e.g. Qwen3-FP8, DeepSeek-V3): `<layer>.weight_scale_inv`, per
  block of `weight_block_size` [bn, bk], or a single value without a block size; value = fp8 x scale_inv (the
  name notwithstanding, it multiplies).

The weights are dequantized when the model loads, slice by slice, to the engine's dtype (fp32, or bf16 with
`--dtype bfloat16`; `--quantization int8` requantizes them to int8 blocks), so the arithmetic is the engine's best
type on this CPU and no fp8 matrix unit is needed. Static activation scales (`input_scale`) are calibration for
fp8 activations; the engine keeps activations in its own dtype, so they are not needed and are skipped (logged).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from pagoda.loader.tensors import Range, TensorSource

logger = logging.getLogger("pagoda")


@dataclass(frozen=True)
class FP8Scheme:
    scale_suffix: str  # "weight_scale" or "weight_scale_inv"
    block: tuple[int, int] | None  # [rows, columns] a scale covers; None: per tensor or per channel (its shape)
    ignore: tuple[str, ...] = ()  # modules left unquantized (informational: they carry no scale)


def fp8_scheme(config: dict[str, Any]) -> FP8Scheme | None:
    """The FP8 layout a config.json declares; None without a quantization_config. Raises ValueError for a
    quantization this loader cannot read (GPTQ, AWQ, int8 groups, fp8 KV-cache scales, ...)."""
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8 checkpoints in format {q.get('fmt')!r} are not supported (only e4m3)")
        block = q.get("weight_block_size")
        return FP8Scheme("weight_scale_inv", tuple(block) if block else None,
                         tuple(q.get("modules_to_not_convert") or ()))
    if method == "compressed-tensors":
        if q.get("kv_cache_scheme"):
            raise ValueError("checkpoints with a quantized KV-cache scheme are not supported; use "
                             "--kv-cache-dtype on an unquantized cache instead")
        groups = list((q.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if not weights or any(w.get("type") != "float" or w.get("num_bits") != 8 for w in weights):
            raise ValueError(f"compressed-tensors checkpoints are supported for fp8 (float, 8-bit) weights only; "
                             f"this one has {weights}")
        strategies = {w.get("strategy", "tensor") for w in weights}
        if len(strategies) != 1 or not strategies <= {"tensor", "channel", "block"}:
            raise ValueError(f"fp8 weight strategy {sorted(strategies)} is not supported (tensor, channel, block)")
        block = weights[0].get("block_structure") if strategies == {"block"} else None
        if strategies == {"block"} and not block:
            raise ValueError("an fp8 'block' strategy needs its block_structure")
        return FP8Scheme("weight_scale", tuple(block) if block else None, tuple(q.get("ignore") or ()))
    raise ValueError(f"quantization method {method!r} of this checkpoint is not supported; Pagoda reads fp8 "
                     "(compressed-tensors or quant_method fp8) Hugging Face checkpoints and GGUF files")


class FP8Source(TensorSource):
    """An fp8 weight and its scale, read as their product (by slice: only the rows/columns asked are widened)."""

    def __init__(self, weight: TensorSource, scale: TensorSource, block: tuple[int, int] | None):
        if len(weight.shape) != 2:
            raise ValueError(f"an fp8 weight must be a matrix, got shape {weight.shape}")
        self.weight, self.scale_source, self.scale_block = weight, scale, block
        self.shape = weight.shape
        rows, cols = weight.shape
        expected = ((math.ceil(rows / block[0]), math.ceil(cols / block[1])) if block else None)
        scale_shape = tuple(scale.shape)
        if block is not None and scale_shape != expected:
            raise ValueError(f"fp8 block scales have shape {scale_shape}, expected {expected} for a {rows}x{cols} "
                             f"weight in {block[0]}x{block[1]} blocks")
        if block is None and math.prod(scale_shape) not in (1, rows):
            raise ValueError(f"fp8 scales of shape {scale_shape} fit neither a tensor nor its {rows} channels")

    def read(self, dtype: torch.dtype, rows: Range = None, cols: Range = None) -> torch.Tensor:
        r0, r1 = rows or (0, self.shape[0])
        c0, c1 = cols or (0, self.shape[1])
        w = self.weight.read(torch.float32, (r0, r1), (c0, c1))
        if self.scale_block is None:
            scale = self.scale_source.read(torch.float32).reshape(-1)
            s = scale.reshape(1, 1) if scale.numel() == 1 else scale[r0:r1].reshape(-1, 1)
        else:
            bn, bk = self.scale_block
            s = self.scale_source.read(torch.float32, (r0 // bn, (r1 - 1) // bn + 1), (c0 // bk, (c1 - 1) // bk + 1))
            top, left = r0 - (r0 // bn) * bn, c0 - (c0 // bk) * bk  # where the slice starts in its first block
            s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[top:top + r1 - r0, left:left + c1 - c0]
        return (w * s).to(dtype)


def dequantizing(tensors: dict[str, TensorSource], scheme: FP8Scheme) -> dict[str, TensorSource]:
    """The checkpoint's tensors with every fp8 weight replaced by its dequantizing source and the scales
    consumed. A weight stored in fp8 without a scale is an error (its values would be off by the scale)."""
    out: dict[str, TensorSource] = {}
    skipped_inputs = 0
    for name, source in tensors.items():
        if name.endswith("." + scheme.scale_suffix):
            continue
        if name.endswith(".input_scale"):
            skipped_inputs += 1
            continue
        scale = tensors.get(name.removesuffix(".weight") + "." + scheme.scale_suffix) if name.endswith(
            ".weight") else None
        if scale is not None:
            out[name] = FP8Source(source, scale, scheme.block)
        elif getattr(source, "stored_dtype", "").startswith("F8"):
            raise ValueError(f"fp8 tensor {name!r} has no {scheme.scale_suffix}")
        else:
            out[name] = source
    if skipped_inputs:
        logger.info("fp8 checkpoint: %d static activation scales not used (activations stay in the engine's "
                    "dtype)", skipped_inputs)
    return out
