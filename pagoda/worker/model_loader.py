"""Builds a ready model from a checkpoint path: weights loaded in the chosen dtype, KV cache allocated."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagoda.config import CacheConfig, ModelConfig
from pagoda.layers import native_stack
from pagoda.layers.attention import AttentionBackend
from pagoda.layers.attention_select import create_backend
from pagoda.layers.quantized import check_quantization, quantize_model, resolve_quantization
from pagoda.loader import open_checkpoint
from pagoda.models.registry import model_class
from pagoda.worker.kv_cache import KVCacheLayout, allocate_kv_cache, plan_kv_cache, resolve_kv_cache_dtype

logger = logging.getLogger("pagoda")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer  # noqa: F821
    kv_layout: KVCacheLayout
    kv_caches: list[torch.Tensor]
    backend: AttentionBackend


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(checkpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = model_class(checkpoint.config)
    with torch.device(device), _default_dtype(dtype):
        model = cls(checkpoint.config, checkpoint.rope_freq_factors)
    model.load_weights(checkpoint.weights(dtype))
    return model.eval()


def load_model(path: Path, dtype: torch.dtype, device: torch.device, cache: CacheConfig,
               progress: bool = False, attention_backend: str = "auto",
               quantization: str | None = "auto") -> LoadedModel:
    kv_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype, device)
    backend = create_backend(attention_backend, device, kv_dtype)  # first: a bad choice fails before any loading
    if quantization != "auto":
        check_quantization(quantization, device)  # a bad choice fails before any loading
    checkpoint = open_checkpoint(path)
    quantization = resolve_quantization(quantization, device, dtype, checkpoint.raw_weights is not None)
    model = build_model(checkpoint, dtype, device)
    if quantization is not None:
        quantize_model(model, quantization, checkpoint.raw_weights() if checkpoint.raw_weights else None)
    layout = plan_kv_cache(checkpoint.config, cache, kv_dtype)
    kv_caches = allocate_kv_cache(layout, checkpoint.config, kv_dtype, device)
    if quantization is not None:
        native_stack.attach(model, kv_caches, backend)
    return LoadedModel(model, checkpoint.config, checkpoint.tokenizer, layout, kv_caches, backend)
