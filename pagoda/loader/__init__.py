"""Model loading: a GGUF file or a Hugging Face directory → config, weights, tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pagoda.config import ModelConfig


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]  # HF names, in the given dtype
    tokenizer: Tokenizer  # noqa: F821
    rope_freq_factors: torch.Tensor | None = None
    # GGUF only: the 2-D weights' stored blocks, (HF name, GGML type name, [rows, bytes per row]), for
    # quantization="gguf"
    raw_weights: Callable[[], Iterator[tuple[str, str, np.ndarray]]] | None = None


def open_checkpoint(path: str | Path) -> Checkpoint:
    from pagoda.tokenizer.tokenizer import Tokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from pagoda.loader.gguf_file import GGUFFile
        from pagoda.loader.gguf_loader import config_from_gguf, gguf_raw_weights, gguf_weights, rope_freq_factors

        gguf = GGUFFile(path)
        config = config_from_gguf(gguf)
        return Checkpoint(path, config, lambda dtype: gguf_weights(gguf, config, dtype),
                          Tokenizer.from_gguf_metadata(gguf.metadata), rope_freq_factors(gguf),
                          lambda: gguf_raw_weights(gguf, config))
    if path.is_dir():
        from pagoda.loader.hf_loader import hf_weights, read_config

        config = read_config(path)
        return Checkpoint(path, config, lambda dtype: hf_weights(path, dtype), Tokenizer.from_hf_dir(path))
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
