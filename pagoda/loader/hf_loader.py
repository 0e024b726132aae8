"""Hugging Face model directory → (ModelConfig, weights): config.json and memory-mapped *.safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from pagoda.config import ModelConfig
from pagoda.loader.tensors import SafetensorsSource, TensorSource


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    return ModelConfig.from_hf_config(json.loads(path.read_text()))


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
    """Every tensor as a lazy source; a file stays open (memory-mapped) while its tensors are handed out."""
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield _canonical_name(name), SafetensorsSource(f, name)


def _canonical_name(name: str) -> str:
    """Multimodal checkpoints nest the text model one level deeper; we serve the text model only."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name
