"""The decoder stack of a Llama-family model as one native call per step (pagoda/kernels/llama_stack.cpp).

A decode step of a small model is dominated by per-op overhead, not arithmetic: ~30 layers x ~15 torch ops,
each a few microseconds of dispatch. `NativeStack` hands the whole stack (norms, quantized projections,
rotary, KV-cache write, paged attention, MLP, final norm) to one C++ call over the same weights and cache the
torch modules use. Each linear layer runs its compiled kernel, or, for calls of at least its `bf16_min_rows` rows
(the kernel plan, worker/kernel_plan.py), a bf16 GEMM on its dequantized weight: in the stack on AMX tiles
(kernels/bf16_gemm.h, a weight packed once at 2 bytes per weight) where the CPU has them, else through a callback
into torch (oneDNN on an fp32 copy; ~10 us per call, against GEMMs of 0.1 ms and more). It serves every step, except
that int8 layers without such a GEMM take steps of at most 64 tokens (larger steps are compute-bound and run best
on a GEMM over the dequantized weight, through the torch modules). Both paths give the same results up to fp32
rounding order (tests/test_native_stack.py) when they run the same kernels.

It applies when every piece has a native twin: Llama-layout layers (SiLU MLP, no projection bias, optional
Qwen3 head norms), quantized linear layers (int8 or q4 with K a multiple of 32, or a bf16 model's Bf16Linear),
rotate-half rotary, the native attention backend and a KV cache the kernels read. `unsupported_reason` says why not
otherwise, and the model keeps running on torch.

On a tensor-parallel rank it runs that rank's shard (its heads, its MLP slice) and sums the o / down projections
over the group through a callback into torch.distributed; on a pipeline stage, its layers (the first stage
embeds, the last one applies the final norm).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from pagoda import kernels
from pagoda.layers.attention import get_forward_context
from pagoda.layers.attention_cpu import KV_DTYPES, CpuMetadata, CpuPagedBackend
from pagoda.layers.quantized import QuantizedLinear, bf16_gemm

logger = logging.getLogger("pagoda")


_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _QLinear(ctypes.Structure):
    _fields_ = [("kind", _I64), ("n", _I64), ("k", _I64), ("q", _P), ("d", _P), ("m", _P), ("dense_from", _I64),
                ("dense", _P), ("id", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("q_norm", _P), ("k_norm", _P), ("qkv", _QLinear),
                ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear), ("kv_cache", _P), ("window", _I64)]


_ALL_REDUCE = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), _I64)
_DENSE_GEMM = ctypes.CFUNCTYPE(None, _I64, ctypes.POINTER(ctypes.c_float), _I64, ctypes.POINTER(ctypes.c_float))


class _Stack(ctypes.Structure):
    _fields_ = [("num_layers", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("intermediate", _I64), ("num_slots", _I64), ("kv_dtype", _I64), ("eps", _F32), ("scale", _F32),
                ("cos", _P), ("sin", _P), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer)),
                ("all_reduce", _ALL_REDUCE), ("dense_gemm", _DENSE_GEMM)]


class _Batch(ctypes.Structure):
    _fields_ = [("num_tokens", _I64), ("positions", _P), ("slots", _P), ("block_tables", _P), ("table_stride", _I64),
                ("context_lens", _P), ("query_start", _P), ("num_decodes", _I64), ("num_requests", _I64),
                ("block_size", _I64)]


_MIRRORED_STRUCTS = (_QLinear, _Layer, _Stack, _Batch)  # the order of llama_stack_struct_sizes


def _load_kernel() -> ctypes.CDLL:
    lib = kernels.load("llama_stack")
    sizes = (ctypes.c_int64 * len(_MIRRORED_STRUCTS))()
    lib.llama_stack_struct_sizes(sizes)
    expected = [ctypes.sizeof(struct) for struct in _MIRRORED_STRUCTS]
    if list(sizes) != expected:
        raise kernels.KernelBuildError(f"llama_stack's structs {list(sizes)} bytes do not match their ctypes "
                                       f"mirrors in native_stack.py {expected}")
    lib.llama_stack_forward.argtypes = [ctypes.POINTER(_Stack), ctypes.POINTER(_Batch), _P, _P, ctypes.c_int]
    lib.llama_stack_forward.restype = None
    return lib


def _qlinear(module: QuantizedLinear, index: int) -> _QLinear:
    pointers = list(module.weight_pointers) + [None] * (3 - len(module.weight_pointers))
    return _QLinear(module.kind, module.out_features, module.padded_in_features, *pointers, 0, None, index)


def unsupported_reason(model: nn.Module, kv_caches: list[torch.Tensor], backend) -> str | None:
    """Why the native stack cannot run this model, or None when it can."""
    from pagoda.models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM) or type(model).__name__ not in ("LlamaForCausalLM",
                                                                                 "Qwen3ForCausalLM"):
        return f"{type(model).__name__} is not a Llama-layout model"
    if not isinstance(backend, CpuPagedBackend):
        return "the attention backend is not the native one"
    if any(c.dtype not in KV_DTYPES or not c.is_contiguous() or not c.is_cpu for c in kv_caches):
        return "the KV cache is not of a dtype the kernels read (fp32, fp16, bf16, int8, fp8), in CPU memory"
    config = model.config
    if config.hidden_act != "silu" or config.attention_bias:
        return "the MLP is not SiLU-gated or the attention projections have a bias"
    if config.head_dim % 2:
        return "the head dimension is odd"
    for layer in model.model.layers.values():
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if not isinstance(linear, QuantizedLinear):
                return "not every linear layer is quantized (use quantization='int8' or 'gguf', or dtype='bfloat16')"
            if linear.bias is not None or linear.padded_in_features != linear.in_features:
                return "a linear layer has a bias or an input size that is not a multiple of 32"
    return None


class NativeStack:
    """Runs LlamaModel.forward (embedding lookup in torch, the rest native) for the steps it serves (max_tokens)."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor]):
        self.lib = _load_kernel()
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens  # None after the first pipeline stage
        rotary = model.rotary
        self._keep: list[torch.Tensor] = []  # fp32 copies the pointers below point into (see _fp32)
        cos, sin = self._fp32(rotary.cos), self._fp32(rotary.sin)
        decoder = list(inner.layers.values())
        self.dtype = decoder[0].input_layernorm.weight.dtype  # the torch modules' (what a step returns)
        layers = (_Layer * len(decoder))()
        self._linears: list[QuantizedLinear] = []  # by the index dense_gemm is called with
        for i, (layer, cache) in enumerate(zip(decoder, kv_caches)):
            attn = layer.self_attn
            norms = [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
            linears = [attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
            structs = [_qlinear(m, len(self._linears) + j) for j, m in enumerate(linears)]
            self._linears += linears
            layers[i] = _Layer(self._fp32(layer.input_layernorm.weight),
                               self._fp32(layer.post_attention_layernorm.weight),
                               *(self._fp32(n.weight) if n is not None else None for n in norms),
                               *structs, cache.data_ptr(), attn.attn.sliding_window or 0)
        self._layers = layers
        self._dense_gemm = _DENSE_GEMM(self._run_dense)  # kept on self: it must outlive every call
        first = decoder[0].self_attn
        tp = model.shard.tp
        # The callback must outlive every call: kept on self. A C all-reduce (shared memory) is called directly;
        # otherwise the stack calls back into Python (torch.distributed).
        if tp.size == 1:
            self._all_reduce = _ALL_REDUCE()
        elif tp.native_all_reduce is not None:
            self._all_reduce = _ALL_REDUCE(tp.native_all_reduce)
        else:
            self._all_reduce = _ALL_REDUCE(_tp_all_reduce(tp))
        self._tp = tp
        final_norm = self._fp32(inner.norm.weight) if inner.norm is not None else None
        self.stack = _Stack(len(decoder), config.hidden_size, first.num_heads, first.num_kv_heads,
                            config.head_dim, decoder[0].mlp.intermediate_size, kv_caches[0].shape[1],
                            KV_DTYPES[kv_caches[0].dtype], config.rms_norm_eps, first.attn.scale,
                            cos, sin, final_norm, layers,
                            self._all_reduce, self._dense_gemm)
        self._stack_ref = ctypes.byref(self.stack)
        self.max_tokens: int | None = None  # the largest step it serves; None: every step
        self.follow_layers()

    def _fp32(self, weight: torch.Tensor) -> int:
        """The address of `weight` as contiguous fp32: the tensor itself, or a copy kept on self (a bf16 model's
        norms)."""
        if weight.dtype != torch.float32 or not weight.is_contiguous():
            weight = weight.detach().to(torch.float32).contiguous()
            self._keep.append(weight)
        return weight.data_ptr()

    def follow_layers(self) -> None:
        """Take each layer's current paths (the kernel plan): calls from its `bf16_min_rows` on go to its dense
        bf16 GEMM (the AMX kernel, or the callback); the stack serves the steps every layer can run here (int8
        layers without a dense path: up to their kernel limit)."""
        limits = []
        for i, linear in enumerate(self._linears):
            struct = getattr(self._layers[i // 4], ("qkv", "o", "gate_up", "down")[i % 4])
            struct.dense_from = linear.bf16_min_rows or 0
            dense = linear.dense_weight
            # a packed AMX weight runs in the stack; an fp32 one through the dense_gemm callback (torch)
            struct.dense = dense.data_ptr() if dense is not None and dense.dtype == torch.bfloat16 else None
            if linear.bf16_min_rows is None and linear.kernel_max_rows is not None:
                limits.append(linear.kernel_max_rows)
        self.max_tokens = min(limits) if limits else None

    def _run_dense(self, index: int, x, rows: int, y) -> None:
        """The dense_gemm callback: y = x @ W^T for linear `index`, on its dequantized fp32 weight (bf16_gemm)."""
        linear = self._linears[index]
        k, n = linear.padded_in_features, linear.out_features
        x_t = torch.frombuffer((ctypes.c_float * (rows * k)).from_address(ctypes.addressof(x.contents)),
                               dtype=torch.float32).view(rows, k)
        y_t = torch.frombuffer((ctypes.c_float * (rows * n)).from_address(ctypes.addressof(y.contents)),
                               dtype=torch.float32).view(rows, n)
        bf16_gemm(x_t, linear.dense_weight, out=y_t)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden`: the previous pipeline stage's output (None: embed `input_ids`)."""
        md = get_forward_context().metadata
        if not isinstance(md, CpuMetadata):
            raise TypeError("the native stack runs with the native attention backend's metadata")
        positions = positions.to(torch.int64).contiguous()
        h = (self.embed(input_ids) if hidden is None else hidden).to(torch.float32).contiguous()
        if hidden is not None and h.data_ptr() == hidden.data_ptr():
            h = h.clone()  # the stack updates the residual stream in place
        out = torch.empty_like(h)
        batch = _Batch(md.num_tokens, positions.data_ptr(), md.slots_ptr, md.tables_ptr, md.table_stride,
                       md.lens_ptr, md.starts_ptr, md.num_decodes, md.num_requests, md.block_size)
        self.lib.llama_stack_forward(self._stack_ref, ctypes.byref(batch), h.data_ptr(), out.data_ptr(),
                                     md.num_threads)
        self._tp.raise_if_failed()
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def _tp_all_reduce(tp):
    """The C callback body: sum n floats at `data` over the TP group, in place."""

    def all_reduce(data, n: int) -> None:
        buffer = (ctypes.c_float * n).from_address(ctypes.addressof(data.contents))
        tp.all_reduce(torch.frombuffer(buffer, dtype=torch.float32))

    return all_reduce


def build(model: nn.Module, kv_caches: list[torch.Tensor], backend) -> tuple[NativeStack | None, str]:
    """A native stack for the model when it can run one, and the reason for the choice (for the execution plan)."""
    reason = unsupported_reason(model, kv_caches, backend)
    if reason is not None:
        return None, reason
    try:
        stack = NativeStack(model, kv_caches)
    except kernels.KernelBuildError as exc:
        return None, f"the kernel did not build ({str(exc).splitlines()[0]})"
    return stack, served_steps(stack)


def served_steps(stack: NativeStack) -> str:
    """The execution plan's words for the steps the stack serves."""
    limit = stack.max_tokens
    return "every step" if limit is None else f"steps of up to {limit} tokens, torch above"
