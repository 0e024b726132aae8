"""Read a GGUF file: its metadata as plain Python values and its tensors, memory-mapped.

A small parser of our own: gguf's GGUFReader builds an object per array element and takes seconds on a
vocabulary of 50k tokens; this reads the same file in tens of milliseconds. Tensor data is handed out in the
layout GGUFReader uses (and gguf.quants / our dequantizer expect): typed arrays for F32/F16/F64 and integer
types, uint8 [rows, bytes per row] for quantized types and BF16.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_TYPED = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: raw bytes (quantized) or values, in numpy order (slowest dimension first)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in numpy order, e.g. (out_features, in_features) for a weight
    data: np.ndarray  # memory-mapped, read-only


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(4) != _MAGIC:
                raise ValueError(f"{self.path} is not a GGUF file")
            version, num_tensors, num_kv = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                raise ValueError(f"{self.path}: GGUF version {version} is too old (need 2 or later)")
            self.metadata: dict[str, Any] = {}
            for _ in range(num_kv):
                key = _read_string(f)
                self.metadata[key] = _read_value(f, struct.unpack("<I", f.read(4))[0])
            infos = []
            for _ in range(num_tensors):
                name = _read_string(f)
                (n_dims,) = struct.unpack("<I", f.read(4))
                dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                qtype, offset = struct.unpack("<IQ", f.read(12))
                infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
            alignment = int(self.metadata.get("general.alignment", 32))
            data_start = -(-f.tell() // alignment) * alignment
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._tensors = [self._tensor(name, shape, qtype, data_start + offset) for name, shape, qtype, offset in infos]

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def tensors(self) -> list[GGUFTensor]:
        return list(self._tensors)

    def _tensor(self, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, start: int) -> GGUFTensor:
        count = int(np.prod(shape)) if shape else 1
        if qtype in _TYPED:
            dtype = np.dtype(_TYPED[qtype])
            data = self._map[start:start + count * dtype.itemsize].view(dtype).reshape(shape)
        else:
            block, type_size = GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * type_size
            data = self._map[start:start + count // block * type_size].reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, qtype, shape, data)


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype == _STRING:
            return [_read_string(f) for _ in range(count)]
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype])
            return np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype).tolist()
        return [_read_value(f, etype) for _ in range(count)]
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
