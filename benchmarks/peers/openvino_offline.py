"""Offline throughput of OpenVINO GenAI's continuous-batching LLMPipeline on a prompts JSONL (offline_prompts.py):
greedy, a fixed output length per prompt, prefix caching off. Run with the OpenVINO venv (../shared/peers.md):

    /tmp/peers/ov-venv/bin/python benchmarks/peers/openvino_offline.py OV_MODEL_DIR PROMPTS.jsonl --result-json R

Prints and writes output tokens per second over the whole generate() call (the same span as `pagoda bench
throughput`: all prompts submitted at once, until the last one finishes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("prompts", type=Path)
    parser.add_argument("--cache-gb", type=float, default=4.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-batched-tokens", type=int, default=576)
    parser.add_argument("--result-json", type=Path)
    args = parser.parse_args()
    import openvino_genai as ov

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    lengths = {r["output_len"] for r in rows}
    if len(lengths) != 1:
        raise SystemExit("one GenerationConfig serves every prompt: the JSONL needs one output_len")
    scheduler = ov.SchedulerConfig()
    scheduler.cache_size = int(args.cache_gb)
    scheduler.max_num_seqs = args.max_num_seqs
    scheduler.max_num_batched_tokens = args.max_batched_tokens
    scheduler.enable_prefix_caching = False
    start = time.perf_counter()
    pipe = ov.LLMPipeline(args.model_dir, "CPU", scheduler_config=scheduler)
    load_s = time.perf_counter() - start
    config = ov.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = lengths.pop()
    config.do_sample = False
    prompts = [r["prompt"] for r in rows]
    start = time.perf_counter()
    results = pipe.generate(prompts, config)
    elapsed = time.perf_counter() - start
    tokenizer = pipe.get_tokenizer()
    output_tokens = sum(len(tokenizer.encode(text).input_ids.data[0]) for text in results.texts)
    expected = config.max_new_tokens * len(prompts)
    summary = {"system": "openvino-genai", "prompts": len(prompts), "seconds": elapsed, "load_seconds": load_s,
               "output_tokens_expected": expected, "output_tokens_retokenized": output_tokens,
               "output_tok_s": expected / elapsed, "max_num_batched_tokens": args.max_batched_tokens}
    print(json.dumps(summary))
    if args.result_json:
        args.result_json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
