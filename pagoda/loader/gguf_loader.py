"""GGUF → (ModelConfig, Hugging Face-named lazy tensors). Tensors are dequantized slice by slice, at load.

llama.cpp renames every tensor and, for the `llama` architecture, permutes the rows of attn_q / attn_k so
that its interleaved rotary matches; we undo that permutation and use the rotate-half rotary everywhere.
Gemma files store RMSNorm weights as (1 + w); we subtract the 1 again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pagoda.config import ModelConfig
from pagoda.loader.gguf_file import GGUFFile
from pagoda.loader.tensors import GGUFSource, TensorSource

# GGUF architecture -> HF model_type
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# The norm after attention is the MLP's input norm in Llama, but Gemma has four norms per layer.
_NORMS = {
    "default": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors that are not weights (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.match(gguf_name)
    if m is None:
        return None
    layer, part, kind = m.groups()
    names = {**_LAYER_NAMES, **_NORMS.get(arch, _NORMS["default"])}
    if part not in names:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not understood for architecture {arch!r}")
    return f"model.layers.{layer}.{names[part]}.{kind}"


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    meta = gguf.metadata
    arch = gguf.architecture
    if arch not in MODEL_TYPES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    names = {t.name for t in gguf.tensors()}
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    config: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "vocab_size": key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "max_position_embeddings": key("context_length", 4096),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "sliding_window": key("attention.sliding_window"),
    }
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    if arch == "gemma3":
        config.update(gemma3_config(meta))
    return ModelConfig.from_hf_config(config)


def gemma3_config(meta: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 fields that llama.cpp keeps implicit: its converter hard-codes them the same way."""
    head_dim = meta["gemma3.attention.key_length"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": head_dim,
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "rope_scaling": (
            {"rope_type": "linear", "factor": meta["gemma3.rope.scaling.factor"]}
            if meta.get("gemma3.rope.scaling.type") == "linear" else None),
    }


def gguf_tensors(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, TensorSource]]:
    """Every weight as a lazy source, in HF naming and layout (q/k rows un-permuted, Gemma norms without the 1)."""
    arch = gguf.architecture
    for t in gguf.tensors():
        name = hf_name(t.name, arch)
        if name is None:
            continue
        head_rows = None
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            head_rows = config.head_dim
        offset = 1.0 if arch == "gemma3" and name.endswith("norm.weight") else 0.0
        yield name, GGUFSource(t, head_rows, offset)


def rope_freq_factors(gguf: GGUFFile) -> torch.Tensor | None:
    """llama3-style rope scaling, which GGUF stores as a tensor of per-frequency divisors."""
    for t in gguf.tensors():
        if t.name == "rope_freqs.weight":
            return torch.from_numpy(np.array(t.data, dtype=np.float32))
    return None
