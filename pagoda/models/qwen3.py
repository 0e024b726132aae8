"""Qwen3 (dense): the Llama layout plus an RMSNorm on each head of q and k before rotary."""

from __future__ import annotations

import torch

from pagoda.config import ModelConfig
from pagoda.layers.common import RMSNorm, RotaryEmbedding
from pagoda.models.llama import LlamaAttention, LlamaForCausalLM
from pagoda.parallel.shard import ModelShard


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, shard: ModelShard):
        super().__init__(config, layer_idx, rotary, shard)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
