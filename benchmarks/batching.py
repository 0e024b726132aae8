"""Continuous vs static batching on the same engine, same requests: mixed output lengths, at most 16 at once.

Static batching admits 16 requests, runs until the longest of them finishes, then admits the next 16 (what a
server without iteration-level scheduling does). Continuous batching (Pagoda's scheduler) fills a finished
request's place at the next step. Both run the offline engine in its default precision, greedy, ignore_eos.

    .venv/bin/python benchmarks/batching.py [--runs 2]   # -> benchmarks/results/batching.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pagoda import LLM, SamplingParams  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "batching.json"
BATCH, NUM_REQUESTS, PROMPT_LEN, MIN_OUT, MAX_OUT = 16, 64, 128, 16, 256


def requests(vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [([rng.randrange(100, vocab) for _ in range(PROMPT_LEN)], rng.randint(MIN_OUT, MAX_OUT))
            for _ in range(NUM_REQUESTS)]


def run(llm: LLM, waves: list[list[tuple[list[int], int]]]) -> dict:
    """Submit each wave when the previous one has fully finished; returns throughput and latencies. Every
    request arrives at the start (a static server queues the later waves), so latency counts from there."""
    engine, start, latencies, steps, tokens = llm.engine, time.perf_counter(), [], 0, 0
    for w, wave in enumerate(waves):
        for i, (ids, n) in enumerate(wave):
            engine.add_request(f"{w}-{i}", ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            tokens += n
        while engine.has_unfinished_requests():
            steps += 1
            for out in engine.step():
                if out.finished:
                    latencies.append(time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tok_s": tokens / seconds, "steps": steps,
            "mean_latency_s": statistics.mean(latencies), "output_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    llm = LLM(args.model, max_num_seqs=BATCH, kv_cache_memory="2GiB", progress=False)
    reqs = requests(llm.get_tokenizer().vocab_size)
    modes = {"static": [reqs[i:i + BATCH] for i in range(0, len(reqs), BATCH)], "continuous": [reqs]}
    run(llm, [reqs[:2]])  # warm-up
    results = {mode: [run(llm, waves) for _ in range(args.runs)] for mode, waves in modes.items()}
    summary = {"batch": BATCH, "num_requests": NUM_REQUESTS, "prompt_len": PROMPT_LEN,
               "output_len_range": [MIN_OUT, MAX_OUT], "runs": results,
               "median": {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                          for mode, runs in results.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["median"], indent=2))


if __name__ == "__main__":
    main()
