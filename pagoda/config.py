"""Frozen configuration dataclasses. Each component receives only the one it needs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pagoda.parallel.layout import ParallelConfig

# model_type (HF) or general.architecture (GGUF) -> the model file that implements it.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters a model file needs, in Hugging Face's vocabulary."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # architecture-specific fields, as in config.json
    # the context the engine serves (its max_model_len), which the rotary tables cover and which picks the
    # dynamic / longrope frequencies (layers/rope.py); None: context_length
    served_context: int | None = None

    @property
    def context_length(self) -> int:
        """The longest context the model's rotary reaches (max_position_embeddings, extended by rope scaling)."""
        from pagoda.layers.rope import context_length

        return context_length(self.max_position_embeddings, self.rope_scaling)

    @property
    def rotary_positions(self) -> int:
        return self.served_context or self.context_length

    @property
    def architecture(self) -> str:
        try:
            return ARCHITECTURES[self.model_type]
        except KeyError:
            raise ValueError(
                f"model type {self.model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            ) from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dictionary (transformers 4 or 5 layouts)."""
        c = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
        rope = dict(c.get("rope_parameters") or {})  # transformers 5 layout
        if "full_attention" in rope:  # parameters per layer type (Gemma 3): local ones go to extra
            c.setdefault("rope_local_base_freq", (rope.get("sliding_attention") or {}).get("rope_theta", 10000.0))
            rope = dict(rope["full_attention"])
        rope_theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = c.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        heads = c["num_attention_heads"]
        known = {f.name for f in cls.__dataclass_fields__.values()}
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", c["model_type"] == "qwen2")),
            hidden_act=c.get("hidden_act", c.get("hidden_activation", "silu")),
            sliding_window=c.get("sliding_window") if c.get("use_sliding_window", True) else None,
            extra={k: v for k, v in c.items() if k not in known},
        )


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GiB', '512MB', '1.5G' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 2GiB, 512MiB or 1000000000 "
                         "(or auto for the KV cache)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary or unit == "" else 1000
    return int(number * base ** "_kmgt".index(unit or "_"))


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # bytes for the KV cache of a rank's layers, or None: sized from the memory this host has left once the
    # weights are loaded (worker/kv_cache.py: kv_cache_budget)
    kv_cache_memory: int | None = 2 * 1024**3
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # see worker/kv_cache.py: resolve_kv_cache_dtype
    memory_utilization: float = 0.9  # with kv_cache_memory None: the fraction of that memory the engine may take

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.kv_cache_memory is not None and self.kv_cache_memory <= 0):
            raise ValueError(f"invalid cache configuration: {self}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    """What a user asks of an engine (the CLI flags, LLM(...) arguments). What it resolves to on this host is the
    ExecutionPlan (execution_plan.py)."""

    model: str
    dtype: str = "auto"
    # per rank: a size ("2GiB", bytes) or "auto": what this host has left once the weights are loaded, times
    # memory_utilization, less the activation reserve, capped at max_num_seqs requests of max_model_len tokens
    kv_cache_memory: int | str = "auto"
    memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 64
    max_prefill_tokens: int = 512  # prompt tokens per step; decoding requests add one token each
    max_model_len: int | None = None  # default: the model's context length, capped by the KV cache
    enable_prefix_caching: bool = True
    device: str = "cpu"
    attention_backend: str = "auto"  # "auto", "cpu" (native kernel) or "reference": see layers/attention_select.py
    # "auto": "gguf" for a GGUF file on the CPU, else None; None: weights in `dtype`; "gguf" / "gguf-a8":
    # compute on the file's own Q4_1/Q8_0 blocks, int16 / int8 activations for the 4-bit layers; "int8":
    # requantize every linear layer. See layers/quantized.py.
    quantization: str | None = "auto"
    kv_cache_dtype: str = "auto"  # "auto": fp16 for an fp32 model on the CPU, else the model's dtype
    # Which path the quantized linear layers take by rows per call: "kernel" (the compiled kernels: every output row
    # bit-identical whatever the batch), "auto" (timed on this CPU, cached: bf16 GEMMs where faster) or "bf16:N"
    # (worker/kernel_plan.py).
    kernel_plan: str = "kernel"
    # Parallelism (parallel/): world size = tensor x pipeline; workers are spawned by the engine, or launched by
    # torchrun (then every process runs the engine's rank of the world it finds in the environment).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_layers: tuple[int, ...] | None = None  # layers per stage (default: balanced)
    threads_per_rank: int | None = None  # default: this host's cores / its ranks
    distributed_timeout: float = 60.0  # seconds a collective may wait before the engine fails as dead

    def __post_init__(self) -> None:
        _ = self.parallel  # validates the sizes
        _ = self.cache  # and the memory settings
        from pagoda.worker.kernel_plan import parse_mode

        parse_mode(self.kernel_plan)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}") from None

    def context_for(self, model: ModelConfig) -> int:
        """max_model_len, or the model's context length; longer than the model reaches is refused."""
        if self.max_model_len is None:
            return model.context_length
        if not 1 <= self.max_model_len <= model.context_length:
            raise ValueError(f"max_model_len {self.max_model_len} is outside the model's context of "
                             f"{model.context_length} tokens (max_position_embeddings {model.max_position_embeddings}"
                             f"{', with its rope scaling' if model.rope_scaling else ''}); a longer context needs "
                             "rope scaling (e.g. yarn) in the model's config.json")
        return self.max_model_len

    @property
    def parallel(self) -> ParallelConfig:
        layers = tuple(self.pipeline_layers) if self.pipeline_layers is not None else None
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, layers)

    @property
    def cache(self) -> CacheConfig:
        memory = None if self.kv_cache_memory == "auto" else parse_size(self.kv_cache_memory)
        return CacheConfig(self.block_size, memory, self.enable_prefix_caching, self.kv_cache_dtype,
                           self.memory_utilization)
