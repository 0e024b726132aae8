"""Builds one rank's ready model from a checkpoint: its shard of the weights in the chosen format, its share of
the KV cache, the attention backend, the native stack when it can run, and the ExecutionPlan that records it all.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagoda import kernels
from pagoda.config import EngineConfig, ModelConfig
from pagoda.execution_plan import ExecutionPlan
from pagoda.layers.attention import AttentionBackend
from pagoda.layers.attention_select import backend_name, create_backend
from pagoda.layers.quantized import (
    check_quantization,
    kernel_variant,
    quantize_model,
    resolve_quantization,
    use_bf16_kernels,
)
from pagoda.loader import Checkpoint, open_checkpoint
from pagoda.models import native_stack
from pagoda.models.registry import model_class
from pagoda.parallel.comm import TPGroup
from pagoda.parallel.layout import RankLayout
from pagoda.parallel.shard import ModelShard
from pagoda.worker import kernel_plan
from pagoda.worker.activation_probe import measure_activation_peak
from pagoda.worker.kv_cache import (
    KVBudget,
    KVCacheLayout,
    allocate_kv_cache,
    host_memory,
    kv_cache_budget,
    max_bytes_per_token,
    plan_kv_cache,
    resolve_kv_cache_dtype,
)

logger = logging.getLogger("pagoda")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer  # noqa: F821
    kv_layout: KVCacheLayout
    kv_caches: list[torch.Tensor]
    backend: AttentionBackend
    native_stack: native_stack.NativeStack | None
    plan: ExecutionPlan
    kernel_plan: kernel_plan.KernelPlan


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def new_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
              shard: ModelShard | None = None, context: int | None = None) -> nn.Module:
    """The model (its shard on a parallel rank) with its weights not read yet (uninitialised memory, not touched,
    so not resident), its rotary made for `context` tokens (default: the model's context length)."""
    config = dataclasses.replace(checkpoint.config, served_context=context)
    cls = model_class(config)
    with torch.device(device), _default_dtype(dtype):
        return cls(config, checkpoint.rope_freq_factors, shard).eval()


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                shard: ModelShard | None = None, context: int | None = None) -> nn.Module:
    """new_model with every weight read from the checkpoint."""
    model = new_model(checkpoint, dtype, device, shard, context)
    model.load_weights(checkpoint.tensors())
    return model


def load_weights(checkpoint: Checkpoint, config: EngineConfig, shard: ModelShard | None = None,
                 ) -> tuple[nn.Module, str | None]:
    """The model (its shard) with its weights in the format the config resolves to here, and that format. A
    quantized layer is built from its own slices of the checkpoint before the rest is read, so the peak memory of
    a load stays near its end (no fp32 copy of the quantized weights)."""
    device, dtype = torch.device(config.device), config.torch_dtype
    quantization = resolve_quantization(config.quantization, device, dtype, checkpoint.is_gguf)
    model = new_model(checkpoint, dtype, device, shard, config.context_for(checkpoint.config))
    consumed = quantize_model(model, quantization, checkpoint.sources()) if quantization is not None else set()
    model.load_weights(checkpoint.tensors(), consumed)
    if quantization is None and dtype == torch.bfloat16 and device.type == "cpu":
        use_bf16_kernels(model)  # the native stack's bf16-weight layers
    return model, quantization


def resolve_kernel_plan(model: nn.Module, config: EngineConfig, remeasure: bool = False) -> kernel_plan.KernelPlan:
    """The kernel plan for the model's quantized layers at the step sizes the scheduler makes."""
    return kernel_plan.resolve(config.kernel_plan, model, config.max_prefill_tokens + config.max_num_seqs,
                               config.max_num_seqs, remeasure=remeasure)


def activation_reserve(model_config: ModelConfig, config: EngineConfig) -> int:
    """The largest step's activation buffers on a rank, by the planner's formula (planner.activation_bytes); the
    reserve is the larger of this and the peak measured on the model (worker/activation_probe.py)."""
    from pagoda.planner import activation_bytes

    return activation_bytes(model_config, config.tensor_parallel_size, config.max_prefill_tokens,
                            config.max_num_seqs)


