"""Per-step time of the default model on one rank and split over two, with the communication share.

For each layout — TP=1 with two threads, TP=2 with one thread per rank (all-reduce through shared memory, and
through gloo), PP=2 with one thread per stage — the offline engine runs B requests of 128 prompt tokens and 64
greedy output tokens, all at once, for B = 1 and 16. Reported per decode step (steps with no prompt token):
wall time, and on the driver the seconds inside tensor-parallel all-reduces (waiting for the slower rank
included), i.e. communication; the rest is computation. Fresh random prompts for every run; median of runs.

    .venv/bin/python benchmarks/parallel_steps.py       # writes benchmarks/results/parallel_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "parallel_steps.json"

LAYOUTS = {  # name: (tp, pp, threads per rank, TP transport)
    "tp1": (1, 1, 2, "auto"),
    "tp2-shm": (2, 1, 1, "shm"),
    "tp2-gloo": (2, 1, 1, "gloo"),
    "pp2": (1, 2, 1, "auto"),
}


def measure(layout: str, batches: list[int], runs: int, seed: int) -> dict:
    from pagoda import LLM, SamplingParams

    tp, pp, threads, transport = LAYOUTS[layout]
    os.environ["PAGODA_TP_TRANSPORT"] = transport
    result = {}
    with LLM("smollm2-135m-instruct", kv_cache_memory="1GiB", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             threads_per_rank=threads, max_num_seqs=64, progress=False) as llm:
        engine = llm.engine
        tp_group = engine.runner.model.shard.tp
        vocab = engine.model_config.vocab_size
        for batch in batches:
            samples = []
            for run in range(runs):
                rng = random.Random(seed * 1000 + batch * 10 + run)  # new prompts every run: no prefix-cache hits
                params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
                for i in range(batch):
                    engine.add_request(f"{layout}-{batch}-{run}-{i}", [rng.randrange(vocab) for _ in range(128)],
                                       params)
                step_times, comm_times = [], []
                while engine.has_unfinished_requests():
                    prefill = any(r.num_tokens - r.num_computed_tokens > 1 for r in engine.scheduler.running) or (
                        engine.scheduler.num_waiting > 0)
                    tp_group.take_native_seconds()
                    tp_group.reset_stats()
                    start = time.perf_counter()
                    engine.step()
                    elapsed = time.perf_counter() - start
                    comm = tp_group.comm_seconds + tp_group.take_native_seconds()
                    if not prefill:
                        step_times.append(elapsed)
                        comm_times.append(comm)
                samples.append({"step_ms": 1e3 * statistics.median(step_times),
                                "comm_ms": 1e3 * statistics.median(comm_times), "decode_steps": len(step_times)})
            result[batch] = {"runs": samples,
                             "step_ms": statistics.median(s["step_ms"] for s in samples),
                             "comm_ms": statistics.median(s["comm_ms"] for s in samples)}
            print(f"{layout} batch {batch}: {result[batch]['step_ms']:.2f} ms/step, "
                  f"{result[batch]['comm_ms']:.2f} ms in all-reduces", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    from pagoda.kernels import host_isa

    results = {"cpu_isa": host_isa(), "layouts": {}}
    for index, layout in enumerate(args.layouts):
        results["layouts"][layout] = measure(layout, args.batches, args.runs, index)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
