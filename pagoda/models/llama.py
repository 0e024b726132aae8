"""The Llama family: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral, Qwen2 (qkv bias).

Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are fused into one matrix
each (`qkv_proj`, `gate_up_proj`) so a layer makes two matmuls fewer; each layer's `shards` say which rows of
which checkpoint tensors fill it.

One instance is one rank's share of the model (a ModelShard): with tensor parallelism q/k/v and gate/up are
column-parallel (this rank's heads and intermediate slice), o and down row-parallel followed by an all-reduce,
the embedding and LM head vocabulary-parallel; with pipeline parallelism only this stage's layers exist, the
first stage embeds and the last one normalises and computes logits. A single process is the shard of one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.layers.attention import Attention
from pagoda.layers.common import RMSNorm, RotaryEmbedding, gated_activation
from pagoda.layers.linear import Embedding, Linear, WeightShard, column_shards
from pagoda.loader.tensors import TensorSource
from pagoda.models.loading import load_sharded_weights
from pagoda.parallel.shard import ModelShard


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, shard: ModelShard):
        super().__init__()
        heads = shard.heads(config.num_attention_heads, config.num_key_value_heads)
        self.tp = shard.tp
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, config.head_dim
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        self.q_size, self.kv_size = q_size, kv_size
        kv_rows = (heads.kv_start * d, heads.kv_end * d)
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias,
                               shards=column_shards([("q_proj", heads.q_start * d, heads.q_end * d),
                                                     ("k_proj", *kv_rows), ("v_proj", *kv_rows)]))
        o_cols = [WeightShard("o_proj", 1, heads.q_start * d, heads.q_end * d)] if shard.tp_size > 1 else None
        self.o_proj = Linear(q_size, config.hidden_size, shards=o_cols, bias_here=shard.tp_rank == 0)
        self.rotary = [rotary]  # shared by every layer; a list keeps it out of this module's children
        self.attn = Attention(layer_idx - shard.layout.layer_start, self.num_heads, self.num_kv_heads, d,
                              self.scale(config), sliding_window=self.window(config, layer_idx))

    def scale(self, config: ModelConfig) -> float:
        return self.head_dim ** -0.5

    def window(self, config: ModelConfig, layer_idx: int) -> int | None:
        return config.sliding_window

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary[0](positions, q, k)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v)))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: ModelShard):
        super().__init__()
        start, stop = shard.slice_of(config.intermediate_size)
        size = stop - start
        self.tp = shard.tp
        self.intermediate_size = size
        self.gate_up_proj = Linear(config.hidden_size, 2 * size,
                                   shards=column_shards([("gate_proj", start, stop), ("up_proj", start, stop)]))
        down_cols = [WeightShard("down_proj", 1, start, stop)] if shard.tp_size > 1 else None
        self.down_proj = Linear(size, config.hidden_size, shards=down_cols, bias_here=shard.tp_rank == 0)
        self.act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(gated_activation(self.gate_up_proj(x), self.act)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, shard: ModelShard,
                 attention_cls=LlamaAttention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_idx, rotary, shard)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, shard)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class StageLayers(nn.ModuleDict):
    """A pipeline stage's decoder layers, keyed by their global index (so parameter names match the
    checkpoint's); indexed by that index and iterated in order like a ModuleList."""

    def __getitem__(self, index: int | str) -> nn.Module:
        return super().__getitem__(str(index))

    def __iter__(self):
        return iter(self.values())


def stage_layers(shard: ModelShard, make) -> StageLayers:
    return StageLayers({str(i): make(i) for i in range(shard.layout.layer_start, shard.layout.layer_end)})


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, attention_cls, shard: ModelShard):
        super().__init__()
        self.embed_tokens = vocab_embedding(config, shard) if shard.layout.is_first_stage else None
        self.layers = stage_layers(shard, lambda i: LlamaDecoderLayer(config, i, rotary, shard, attention_cls))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if shard.layout.is_last_stage else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden`: the previous pipeline stage's output (None on the first stage: the tokens are embedded)."""
        if hidden is None:
            hidden = self.embed(input_ids)
        for layer in self.layers.values():
            hidden = layer(positions, hidden)
        return hidden if self.norm is None else self.norm(hidden)


def vocab_embedding(config: ModelConfig, shard: ModelShard) -> Embedding:
    return Embedding(config.vocab_size, config.hidden_size, shard.slice_of(config.vocab_size), shard.tp)


class LMHead(Linear):
    """The output projection over this rank's vocabulary rows (the model gathers the full rows from the TP
    group). Tied to the embedding: on the stage that also embeds it shares that weight, elsewhere it loads the
    same rows of the embedding tensor."""

    def __init__(self, config: ModelConfig, shard: ModelShard, embedding: Embedding | None):
        ranges = shard.ranges(config.vocab_size)
        start, stop = ranges[shard.tp_rank]
        tied = config.tie_word_embeddings
        source = "model.embed_tokens" if tied else "lm_head"
        needs_shards = shard.tp_size > 1 or tied
        super().__init__(config.hidden_size, stop - start,
                         shards=[WeightShard(source, 0, start, stop)] if needs_shards else None)
        if tied and embedding is not None:
            self.weight = embedding.weight  # one tensor for both (named once, as the embedding's)


def compute_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits over the whole vocabulary from this rank's LM head rows (the layer may be a quantized copy)."""
    sizes = [b - a for a, b in model.shard.ranges(model.config.vocab_size)]
    return model.shard.tp.gather_columns(model.lm_head(hidden), sizes)


class LlamaForCausalLM(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: ModelConfig, rope_freq_factors: torch.Tensor | None = None,
                 shard: ModelShard | None = None):
        super().__init__()
        shard = shard or ModelShard.single(config.num_hidden_layers)
        self.config = config
        self.shard = shard
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_positions, config.rope_theta,
                                      config.rope_scaling, rope_freq_factors, config.max_position_embeddings)
        self.model = LlamaModel(config, self.rotary, self.attention_cls, shard)
        self.lm_head = LMHead(config, shard, self.model.embed_tokens) if shard.layout.is_last_stage else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return compute_logits(self, hidden)

    def load_weights(self, tensors: Iterable[tuple[str, TensorSource]], consumed: Collection[str] = ()) -> None:
        load_sharded_weights(self, tensors, consumed)