def resolve_kv_budget(model_config: ModelConfig, config: EngineConfig, kv_dtype: torch.dtype,
                      reserve: int) -> KVBudget:
    """This rank's KV-cache bytes (worker/kv_cache.py); with "auto" and several ranks, measured once every rank's
    weights are in memory, and the same on every rank. `reserve`: the rank's activation reserve."""
    cache = config.cache
    if cache.kv_cache_memory is not None:  # a size given: no measurement (and no collective)
        return KVBudget(cache.kv_cache_memory, "set")
    available, ranks_on_host = host_memory()
    return kv_cache_budget(cache, max_bytes_per_token(model_config, kv_dtype, config.parallel), available=available,
                           ranks_on_host=ranks_on_host, activation_reserve=reserve,
                           max_num_seqs=config.max_num_seqs,
                           max_model_len=config.context_for(model_config),
                           max_model_len_is_set=config.max_model_len is not None)


def load_model(path: Path, config: EngineConfig, rank: RankLayout | None = None, tp: TPGroup | None = None,
               progress: bool = False, remeasure_kernels: bool = False) -> LoadedModel:
    device = torch.device(config.device)
    dtype = config.torch_dtype
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)
    # first: a bad choice fails before any loading
    backend, attention_reason = create_backend(config.attention_backend, device, kv_dtype)
    if config.quantization != "auto":
        check_quantization(config.quantization, device)
    checkpoint = open_checkpoint(path)
    config.context_for(checkpoint.config)  # a max_model_len the model cannot reach fails before loading
    rank = rank or RankLayout.single(checkpoint.config.num_hidden_layers)
    # Split boundaries of a sharded model fall on whole quantization blocks of its tensors.
    shard = ModelShard(rank, tp or TPGroup(), align=max(32, checkpoint.block_size()))
    model, quantization = load_weights(checkpoint, config, shard)
    kernels_plan = resolve_kernel_plan(model, config, remeasure_kernels)
    kernels_plan.apply(model)  # before the native stack, which serves only the steps the kernels take
    formula = activation_reserve(checkpoint.config, config)
    measured = measure_activation_peak(model, checkpoint.config, config, backend, kv_dtype, rank)
    reserve = max(formula, measured or 0)
    kv_budget = resolve_kv_budget(checkpoint.config, config, kv_dtype, reserve)
    kv_layout = plan_kv_cache(checkpoint.config, config.cache, kv_dtype, config.parallel, kv_budget.bytes)
    kv_caches = allocate_kv_cache(kv_layout, checkpoint.config, kv_dtype, device, rank)
    stack, stack_reason = native_stack.build(model, kv_caches, backend)
    if stack is not None and kernels_plan.needs_step_check:
        kernels_plan = kernel_plan.check_steps(kernels_plan, model, stack, backend, kv_caches, config.block_size)
        stack_reason = native_stack.served_steps(stack)
    attention = next(m for m in model.modules() if hasattr(m, "num_kv_heads") and hasattr(m, "qkv_proj"))
    plan = ExecutionPlan(
        device=str(device), dtype=str(dtype).removeprefix("torch."),
        kv_cache_dtype=str(kv_dtype).removeprefix("torch."), quantization=quantization,
        attention_backend=backend_name(backend), attention_reason=attention_reason,
        native_stack=stack is not None, native_stack_reason=stack_reason, kernel_isa=kernels.host_isa(),
        kernel_variant=kernel_variant(), kernel_plan=kernels_plan.summary(),
        threads=torch.get_num_threads(), tensor_parallel_size=rank.tp_size, pipeline_parallel_size=rank.pp_size,
        tp_transport=shard.tp.transport, rank=rank.rank, tp_rank=rank.tp_rank, pp_rank=rank.pp_rank,
        layers=(rank.layer_start, rank.layer_end),
        num_heads=attention.num_heads, num_kv_heads=attention.num_kv_heads,
        weight_bytes=sum(t.nbytes for t in _unique_tensors(model)),
        kv_cache_bytes=sum(c.nbytes for c in kv_caches), kv_cache_blocks=kv_layout.num_blocks,
        kv_cache_tokens=kv_layout.num_tokens, kv_bytes_per_token=sum(c[0, 0].nbytes for c in kv_caches) * 2,
        kv_cache_sizing=kv_budget.reason, activation_reserve_bytes=reserve, activation_formula_bytes=formula,
        activation_measured_bytes=measured)
    logger.info("execution plan: %s", plan.summary())
    return LoadedModel(model, checkpoint.config, checkpoint.tokenizer, kv_layout, kv_caches, backend, stack, plan,
                       kernels_plan)


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(t.data_ptr(), t)
    return list(seen.values())
