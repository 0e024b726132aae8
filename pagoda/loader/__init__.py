"""Model loading: a GGUF file or a Hugging Face directory → config, lazy tensors, tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.config import ModelConfig
from pagoda.loader.tensors import TensorSource


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    tensors: Callable[[], Iterator[tuple[str, TensorSource]]]  # HF names; each read by slice on demand
    tokenizer: Tokenizer  # noqa: F821
    rope_freq_factors: torch.Tensor | None = None
    is_gguf: bool = False  # its sources hand out stored blocks (TensorSource.raw), for quantization="gguf"

    def sources(self) -> dict[str, TensorSource]:
        """Name -> source, for random access (the GGUF quantizer). Cheap: nothing is read yet."""
        return dict(self.tensors())

    def block_size(self) -> int:
        """The largest quantization block of its tensors (1 for plain float tensors): tensor-parallel splits
        align to it, so a rank's slice of a quantized tensor is whole blocks."""
        return max((getattr(s, "block", 1) for _, s in self.tensors()), default=1)


def open_checkpoint(path: str | Path) -> Checkpoint:
    from pagoda.tokenizer.tokenizer import Tokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from pagoda.loader.gguf_file import GGUFFile
        from pagoda.loader.gguf_loader import config_from_gguf, gguf_tensors, rope_freq_factors

        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        return Checkpoint(path, config, lambda: gguf_tensors(gguf, config),
                          Tokenizer.from_gguf_metadata(gguf.metadata), rope_freq_factors(gguf), is_gguf=True)
    if path.is_dir():
        from pagoda.loader.hf_loader import hf_tensors, read_config

        config = read_config(path)
        return Checkpoint(path, config, lambda: hf_tensors(path), Tokenizer.from_hf_dir(path))
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
