"""On paper: what tensor and pipeline parallelism cost and gain for Llama 3 8B and 70B, from the models' sizes and
link costs, with the arithmetic printed (a markdown section for BENCHMARKS.md).

Model of one decode step at batch B (memory-bound: the step reads every weight once):
- compute per rank: weight bytes held / HBM bandwidth (the ranks of a stage read their shards in parallel);
- TP: 2 all-reduces per layer of B x hidden values (bf16), each alpha + 2 (N - 1) / N x bytes / link bandwidth
  (a ring all-reduce);
- PP with M stages: each boundary sends B x hidden values once (alpha + bytes / bandwidth); one stream's token
  passes every stage in turn (no gain in latency), but M batches in flight keep every stage busy, so throughput
  is M x that of one stage's step.
Links: NVLink-class 450 GB/s with alpha = 10 us (an NCCL small all-reduce inside a node), 100 GbE 12.5 GB/s
alpha = 20 us, 25 GbE 3.1 GB/s alpha = 50 us (TCP / RoCE between nodes); HBM 3.35 TB/s (H100). The measured
collectives of this CPU host (benchmarks/results/collectives.json) are printed beside them.

    .venv/bin/python benchmarks/parallel_model.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HBM = 3.35e12  # bytes/s
BYTES = 2  # bf16


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    params: float  # parameters


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s
    alpha: float  # seconds per collective


MODELS = [Model("Llama 3 8B", 32, 4096, 8.0e9), Model("Llama 3 70B", 80, 8192, 70.6e9)]
LINKS = [Link("NVLink 450 GB/s", 450e9, 10e-6), Link("100 GbE", 12.5e9, 20e-6), Link("25 GbE", 3.1e9, 50e-6)]


def tp_step(model: Model, n: int, link: Link, batch: int = 1) -> tuple[float, float]:
    """(compute, communication) seconds of one decode step with TP=n."""
    compute = model.params * BYTES / n / HBM
    size = batch * model.hidden * BYTES
    per_all_reduce = link.alpha + 2 * (n - 1) / n * size / link.bandwidth if n > 1 else 0.0
    return compute, 2 * model.layers * per_all_reduce


def main() -> None:
    lines = ["Per token, TP moves 2 x layers all-reduces of hidden x 2 bytes (ring: 2 (N - 1) / N of it per rank); "
             "PP moves hidden x 2 bytes per stage boundary.", ""]
    lines.append("| model | TP all-reduce bytes / token (one all-reduce) | all-reduces / token | "
                 "TP bytes sent per rank per token, N=2 / 4 / 8 | PP bytes per boundary per token |")
    lines.append("|---|---|---|---|---|")
    for m in MODELS:
        one = m.hidden * BYTES
        per_rank = " / ".join(f"{2 * m.layers * 2 * (n - 1) / n * one / 1024:.0f} KiB" for n in (2, 4, 8))
        lines.append(f"| {m.name} | {one / 1024:.0f} KiB | {2 * m.layers} | {per_rank} | {one / 1024:.0f} KiB |")
    lines += ["", "Decode step at batch 1 (ms: compute + communication = total, speed-up over TP=1; a 70B model in "
              "bf16, 141 GB, needs at least 2 GPUs of 80 GB):", "",
              "| model | link | TP=1 | TP=2 | TP=4 | TP=8 |", "|---|---|---|---|---|---|"]
    for m in MODELS:
        for link in LINKS:
            base = sum(tp_step(m, 1, link))
            cells = []
            for n in (1, 2, 4, 8):
                compute, comm = tp_step(m, n, link)
                cells.append(f"{compute * 1e3:.2f} + {comm * 1e3:.2f} = {(compute + comm) * 1e3:.2f} "
                             f"({base / (compute + comm):.1f}x)")
            lines.append(f"| {m.name} | {link.name} | " + " | ".join(cells) + " |")
    m = MODELS[1]
    stage = tp_step(Model(m.name, m.layers // 2, m.hidden, m.params / 2), 4, LINKS[0])
    boundary = LINKS[2].alpha + m.hidden * BYTES / LINKS[2].bandwidth
    tp8 = tp_step(m, 8, LINKS[2])
    lines += ["", f"Where PP beats TP: {m.name} on two 4-GPU nodes joined by 25 GbE. TP=8 across the nodes: "
              f"{tp8[0] * 1e3:.2f} + {tp8[1] * 1e3:.2f} = {sum(tp8) * 1e3:.2f} ms per step, every all-reduce "
              f"crossing the slow link. TP=4 x PP=2 (TP over NVLink inside each node, PP between them): a stage "
              f"step is {stage[0] * 1e3:.2f} + {stage[1] * 1e3:.2f} = {sum(stage) * 1e3:.2f} ms and the boundary "
              f"send {boundary * 1e6:.0f} us, so one stream's token takes {(2 * sum(stage) + boundary) * 1e3:.2f} "
              f"ms, but with two batches in flight the pair of nodes finishes a step every "
              f"{sum(stage) * 1e3:.2f} ms: {sum(tp8) / sum(stage):.1f}x TP=8's throughput, at about the same "
              "per-token latency. Inside one node (NVLink) TP wins: it cuts latency, which PP never does."]
    measured = ROOT / "benchmarks" / "results" / "collectives.json"
    if measured.exists():
        c = json.loads(measured.read_text())
        one = c["rows"]["1"]
        lines += ["", f"This CPU host ({c['cpu_isa']}), 2 processes on 127.0.0.1, one all-reduce of one token's "
                  f"hidden state (SmolLM2, {c['hidden']} fp32): gloo {one['gloo_all_reduce_us']:.0f} us, shared "
                  f"memory {one['shm_all_reduce_us']:.1f} us; a gloo send {one['gloo_send_us']:.0f} us. SmolLM2 "
                  f"makes 60 all-reduces per step, so gloo alone would add "
                  f"{60 * one['gloo_all_reduce_us'] / 1e3:.0f} ms to a ~7 ms step."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
