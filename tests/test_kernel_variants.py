"""ISA variants of the quantized kernels (kernels/quant_linear.cpp): the build for this CPU picks the variant its
flags allow, and a VNNI variant gives bit-identical outputs to the AVX2 baseline built beside it. The baseline runs
on every machine (the rest of the suite); the comparison runs where the CPU has VNNI and is skipped, with the
reason, where it does not."""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest
import torch

from pagoda import kernels
from pagoda.layers import quantized
from pagoda.layers.quantized import Int8Linear, Q4Linear
from tests.harness import random_q4


def compiler_macros() -> set[str]:
    """The macros `-march=native` predefines with the compiler the kernels are built with."""
    cxx = kernels._compiler()
    out = subprocess.run([cxx, "-march=native", "-E", "-dM", "-x", "c++", os.devnull], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def test_the_build_for_this_cpu_uses_the_variant_its_target_allows() -> None:
    variant = quantized.kernel_variant()
    if variant == "torch":
        pytest.skip("the kernels did not build here (no compiler)")
    macros = compiler_macros()
    if {"__AVX512VNNI__", "__AVX512VL__"} <= macros:
        expected = "avx512vnni"
    else:
        expected = "avxvnni" if "__AVXVNNI__" in macros else "avx2"
    assert variant == expected
    if expected == "avx2":
        pytest.skip(f"this CPU (as the compiler sees it) has no VNNI: only the AVX2 baseline is built "
                    f"(CPU flags: {kernels.host_isa()})")


def run(lib: ctypes.CDLL, layer, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], layer.out_features)
    layer.run_kernel(lib, x.contiguous(), y)
    return y


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 33, 130])
def test_vnni_variant_is_bit_identical_to_the_avx2_baseline(rows) -> None:
    variant = quantized.kernel_variant()
    if variant in ("avx2", "torch"):
        pytest.skip(f"this CPU has no VNNI (kernels built as {variant!r}): only the AVX2 baseline exists here")
    baseline = quantized.load_kernels(("PAGODA_NO_VNNI",))
    assert baseline.quant_linear_variant().decode() == "avx2"
    fast = quantized._kernel()
    torch.manual_seed(rows)
    layers = [Q4Linear(*random_q4(200, 576, 1), activations="int16"), Q4Linear(*random_q4(72, 1536, 2),
              activations="int8"), Int8Linear(torch.randn(96, 320) * 0.05)]
    for layer in layers:
        # activations with outliers, so the per-group rounding uses the whole int8 / int16 range
        x = torch.randn(rows, layer.padded_in_features) * torch.rand(rows, 1) * 4
        x[:, ::37] *= 50
        assert torch.equal(run(fast, layer, x), run(baseline, layer, x)), type(layer).__name__


def attention_library(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    from pagoda.layers import attention_cpu

    lib = kernels.load("paged_attention", defines)
    for name, argtypes in attention_cpu._ARGTYPES.items():
        getattr(lib, name).argtypes = argtypes
    lib.paged_attention_variant.restype = ctypes.c_char_p
    return lib


def test_attention_is_built_with_the_widest_vectors_its_target_allows() -> None:
    variant = attention_library().paged_attention_variant().decode()
    macros = compiler_macros()
    assert variant == ("avx512" if "__AVX512F__" in macros else "avx2" if {"__AVX2__", "__FMA__"} <= macros
                       else "scalar")
    assert attention_library(("PAGODA_NO_AVX512",)).paged_attention_variant().decode() in ("avx2", "scalar")


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads, head_dim", [((9, 3), 64), ((8, 2), 128), ((4, 4), 80)], ids=["gqa3", "gqa4", "d80"])
def test_avx512_attention_agrees_with_the_avx2_baseline(heads, head_dim, cache_dtype) -> None:
    """Same scores, probabilities and weighted values up to the order of fp32 sums: 16-lane vectors and passes of up
    to 4 query rows (a head dim that is not a multiple of 16 keeps the 8-lane loops)."""
    from pagoda.layers.attention import Attention
    from pagoda.layers.attention_cpu import CpuPagedBackend
    from tests.harness import random_attention_step

    if attention_library().paged_attention_variant().decode() != "avx512":
        pytest.skip(f"this CPU has no AVX-512 (flags: {kernels.host_isa()}): only the AVX2 baseline exists here")
    num_heads, num_kv_heads = heads
    layer = Attention(0, num_heads, num_kv_heads, head_dim, head_dim ** -0.5)
    requests = [(1, 1), (1, 40), (1, 300), (45, 45), (23, 84), (7, 7)]
    q, k, v, cache, layout = random_attention_step(requests, num_heads, num_kv_heads, head_dim, seed=5)
    outputs = []
    for defines in ((), ("PAGODA_NO_AVX512",)):
        backend = CpuPagedBackend()
        backend.lib = attention_library(defines)
        with torch.inference_mode():
            metadata = backend.build_metadata(layout, {None})
            outputs.append(backend.forward(layer, q, k, v, cache.clone().to(cache_dtype), metadata))
    fast, baseline = outputs
    assert not torch.equal(fast, baseline) or head_dim % 16  # another build, another summation order
    assert (fast - baseline).abs().max().item() <= 2e-6
