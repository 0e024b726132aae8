"""Checkpoint tensors read lazily and by slice: a rank reads only the rows or columns it holds.

A TensorSource is one tensor of a checkpoint, in Hugging Face's naming and layout (llama.cpp's q/k row
permutation undone, Gemma's norm offset removed). `read(dtype, rows, cols)` materialises just that slice: from
a memory-mapped safetensors file through its slicing API, from a GGUF file by dequantizing only the blocks the
slice touches. `raw(rows, cols)` hands a GGUF tensor's stored blocks for the slice, for the kernels that compute
on them (layers/quantized.py), when the slice is whole blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from pagoda.loader.dequant import dequantize
from pagoda.loader.gguf_file import GGUFTensor

Range = tuple[int, int] | None
READ_ELEMENTS = 1 << 22  # values dequantized at a time by GGUFSource.read (16 MiB of fp32)


class TensorSource(ABC):
    shape: tuple[int, ...]

    @abstractmethod
    def read(self, dtype: torch.dtype, rows: Range = None, cols: Range = None) -> torch.Tensor:
        """The tensor's rows [r0, r1) x columns [c0, c1) (None: all) in `dtype`."""

    def raw(self, rows: Range = None, cols: Range = None) -> tuple[str, np.ndarray] | None:
        """(GGML type name, stored blocks [rows, bytes per row]) of the slice, or None when there are none (not a
        GGUF tensor, or a column range that cuts through blocks)."""
        return None


class SafetensorsSource(TensorSource):
    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.stored_dtype = self._slice.get_dtype()  # safetensors' name: "F32", "BF16", "F8_E4M3", ...

    def read(self, dtype: torch.dtype, rows: Range = None, cols: Range = None) -> torch.Tensor:
        r = slice(*rows) if rows else slice(None)
        if len(self.shape) == 1:
            return self._slice[r].to(dtype)
        c = slice(*cols) if cols else slice(None)
        return self._slice[r, c].to(dtype)


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row permutation (interleaved rotary pairs → rotate-half halves), head by head."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource(TensorSource):
    """`head_rows`: llama.cpp permuted the rows of each head of this many rows (q/k of the llama architecture);
    slices must then start and end at head boundaries. `offset`: subtracted after reading (Gemma norms)."""

    def __init__(self, tensor: GGUFTensor, head_rows: int | None = None, offset: float = 0.0):
        self.tensor = tensor
        self.shape = tensor.shape
        self.head_rows = head_rows
        self.offset = offset
        self.block, self.type_size = GGML_QUANT_SIZES[tensor.qtype]
        self.quantized = tensor.data.dtype == np.uint8 and tensor.qtype.name not in ("I8",)

    def _rows(self, rows: Range) -> tuple[int, int]:
        r0, r1 = rows or (0, self.shape[0])
        if self.head_rows and (r0 % self.head_rows or r1 % self.head_rows):
            raise ValueError(f"{self.tensor.name}: rows [{r0}, {r1}) cut through a head of {self.head_rows} rows")
        return r0, r1

    def _fix_rows(self, w: torch.Tensor) -> torch.Tensor:
        return _unpermute(w, w.shape[0] // self.head_rows) if self.head_rows else w

    def read(self, dtype: torch.dtype, rows: Range = None, cols: Range = None) -> torch.Tensor:
        t = self.tensor
        if len(self.shape) == 1:
            r0, r1 = self._rows(rows)
            w = dequantize(t.data, t.qtype, self.shape)[r0:r1]  # 1-D tensors (norms, biases) are small
            w = self._fix_rows(w)
            return (w - self.offset if self.offset else w).to(dtype)
        r0, r1 = self._rows(rows)
        c0, c1 = cols or (0, self.shape[1])
        b0, b1 = c0 // self.block * self.block, -(-c1 // self.block) * self.block  # whole blocks around the slice
        byte0, byte1 = ((b0 // self.block * self.type_size, b1 // self.block * self.type_size) if self.quantized
                        else (b0, b1))
        out = torch.empty(r1 - r0, c1 - c0, dtype=dtype)
        step = max(self.head_rows or 1, READ_ELEMENTS // (b1 - b0) // (self.head_rows or 1) * (self.head_rows or 1))
        for s0 in range(r0, r1, step):  # a bounded slice at a time: the fp32 temporaries stay small
            s1 = min(r1, s0 + step)
            w = dequantize(np.ascontiguousarray(t.data[s0:s1, byte0:byte1]), t.qtype, (s1 - s0, b1 - b0))
            w = self._fix_rows(w[:, c0 - b0:c1 - b0])
            out[s0 - r0:s1 - r0] = w - self.offset if self.offset else w
        return out

    def raw(self, rows: Range = None, cols: Range = None) -> tuple[str, np.ndarray] | None:
        if len(self.shape) != 2:
            return None
        r0, r1 = self._rows(rows)
        c0, c1 = cols or (0, self.shape[1])
        if c0 % self.block or (c1 % self.block and c1 != self.shape[1]):
            return None
        t = self.tensor
        unit = self.type_size if self.quantized else np.dtype(t.data.dtype).itemsize
        blocks = np.asarray(t.data[r0:r1]).view(np.uint8)[:, c0 // self.block * unit: -(-c1 // self.block) * unit]
        if self.head_rows:  # the permutation moves whole rows: exact for any block type
            blocks = _unpermute(torch.from_numpy(np.array(blocks)), (r1 - r0) // self.head_rows).numpy()
        return t.qtype.name, blocks
