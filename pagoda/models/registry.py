"""Architecture name -> model class. One file per architecture."""

from __future__ import annotations

import importlib

from torch import nn

from pagoda.config import ModelConfig

_CLASSES = {
    "llama": ("pagoda.models.llama", "LlamaForCausalLM"),
    "qwen3": ("pagoda.models.qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("pagoda.models.gemma3", "Gemma3ForCausalLM"),
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    module, name = _CLASSES[config.architecture]
    return getattr(importlib.import_module(module), name)
