"""Microbenchmark: fp32 torch F.linear vs the int8 kernel (pagoda.layers.quantized.Int8Linear) on SmolLM2-135M's
linear shapes, for decode-sized batches. Reports microseconds per call and effective GB/s (weight bytes read
per call / time: fp32 reads 4 bytes per weight, int8 1 + 2/32).

As in a real decode step, where 30 layers' weights pass through the caches once per step, each call uses
the next of enough copies of the weight (at least --footprint MiB) that none is still cached from its last
use: the numbers are from memory, not from L3. --footprint 0 measures cache-resident weights instead.

    python benchmarks/int8_linear.py [--rows 1,4,16,64] [--threads N] [--footprint 256]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagoda.layers.quantized import GROUP, Int8Linear

SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 49152)]  # (K, N): qkv, gate_up, down, LM head


def time_call(fn, seconds: float = 0.5) -> float:
    """Seconds per call: the fastest of many short batches of calls (about 1 ms each, for `seconds` in all).
    The minimum, not the median: on a shared machine a batch that lost its core to another process says
    nothing about the code."""
    for _ in range(3):
        fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.01:
        fn()
        calls += 1
    per_batch = max(1, calls // 10)
    best, deadline, batches = float("inf"), time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or batches < 10:
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        best, batches = min(best, (time.perf_counter() - t0) / per_batch), batches + 1
    return best


def rotating(call, operands: list) -> Callable[[], object]:
    """A function that calls call(operand) with the next operand each time, round robin."""
    cycle = itertools.cycle(operands)
    return lambda: call(next(cycle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64", help="batch sizes M (default: 1,4,16,64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--footprint", type=int, default=256, help="MiB of weight copies cycled through (default: 256)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()}")
    print(f"{'K':>5} {'N':>6} {'M':>3} | {'fp32 us':>9} {'GB/s':>6} | {'int8 us':>9} {'GB/s':>6} | {'speedup':>7}")
    with torch.inference_mode():
        for k, n in SHAPES:
            weight = torch.randn(n, k) * 0.02
            weights = [weight] + [weight.clone() for _ in range(args.footprint * 2**20 // weight.nbytes)]
            layer = Int8Linear(weight)
            layers = [layer] + [Int8Linear(weight) for _ in range(args.footprint * 2**20 // (n * k))]
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k)
                t_fp32 = time_call(rotating(lambda w, x=x: F.linear(x, w), weights))
                t_int8 = time_call(rotating(lambda layer, x=x: layer(x), layers))
                gb_fp32 = n * k * 4 / t_fp32 / 1e9
                gb_int8 = n * k * (1 + 2 / GROUP) / t_int8 / 1e9
                print(f"{k:>5} {n:>6} {m:>3} | {t_fp32 * 1e6:>9.1f} {gb_fp32:>6.1f} | {t_int8 * 1e6:>9.1f} "
                      f"{gb_int8:>6.1f} | {t_fp32 / t_int8:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
