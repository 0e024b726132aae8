"""Gemma 3 (text): Llama-like attention with q/k norms, (1 + w) RMSNorms before and after each block, scaled
embeddings, a GELU-tanh MLP, and sliding-window layers (local rotary base) between full ones (global base).
Sharded like the Llama family (models/llama.py); the output projection is always tied to the embeddings."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.layers.common import RMSNorm, RotaryEmbedding
from pagoda.loader.tensors import TensorSource
from pagoda.models.llama import LlamaAttention, LlamaMLP, LMHead, compute_logits, stage_layers, vocab_embedding
from pagoda.models.loading import load_sharded_weights
from pagoda.parallel.shard import ModelShard


def layer_types(config: ModelConfig) -> list[str]:
    explicit = config.extra.get("layer_types")
    if explicit:
        return list(explicit)
    pattern = config.extra.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)]


class Gemma3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, shard: ModelShard):
        self.sliding = layer_types(config)[layer_idx] == "sliding_attention"
        super().__init__(config, layer_idx, rotary, shard)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, add_unit_offset=True)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, add_unit_offset=True)

    def scale(self, config: ModelConfig) -> float:
        return config.extra.get("query_pre_attn_scalar", config.head_dim) ** -0.5

    def window(self, config: ModelConfig, layer_idx: int) -> int | None:
        return config.sliding_window if self.sliding else None

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, shard: ModelShard):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, add_unit_offset=True)
        self.input_layernorm = norm()
        self.self_attn = Gemma3Attention(config, layer_idx, rotary, shard)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(config, shard)
        self.post_feedforward_layernorm = norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(hidden)))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, global_rotary: RotaryEmbedding, local_rotary: RotaryEmbedding,
                 shard: ModelShard):
        super().__init__()
        self.embed_tokens = vocab_embedding(config, shard) if shard.layout.is_first_stage else None
        self.embed_scale = config.hidden_size ** 0.5
        types = layer_types(config)
        self.layers = stage_layers(shard, lambda i: Gemma3DecoderLayer(
            config, i, local_rotary if types[i] == "sliding_attention" else global_rotary, shard))
        last = shard.layout.is_last_stage
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, add_unit_offset=True) if last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            hidden = self.embed_tokens(input_ids)
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        for layer in self.layers.values():
            hidden = layer(positions, hidden)
        return hidden if self.norm is None else self.norm(hidden)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, rope_freq_factors: torch.Tensor | None = None,
                 shard: ModelShard | None = None):
        super().__init__()
        if config.extra.get("final_logit_softcapping") or config.extra.get("attn_logit_softcapping"):
            raise ValueError("Gemma 3 checkpoints with logit soft-capping are not supported")
        if not config.tie_word_embeddings:  # transformers' Gemma 3 configs tie by default
            config = _tied(config)
        shard = shard or ModelShard.single(config.num_hidden_layers)
        self.config = config
        self.shard = shard
        positions = config.rotary_positions
        self.global_rotary = RotaryEmbedding(config.head_dim, positions, config.rope_theta, config.rope_scaling,
                                             max_position_embeddings=config.max_position_embeddings)
        self.local_rotary = RotaryEmbedding(config.head_dim, positions, config.extra.get("rope_local_base_freq", 1e4))
        self.model = Gemma3Model(config, self.global_rotary, self.local_rotary, shard)
        self.lm_head = LMHead(config, shard, self.model.embed_tokens) if shard.layout.is_last_stage else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compute_logits(self, hidden)

    def load_weights(self, tensors: Iterable[tuple[str, TensorSource]], consumed: Collection[str] = ()) -> None:
        load_sharded_weights(self, tensors, consumed)


def _tied(config: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(config, tie_word_embeddings=True)
