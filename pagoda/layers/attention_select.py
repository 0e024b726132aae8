"""Chooses the attention backend of an engine: the native CPU kernel or the torch reference.

"auto" takes the CPU kernel when it can run (CPU device, a KV cache of a dtype it reads, the kernel compiles) and
the reference otherwise; "cpu" requires the kernel and fails loudly when it cannot run; "reference" is always available.
The choice and its reason go into the execution plan (execution_plan.py).
"""

from __future__ import annotations

import torch

from pagoda.kernels import KernelBuildError
from pagoda.layers.attention import AttentionBackend
from pagoda.layers.attention_reference import ReferenceBackend

ATTENTION_BACKENDS = ("auto", "cpu", "reference")


def _cpu_unsupported(device: torch.device, cache_dtype: torch.dtype) -> str | None:
    """Why the CPU kernel cannot serve this engine, or None when it can (compiling aside)."""
    if device.type != "cpu":
        return f"the device is {device.type}, not cpu"
    from pagoda.layers.attention_cpu import KV_DTYPES

    if cache_dtype not in KV_DTYPES:
        return f"the KV cache is {str(cache_dtype).removeprefix('torch.')}; the kernel reads fp32, fp16 and bf16 only"
    return None


def create_backend(name: str, device: torch.device, cache_dtype: torch.dtype) -> tuple[AttentionBackend, str]:
    """The backend and why it was chosen."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not supported; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "reference":
        return ReferenceBackend(device), "requested"
    from pagoda.layers.attention_cpu import CpuPagedBackend

    reason = _cpu_unsupported(device, cache_dtype)
    if name == "cpu":
        if reason is not None:
            raise ValueError(f"attention_backend='cpu' cannot run here: {reason}; use 'auto' or 'reference'")
        try:
            return CpuPagedBackend(), "requested"
        except KernelBuildError as exc:
            raise KernelBuildError(f"attention_backend='cpu' needs the native kernel, which did not build: {exc}"
                                   ) from exc
    if reason is None:
        try:
            return CpuPagedBackend(), f"auto: CPU device, {str(cache_dtype).removeprefix('torch.')} KV cache"
        except KernelBuildError as exc:
            reason = f"the native kernel did not build ({str(exc).splitlines()[0]})"
    return ReferenceBackend(device), f"auto: {reason}"


def backend_name(backend: AttentionBackend) -> str:
    return "reference" if isinstance(backend, ReferenceBackend) else "cpu"
