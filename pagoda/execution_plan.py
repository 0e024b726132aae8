"""ExecutionPlan: what an engine's "auto" choices resolved to on this host, for one rank, as one frozen record.

Every choice is made once, while the rank loads (worker/model_loader.py), by the function that owns it: the compute
dtype (EngineConfig.torch_dtype), the KV cache element type (worker/kv_cache.py), the attention backend
(layers/attention_select.py), the linear weight format (layers/quantized.py), the path each quantized layer takes by
rows per call (worker/kernel_plan.py, timed on this CPU), whether the native decoder stack
runs (models/native_stack.py), and the parallel layout (parallel/layout.py). The plan records the results and
why, is logged as one line, and is served at GET /v1/engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ExecutionPlan:
    device: str
    dtype: str  # activations and unquantized weights
    kv_cache_dtype: str
    quantization: str | None  # linear weight format: None (dtype), "int8", "gguf", "gguf-a8"
    attention_backend: str  # "cpu" (native kernel) or "reference"
    attention_reason: str
    native_stack: bool
    native_stack_reason: str  # "every step", "steps of up to N tokens", or why not
    kernel_isa: str  # the CPU extensions the native kernels are built for (-march=native)
    kernel_variant: str  # the quantized kernels' integer dot products: "avx512vnni", "avxvnni", "avx2" or "torch"
    kernel_plan: str  # which path each quantized layer shape takes by rows per call (worker/kernel_plan.py)
    threads: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    tp_transport: str  # the TP all-reduce: "none" (one rank), "shm" (one host) or "gloo"
    rank: int
    tp_rank: int
    pp_rank: int
    layers: tuple[int, int]  # [first, last + 1) of the layers this rank holds
    num_heads: int  # this rank's query and KV heads
    num_kv_heads: int
    weight_bytes: int  # this rank's parameters and buffers
    kv_cache_bytes: int  # this rank's share of the KV cache
    kv_cache_blocks: int
    kv_cache_tokens: int
    kv_bytes_per_token: int  # this rank's
    kv_cache_sizing: str  # "set" (a size was given) or how "auto" sized it
    activation_reserve_bytes: int  # kept free for the largest step: max(formula, measured)
    activation_formula_bytes: int  # the largest step's activation buffers by the planner's formula (planner.py)
    activation_measured_bytes: int | None  # the resident memory the largest step added (worker/activation_probe.py)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parallel = (f"rank {self.rank} of {self.tensor_parallel_size * self.pipeline_parallel_size} (tp "
                    f"{self.tp_rank}/{self.tensor_parallel_size}, pp {self.pp_rank}/{self.pipeline_parallel_size}, "
                    f"layers {self.layers[0]}-{self.layers[1] - 1}, {self.num_heads} heads / {self.num_kv_heads} "
                    f"KV heads, all-reduce {self.tp_transport})")
        return (f"{parallel}; {self.device} {self.dtype}, weights {self.quantization or self.dtype} "
                f"({self.weight_bytes / 2**20:.0f} MiB), KV cache {self.kv_cache_dtype} "
                f"({self.kv_cache_blocks} blocks, {self.kv_cache_bytes / 2**30:.2f} GiB, "
                f"{self.kv_cache_tokens} tokens, {self.kv_bytes_per_token} B/token, {self.kv_cache_sizing}), "
                f"attention {self.attention_backend} ({self.attention_reason}), "
                f"decoder stack {'native' if self.native_stack else 'torch'} ({self.native_stack_reason}), "
                f"kernels for {self.kernel_isa or 'unknown ISA'} ({self.kernel_variant} dot products), "
                f"kernel plan {self.kernel_plan}, "
                f"{self.threads} threads")
