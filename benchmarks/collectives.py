"""Latency of the collectives a parallel step makes, on this machine: the all-reduce of a step's hidden states
(what TP does twice per layer) through gloo and through Pagoda's shared-memory path (parallel/shm.py), and a
point-to-point gloo send of them (what PP does once per stage boundary), for SmolLM2's hidden size at decode
batch sizes and a prefill chunk. Two processes, one thread each, 127.0.0.1.

    .venv/bin/python benchmarks/collectives.py        # writes benchmarks/results/collectives.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "collectives.json"
HIDDEN = 576
ROWS = (1, 16, 64, 512)
REPEATS = 200


def _time(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    dist.barrier()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _run(rank: int, port: int, queue) -> None:
    sys.path.insert(0, str(ROOT))
    from pagoda.parallel.shm import ShmTPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shm = ShmTPGroup(None, [0, 1], rank, timeout=60.0)
    result = {}
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN)
        repeats = REPEATS if rows <= 64 else 50
        all_reduce = _time(lambda x=x: dist.all_reduce(x), repeats)
        shm_all_reduce = _time(lambda x=x: shm.all_reduce(x), repeats * 5)

        def ping(x=x):  # one hop each way: half the round trip is one stage-to-stage send
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)

        send = _time(ping, repeats) / 2
        result[rows] = {"bytes": x.nbytes, "gloo_all_reduce_us": all_reduce * 1e6,
                        "shm_all_reduce_us": shm_all_reduce * 1e6, "gloo_send_us": send * 1e6}
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pagoda.kernels import host_isa
    from pagoda.parallel.executor import free_port

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run, args=(free_port(), queue), nprocs=2)
    result = {"cpu_isa": host_isa(), "hidden": HIDDEN, "rows": queue.get()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
