"""The packed bf16 GEMMs (pagoda/kernels/bf16_gemm.h: AMX tiles, AVX512-BF16) and the weight layout they read. Each
kernel runs only on a CPU with its instructions (skipped elsewhere, with the reason); the packing and the fallback
to oneDNN are tested everywhere."""

from __future__ import annotations

import pytest
import torch

from pagoda import kernels
from pagoda.layers.quantized import (
    PACKED_AMX,
    PACKED_AVX512BF16,
    bf16_gemm,
    dense_bf16_gemm,
    dense_bf16_weight,
    pack_bf16,
    packed_bf16_kinds,
)

ISA = kernels.host_isa() or "unknown ISA"
KINDS = [pytest.param(PACKED_AMX, id="amx", marks=pytest.mark.skipif(
             not packed_bf16_kinds() & PACKED_AMX, reason=f"no AMX bf16 on this CPU ({ISA})")),
         pytest.param(PACKED_AVX512BF16, id="avx512bf16", marks=pytest.mark.skipif(
             not packed_bf16_kinds() & PACKED_AVX512BF16, reason=f"no AVX512-BF16 on this CPU ({ISA})"))]
needs_packed = pytest.mark.skipif(not packed_bf16_kinds(), reason=f"no AMX or AVX512-BF16 on this CPU ({ISA})")


def test_packing_puts_each_k_pair_of_16_columns_in_one_tile_row() -> None:
    w = torch.arange(32 * 64, dtype=torch.float32).view(32, 64)  # exact in bf16 up to 256; checked by index
    w = w % 251
    packed = pack_bf16(w)
    assert packed.shape == (2, 2, 16, 16, 2) and packed.dtype == torch.bfloat16
    for t, b, p, i, e in [(0, 0, 0, 0, 0), (1, 0, 3, 5, 1), (0, 1, 15, 15, 1), (1, 1, 7, 2, 0)]:
        assert packed[t, b, p, i, e] == w[16 * t + i, 32 * b + 2 * p + e]


def test_the_bf16_copy_is_fp32_where_the_kernel_cannot_run_it() -> None:
    w = torch.randn(40, 64)  # 40 columns: not whole tiles of 16
    dense = dense_bf16_weight(w)
    assert dense.dtype == torch.float32 and torch.equal(dense, w)
    x = torch.randn(5, 64)
    assert torch.equal(dense_bf16_gemm(x, dense), bf16_gemm(x, w))
    if not packed_bf16_kinds():
        assert dense_bf16_weight(torch.randn(48, 64)).dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", [(16, 32), (48, 64), (112, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 15, 16, 17, 33, 64, 100])
def test_kernel_sums_bf16_products_in_fp32(kind: int, m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7919 + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    dense = dense_bf16_weight(w)
    assert dense.dtype == torch.bfloat16  # packed: the kernel runs
    out = torch.full((m, n), float("nan"))
    y = dense_bf16_gemm(x, dense, out=out, kind=kind)
    assert y is out and not y.isnan().any()  # every row written, rows past m never (there are none to write)
    exact_products = x.bfloat16().double() @ w.bfloat16().double().T
    scale = x.bfloat16().double().abs() @ w.bfloat16().double().abs().T
    # only the fp32 summation differs from the exact sum of the bf16 products (k terms, each rounding 2^-24)
    assert ((y.double() - exact_products).abs() <= k * 2 ** -23 * scale + 1e-7).all()
    # and it is not a bf16-rounded output: that would be ~2^-9 off
    assert ((y.double() - exact_products).abs() <= 2 ** -14 * exact_products.abs() + 1e-5 * scale).all()


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_agrees_with_onednn_bf16_gemm_and_rounds_x_like_torch(kind: int) -> None:
    torch.manual_seed(1)
    x, w = torch.randn(64, 576), torch.randn(960, 576) * 0.05
    x[0, :32] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130] * 8)  # ties and a subnormal
    y = dense_bf16_gemm(x, dense_bf16_weight(w), kind=kind)
    reference = x.bfloat16().float() @ w.bfloat16().float().T
    scale = x.abs() @ w.abs().T
    assert ((y - reference).abs() <= 1e-5 * scale + 1e-6).all()
    # oneDNN's fp32-in bf16 mode agrees as closely on AMX; with AVX512-BF16 alone it rounds along the way (~2^-9
    # of the result: its own approximation, which the kernel does not share)
    tolerance = 1e-5 if kind == PACKED_AMX else 2 ** -8
    assert ((y - bf16_gemm(x, w)).abs() <= tolerance * scale + 1e-6).all()


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_is_deterministic_and_independent_of_threads(kind: int) -> None:
    torch.manual_seed(2)
    x, w = torch.randn(70, 576), torch.randn(3072, 576)
    dense = dense_bf16_weight(w)
    first = dense_bf16_gemm(x, dense, kind=kind)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dense_bf16_gemm(x, dense, kind=kind)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, dense_bf16_gemm(x, dense, kind=kind)) and torch.equal(first, single)
    # each row's result does not depend on the other rows of the call (rows are independent in the tiles)
    assert torch.equal(dense_bf16_gemm(x[:5].contiguous(), dense, kind=kind), first[:5])


@needs_packed
def test_a_kernel_this_cpu_lacks_gives_nan_not_a_crash() -> None:
    missing = [k for k in (PACKED_AMX, PACKED_AVX512BF16) if not packed_bf16_kinds() & k]
    if not missing:
        pytest.skip(f"this CPU runs both kernels ({ISA})")
    w = torch.randn(16, 32)
    assert dense_bf16_gemm(torch.randn(2, 32), dense_bf16_weight(w), kind=missing[0]).isnan().all()
