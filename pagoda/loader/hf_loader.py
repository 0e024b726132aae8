"""Hugging Face model directory → (ModelConfig, weights): config.json and memory-mapped *.safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

from pagoda.config import ModelConfig
from pagoda.loader.fp8 import dequantizing, fp8_scheme
from pagoda.loader.tensors import SafetensorsSource, TensorSource


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    raw = json.loads(path.read_text())
    fp8_scheme(raw)  # a quantization this loader cannot read fails here, before any weight is touched
    return ModelConfig.from_hf_config(raw)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors weights")
    return files


def hf_tensors(directory: Path) -> Iterator[tuple[str, TensorSource]]:
    """Every tensor as a lazy source; a file stays open (memory-mapped) while its tensors are handed out. An fp8
    checkpoint's weights come out dequantized (loader/fp8.py)."""
    scheme = fp8_scheme(json.loads((directory / "config.json").read_text()))
    if scheme is None:
        for path in safetensors_files(directory):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield _canonical_name(name), SafetensorsSource(f, name)
        return
    # a weight's scale may sit in another shard: open every shard (memory-mapped) for the whole pass
    with ExitStack() as files:
        sources = {}
        for path in safetensors_files(directory):
            f = files.enter_context(safe_open(str(path), framework="pt"))
            sources.update({_canonical_name(name): SafetensorsSource(f, name) for name in f.keys()})
        yield from dequantizing(sources, scheme).items()


def _canonical_name(name: str) -> str:
    """Multimodal checkpoints nest the text model one level deeper; we serve the text model only."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name
