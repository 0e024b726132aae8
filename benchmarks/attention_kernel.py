"""Micro-benchmark of one attention layer: the reference backend against the native CPU kernel.

One layer of SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64, blocks of 16 tokens, fp32), over a
random paged cache with shuffled block tables. Each case times `backend.forward` (cache write + attention),
which runs once per layer per step; `build_metadata` runs once per step for all layers and is timed apart.

    .venv/bin/python benchmarks/attention_kernel.py [--repeat 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagoda.layers.attention import Attention, BatchLayout
from pagoda.layers.attention_cpu import CpuPagedBackend
from pagoda.layers.attention_reference import ReferenceBackend
from tests.harness import random_attention_step

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
TIMER = time.perf_counter  # wall clock: what a step waits for


def time_us(fn, repeat: int) -> float:
    """Median microseconds per call, after a warm-up call."""
    fn()
    samples = []
    for _ in range(repeat):
        start = TIMER()
        fn()
        samples.append((TIMER() - start) * 1e6)
    return statistics.median(samples)


def measure(backend, layer: Attention, tensors, layout: BatchLayout, repeat: int) -> tuple[float, float]:
    """(us per forward, us per build_metadata) of one backend on one step."""
    md = backend.build_metadata(layout, {None})
    forward_us = time_us(lambda: backend.forward(layer, *tensors, md), repeat)
    return forward_us, time_us(lambda: backend.build_metadata(layout, {None}), repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per case (default: 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer = Attention(0, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5)
    backends = {"reference": ReferenceBackend(torch.device("cpu")), "cpu": CpuPagedBackend()}
    cases = [(f"decode batch {b:>2} ctx {ctx:>4}", [(1, ctx)] * b) for ctx in (256, 1024) for b in (1, 16, 64)]
    cases.append(("prefill 256 tokens", [(256, 256)]))
    print(f"one layer: {HEADS} heads, {KV_HEADS} kv heads, head dim {HEAD_DIM}, fp32, {torch.get_num_threads()} "
          f"threads; median us per forward (metadata: us per step)")
    print(f"{'case':<28}{'reference':>12}{'cpu':>12}{'speed-up':>10}{'meta ref':>10}{'meta cpu':>10}")
    with torch.inference_mode():
        for name, requests in cases:
            q, k, v, cache, layout = random_attention_step(requests, HEADS, KV_HEADS, HEAD_DIM, BLOCK)
            forward, meta = {}, {}
            for key, backend in backends.items():
                forward[key], meta[key] = measure(backend, layer, (q, k, v, cache), layout, args.repeat)
            print(f"{name:<28}{forward['reference']:>12.1f}{forward['cpu']:>12.1f}"
                  f"{forward['reference'] / forward['cpu']:>9.1f}x{meta['reference']:>10.1f}{meta['cpu']:>10.1f}")


if __name__ == "__main__":
    main()
