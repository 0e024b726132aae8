"""Median decode-step time of one stream (W1's shape: 128 prompt tokens, 128 greedy output tokens) on the offline
engine of whatever checkout is on PYTHONPATH: to check that a change costs the single-process path nothing.

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/decode_step.py --runs 5 --label before
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[0] / "results" / "decode_step.json"))
    args = parser.parse_args()
    import pagoda
    from pagoda import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", kv_cache_memory="1GiB", progress=False)
    engine = llm.engine
    medians = []
    for run in range(args.runs):
        rng = random.Random(run)  # new prompt every run
        prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(128)]
        engine.add_request(f"r{run}", prompt, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
        times = []
        first = True
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            if not first:
                times.append(time.perf_counter() - start)
            first = False
        medians.append(statistics.median(times) * 1e3)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = {"source": str(Path(pagoda.__file__).parent), "step_ms_per_run": medians,
                           "step_ms": statistics.median(medians)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{args.label}: median decode step {statistics.median(medians):.2f} ms ({medians})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
