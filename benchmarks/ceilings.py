"""This machine's ceilings, measured quiet: memory bandwidth (reading a buffer much larger than the caches), the
matmul rates of torch at a large square shape, and, at SmolLM2's linear shapes for 1 / 16 / 64 / 512 rows: fp32,
bf16 (bf16 in and out), bf16_gemm (bf16 products, fp32 out: the kernel plan's dense path), int8 (torch._int_mm)
and our q4 kernel (int16 activations, the default) — GFLOP/s, best of a few calls.

    .venv/bin/python benchmarks/ceilings.py   # -> benchmarks/results/ceilings.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "ceilings.json"


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    threads = torch.get_num_threads()
    buffer = torch.ones(256 * 2**20)  # 1 GiB of fp32: 30x the L3
    read_s = best_of(buffer.sum, 5)
    result = {"threads": threads, "read_bandwidth_gb_s": buffer.nbytes / read_s / 1e9, "matmul_gflop_s": {}}
    del buffer
    shapes = [(2048, 2048, 2048, torch.float32), (256, 576, 1536, torch.float32), (16, 576, 1536, torch.float32),
              (256, 576, 1536, torch.bfloat16), (16, 576, 1536, torch.bfloat16)]  # bf16 is emulated here: slow
    for m, k, n, dtype in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        seconds = best_of(lambda a=a, b=b: a @ b, 3)
        result["matmul_gflop_s"][f"{m}x{k}x{n} {str(dtype).removeprefix('torch.')}"] = 2 * m * k * n / seconds / 1e9
    result["smollm2_shapes_gflop_s"] = model_shapes()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def model_shapes() -> dict[str, dict[str, float]]:
    from pagoda.layers.quantized import GROUP, Q4Linear, bf16_gemm

    table: dict[str, dict[str, float]] = {}
    for n, k in [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]:
        g = torch.Generator().manual_seed(n + k)
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        d = (torch.rand(n, k // GROUP, generator=g) * 0.02).to(torch.float16)
        q4 = Q4Linear(codes, d, (-8 * d.float()).to(torch.float16))
        w = q4.weight_fp32_t().t().contiguous()
        wb, w8 = w.bfloat16(), torch.randint(-127, 128, (k, n), dtype=torch.int8)
        for m in (1, 16, 64, 512):
            x = torch.randn(m, k)
            xb, x8 = x.bfloat16(), torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8)  # _int_mm: m > 16
            paths = {"fp32": (torch.mm, x, w.T), "bf16": (torch.mm, xb, wb.T),
                     "bf16_gemm (fp32 out)": (bf16_gemm, x, w), "int8 _int_mm": (torch._int_mm, x8, w8),
                     "q4 kernel": (Q4Linear.__call__, q4, x)}
            row = {}
            for name, (fn, a, b) in paths.items():
                rows = x8.shape[0] if name.startswith("int8") else m
                row[name] = round(2 * rows * k * n / best_of(lambda fn=fn, a=a, b=b: fn(a, b), 3) / 1e9, 1)
            table[f"{n}x{k} @ {m} rows"] = row
            print(f"{n}x{k} @ {m:>3} rows: " + ", ".join(f"{name} {v:.0f}" for name, v in row.items()), flush=True)
    return table


if __name__ == "__main__":
    main()
