"""This machine's ceilings, measured quiet: memory bandwidth (reading a buffer much larger than the caches) and
the fp32 / bf16 matmul rates of torch, at a large square shape and at SmolLM2's prefill shape.

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
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
