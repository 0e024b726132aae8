"""Read a GGUF file: its metadata as plain Python values and its tensors, memory-mapped."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: raw bytes (quantized) or values, in numpy order (slowest dimension first)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape in numpy order, e.g. (out_features, in_features) for a weight
    data: np.ndarray  # memory-mapped; uint8 blocks for quantized types


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = GGUFReader(str(self.path), "r")

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair, strings decoded and arrays as lists."""
        return {name: _field_value(field) for name, field in self._reader.fields.items()}

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def tensors(self) -> list[GGUFTensor]:
        out = []
        for t in self._reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            out.append(GGUFTensor(name=t.name, qtype=GGMLQuantizationType(t.tensor_type), shape=shape, data=t.data))
        return out


def _field_value(field: ReaderField) -> Any:
    """Like ReaderField.contents(), but fast for the long string and integer arrays of a vocabulary."""
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) > 1:
        element_type = field.types[1]
        if element_type == GGUFValueType.STRING:
            return [field.parts[i].tobytes().decode("utf-8", errors="replace") for i in field.data]
        if element_type != GGUFValueType.ARRAY and field.data:
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
        if not field.data:
            return []
    return field.contents()
