"""The AMX bf16 GEMM (pagoda/kernels/amx_bf16.h) and the weight layout it reads. The kernel runs only on a CPU
with AMX-BF16 (skipped elsewhere, with the reason); the packing and the fallback to oneDNN are tested everywhere."""

from __future__ import annotations

import pytest
import torch

from pagoda import kernels
from pagoda.layers.quantized import amx_bf16_available, bf16_gemm, dense_bf16_gemm, dense_bf16_weight, pack_amx_bf16

needs_amx = pytest.mark.skipif(not amx_bf16_available(),
                               reason=f"no AMX bf16 on this CPU ({kernels.host_isa() or 'unknown ISA'})")


def test_packing_puts_each_k_pair_of_16_columns_in_one_tile_row() -> None:
    w = torch.arange(32 * 64, dtype=torch.float32).view(32, 64)  # exact in bf16 up to 256; checked by index
    w = w % 251
    packed = pack_amx_bf16(w)
    assert packed.shape == (2, 2, 16, 16, 2) and packed.dtype == torch.bfloat16
    for t, b, p, i, e in [(0, 0, 0, 0, 0), (1, 0, 3, 5, 1), (0, 1, 15, 15, 1), (1, 1, 7, 2, 0)]:
        assert packed[t, b, p, i, e] == w[16 * t + i, 32 * b + 2 * p + e]


def test_the_bf16_copy_is_fp32_where_the_kernel_cannot_run_it() -> None:
    w = torch.randn(40, 64)  # 40 columns: not whole tiles of 16
    dense = dense_bf16_weight(w)
    assert dense.dtype == torch.float32 and torch.equal(dense, w)
    x = torch.randn(5, 64)
    assert torch.equal(dense_bf16_gemm(x, dense), bf16_gemm(x, w))
    if not amx_bf16_available():
        assert dense_bf16_weight(torch.randn(48, 64)).dtype == torch.float32


@needs_amx
@pytest.mark.parametrize("n, k", [(16, 32), (48, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 64, 100])
def test_kernel_sums_bf16_products_in_fp32(m: int, n: int, k: int) -> None:
    torch.manual_seed(m * 7919 + n + k)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    dense = dense_bf16_weight(w)
    assert dense.dtype == torch.bfloat16  # packed: the kernel runs
    out = torch.full((m, n), float("nan"))
    y = dense_bf16_gemm(x, dense, out=out)
    assert y is out and not y.isnan().any()  # every row written, rows past m never (there are none to write)
    exact_products = x.bfloat16().double() @ w.bfloat16().double().T
    scale = x.bfloat16().double().abs() @ w.bfloat16().double().abs().T
    # only the fp32 summation differs from the exact sum of the bf16 products (k terms, each rounding 2^-24)
    assert ((y.double() - exact_products).abs() <= k * 2 ** -23 * scale + 1e-7).all()
    # and it is not a bf16-rounded output: that would be ~2^-9 off
    assert ((y.double() - exact_products).abs() <= 2 ** -14 * exact_products.abs() + 1e-5 * scale).all()


@needs_amx
def test_kernel_agrees_with_onednn_bf16_gemm_and_rounds_x_like_torch() -> None:
    torch.manual_seed(1)
    x, w = torch.randn(64, 576), torch.randn(960, 576) * 0.05
    x[0, :32] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130] * 8)  # ties and a subnormal
    y = dense_bf16_gemm(x, dense_bf16_weight(w))
    reference = x.bfloat16().float() @ w.bfloat16().float().T
    scale = x.abs() @ w.abs().T
    assert ((y - reference).abs() <= 1e-5 * scale + 1e-6).all()
    assert ((y - bf16_gemm(x, w)).abs() <= 1e-5 * scale + 1e-6).all()


@needs_amx
def test_kernel_is_deterministic_and_independent_of_threads() -> None:
    torch.manual_seed(2)
    x, w = torch.randn(70, 576), torch.randn(3072, 576)
    dense = dense_bf16_weight(w)
    first = dense_bf16_gemm(x, dense)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dense_bf16_gemm(x, dense)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, dense_bf16_gemm(x, dense)) and torch.equal(first, single)
    # each row's result does not depend on the other rows of the call (rows are independent in the tiles)
    assert torch.equal(dense_bf16_gemm(x[:5].contiguous(), dense), first[:5])
