"""The quantized kernels' ISA variants side by side on SmolLM2's shapes: the VNNI build for this CPU against the AVX2
baseline built beside it (`PAGODA_NO_VNNI`), best of a few calls, GFLOP/s. Outputs are bit-identical
(tests/test_kernel_variants.py); only speed differs.

    .venv/bin/python benchmarks/kernel_variants.py
"""

from __future__ import annotations

import time

import torch

from pagoda.layers import quantized
from pagoda.layers.quantized import GROUP, Int8Linear, Q4Linear


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    fast = quantized._kernel()
    variant = quantized.kernel_variant()
    if variant in ("avx2", "torch"):
        raise SystemExit(f"this CPU has no VNNI variant (kernels: {variant})")
    baseline = quantized.load_kernels(("PAGODA_NO_VNNI",))
    print(f"threads {torch.get_num_threads()}; variant {variant} vs avx2 baseline; GFLOP/s")
    g = torch.Generator().manual_seed(0)
    for n, k in [(960, 576), (3072, 576), (576, 1536)]:
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        d = (torch.rand(n, k // GROUP, generator=g) * 0.02).to(torch.float16)
        m = (-8 * d.float()).to(torch.float16)
        layers = {"q4 int16 x (gguf)": Q4Linear(codes, d, m, activations="int16"),
                  "q4 int8 x (gguf-a8)": Q4Linear(codes, d, m, activations="int8"),
                  "int8": Int8Linear(torch.randn(n, k, generator=g) * 0.05)}
        for name, layer in layers.items():
            cells = []
            for rows in (1, 16, 64, 512):
                x = torch.randn(rows, k, generator=g)
                y = torch.empty(rows, n)
                flop = 2 * rows * n * k / 1e6
                a = best_ms(lambda lib=baseline, x=x, y=y, layer=layer: layer.run_kernel(lib, x, y))
                b = best_ms(lambda lib=fast, x=x, y=y, layer=layer: layer.run_kernel(lib, x, y))
                cells.append(f"{rows} rows {flop / a:.0f} -> {flop / b:.0f} ({a / b:.2f}x)")
            print(f"{n}x{k} {name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
