"""The Llama family: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral, Qwen2 (qkv bias).

Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are fused into one matrix
each (`qkv_proj`, `gate_up_proj`) so a layer makes two matmuls fewer; `load_weights` fills the shards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.layers.attention import Attention
from pagoda.layers.common import RMSNorm, RotaryEmbedding, gated_activation
from pagoda.layers.linear import Embedding, Linear

# HF weight name part -> (fused parameter name part, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.shard_sizes = {"qkv_proj": [q_size, kv_size, kv_size]}
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size)
        self.rotary = [rotary]  # shared by every layer; a list keeps it out of this module's children
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.scale(config),
                              sliding_window=self.window(config, layer_idx))

    def scale(self, config: ModelConfig) -> float:
        return self.head_dim ** -0.5

    def window(self, config: ModelConfig, layer_idx: int) -> int | None:
        return config.sliding_window

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.shard_sizes["qkv_proj"], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary[0](positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.shard_sizes = {"gate_up_proj": [size, size]}
        self.gate_up_proj = Linear(config.hidden_size, 2 * size)
        self.down_proj = Linear(size, config.hidden_size)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_up_proj(x), self.act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, attention_cls=LlamaAttention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, attention_cls):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, attention_cls) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    attention_cls = LlamaAttention
    native_stack = None  # layers/native_stack.py attaches one when the model can run natively


    def __init__(self, config: ModelConfig, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, rope_freq_factors)
        self.model = LlamaModel(config, self.rotary, self.attention_cls)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        stack = self.native_stack
        if stack is not None and (stack.max_tokens is None or input_ids.shape[0] <= stack.max_tokens):
            return stack(input_ids, positions)
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # untied, or a quantized copy of the tied embedding (layers/quantized.py)
            return self.lm_head(hidden)
        return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_fused_weights(self, weights, STACKED_PARAMS)


def load_fused_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked: dict[str, tuple[str, int]]) -> None:
    """Copy HF-named weights into the model, filling fused parameters shard by shard. Every parameter must be
    filled, and every weight must have a place."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    def shard_sizes(pname: str) -> list[int] | None:
        """Sizes along dim 0 of a fused parameter's shards, declared by the module that owns the linear."""
        linear_name = pname.rpartition(".")[0]
        parent, _, leaf = linear_name.rpartition(".")
        return getattr(modules.get(parent), "shard_sizes", {}).get(leaf)

    needed = {(p, i) for p in params for i in range(len(shard_sizes(p) or [None]))}
    filled: set[tuple[str, int]] = set()
    tied = model.config.tie_word_embeddings or getattr(model, "lm_head", None) is None
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        pname, shard = name, 0
        for part, (fused, index) in stacked.items():
            if f".{part}." in name:
                pname, shard = name.replace(f".{part}.", f".{fused}."), index
                break
        param = params.get(pname)
        if param is None:
            raise ValueError(f"checkpoint weight {name!r} has no place in {type(model).__name__}")
        target = param.data
        sizes = shard_sizes(pname)
        if sizes is not None:
            target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        filled.add((pname, shard))
    missing = sorted({p for p, _ in needed - filled})
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
