"""Model loading: a GGUF file or a Hugging Face directory → config, weights, tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.config import ModelConfig


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]  # HF names, in the given dtype
    tokenizer: "Tokenizer"  # noqa: F821
    rope_freq_factors: torch.Tensor | None = None


def open_checkpoint(path: str | Path) -> Checkpoint:
    from pagoda.tokenizer.tokenizer import Tokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from pagoda.loader.gguf_file import GGUFFile
        from pagoda.loader.gguf_loader import config_from_gguf, gguf_weights, rope_freq_factors

        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        return Checkpoint(path, config, lambda dtype: gguf_weights(gguf, config, dtype),
                          Tokenizer.from_gguf_metadata(gguf.metadata), rope_freq_factors(gguf))
    if path.is_dir():
        from pagoda.loader.hf_loader import hf_weights, read_config

        config = read_config(path)
        return Checkpoint(path, config, lambda dtype: hf_weights(path, dtype), Tokenizer.from_hf_dir(path))
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
