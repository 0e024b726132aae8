"""Paged vs contiguous KV allocation: how many requests run at once in the same KV memory.

The KV cache gets room for 8,192 tokens; requests have 256-token prompts and 64 output tokens (320 tokens
each) and the context window is 2,048. A contiguous per-request allocator must reserve the whole window for
every request it admits, so it fits 8192 / 2048 = 4 at once (1 at a 8k window). Pagoda allocates 16-token
blocks as a request grows: the number below is measured, the peak of requests running in one step with 64
submitted at once.

    .venv/bin/python benchmarks/kv_capacity.py   # -> benchmarks/results/kv_capacity.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pagoda import LLM, SamplingParams  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "kv_capacity.json"
KV_TOKENS, WINDOW, PROMPT_LEN, OUTPUT_LEN, SUBMITTED = 8192, 2048, 256, 64, 64


def main() -> None:
    probe = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", progress=False)
    per_token = probe.engine.kv_layout.bytes_per_token  # of the default cache dtype
    del probe
    llm = LLM("smollm2-135m-instruct", kv_cache_memory=KV_TOKENS * per_token, max_model_len=WINDOW,
              max_num_seqs=SUBMITTED, progress=False)
    engine, rng = llm.engine, random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    for i in range(SUBMITTED):
        engine.add_request(str(i), [rng.randrange(100, vocab) for _ in range(PROMPT_LEN)],
                           SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True))
    peak = steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        peak = max(peak, engine.stats().num_running)
    stats = engine.stats()
    result = {"kv_tokens": KV_TOKENS, "kv_bytes": KV_TOKENS * per_token, "window": WINDOW,
              "request_tokens": PROMPT_LEN + OUTPUT_LEN, "paged_peak_running": peak,
              "paged_ideal": KV_TOKENS // (PROMPT_LEN + OUTPUT_LEN), "contiguous_at_window": KV_TOKENS // WINDOW,
              "contiguous_at_8k_window": KV_TOKENS // 8192, "preemptions": stats.num_preemptions_total,
              "steps": steps}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
