"""The context-length table (issue 14): for 4k, 8k, 32k and 128k contexts, KV bytes per token and the requests of
that length one GiB holds for each KV-cache dtype, and, measured on the engine, the prefill time of one prompt
filling the context and the decode rate at that context; then fairness: the TTFT of short requests submitted
while one long prompt is prefilled in chunks.

    .venv/bin/python benchmarks/long_context.py            # writes benchmarks/results/long_context.json and
                                                           # benchmarks/plots/long_context.png

Models: a tiny random-weight Llama with yarn rope scaling to 131072 tokens (1 layer, 2 query heads and 1 KV head
of 32: the attention is the whole cost, and a 128k prefill takes seconds, not hours), and SmolLM2-135M-Instruct
up to its 8192-token context. Greedy, one request at a time, default engine settings otherwise (kernel plan
"kernel", --kv-cache-memory auto), for each KV-cache dtype of --kv-cache-dtypes (default: fp16, int8, fp8 e4m3).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTEXTS = (4096, 8192, 32768, 131072)
KV_DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2")  # the bytes-per-token columns
MEASURED_KV_DTYPES = ("float16", "int8", "fp8_e4m3")
DECODE_TOKENS = 32


def tiny_long_model(directory: Path) -> Path:
    import transformers

    from tests.tiny_models import save_tiny_model

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=4096, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "yarn", "factor": 32.0, "rope_theta": 1e4,
                                                       "original_max_position_embeddings": 4096})
    return save_tiny_model(directory, config)


def run_one(engine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second after it) for one greedy request alone."""
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("r", prompt, params)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (max_tokens - 1) / (end - first)


def measure_contexts(name: str, model: str, contexts: list[int], vocab: int, kv_cache_dtype: str) -> list[dict]:
    from pagoda import LLM
    from pagoda.worker.kv_cache import kv_bytes_per_token, resolve_kv_cache_dtype

    rows = []
    for context in contexts:
        rng = random.Random(context)
        prompt = [rng.randrange(vocab) for _ in range(context - DECODE_TOKENS)]
        with LLM(model, max_model_len=context, max_num_seqs=1, max_prefill_tokens=2048, kv_cache_dtype=kv_cache_dtype,
                 progress=False) as llm:
            engine = llm.engine
            config = engine.model_config
            prefill, decode = run_one(engine, prompt, DECODE_TOKENS)
        per_token = {d: kv_bytes_per_token(config, resolve_kv_cache_dtype(d, torch.float32, torch.device("cpu")))
                     for d in KV_DTYPES}
        row = {"model": name, "context": context, "kv_cache_dtype": engine.plan.kv_cache_dtype,
               "kv_bytes_per_token": per_token, "prefill_seconds": prefill,
               "prefill_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": decode}
        row["requests_per_gib"] = {d: 2 ** 30 / (b * context) for d, b in per_token.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_fairness(model: str, long_len: int, vocab: int, shorts: int = 8, short_len: int = 64) -> dict:
    """TTFT of `shorts` requests of short_len tokens submitted one by one, spread over the prefill of one long_len
    prompt, with the scheduler's cap on a running prompt's chunk (the default) and without it (the long prompt
    takes the whole budget, as before the cap); and the long prompt's prefill time alone."""
    import dataclasses

    from pagoda import LLM, SamplingParams

    rng = random.Random(1)
    result = {"long_prompt_tokens": long_len, "short_requests": shorts, "short_prompt_tokens": short_len}
    with LLM(model, max_model_len=long_len + 64, max_num_seqs=16, progress=False) as llm:
        engine = llm.engine
        alone, _ = run_one(engine, [rng.randrange(vocab) for _ in range(long_len)], 2)
        result["long_prefill_alone_seconds"] = alone
        steps = -(-long_len // engine.config.max_prefill_tokens)  # steps of the long prefill alone
        every = max(1, steps // (shorts + 1))
        uncapped = dataclasses.replace(engine.scheduler.config,
                                       shared_prefill_chunk=engine.config.max_prefill_tokens)
        for label, config in (("capped", engine.scheduler.config), ("whole_budget", uncapped)):
            engine.scheduler.config = config
            engine.add_request(f"long-{label}", [rng.randrange(vocab) for _ in range(long_len)],
                               SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            submitted, first, step = {}, {}, 0
            while engine.has_unfinished_requests():
                if step % every == every - 1 and len(submitted) < shorts:
                    rid = f"{label}-s{len(submitted)}"
                    engine.add_request(rid, [rng.randrange(vocab) for _ in range(short_len)],
                                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                    submitted[rid] = time.perf_counter()
                for out in engine.step():
                    if out.request_id not in first and out.outputs[0].token_ids:
                        first[out.request_id] = time.perf_counter()
                step += 1
            ttft = sorted(first[r] - t for r, t in submitted.items())
            result[label] = {"short_ttft_seconds": ttft, "short_ttft_p50": ttft[len(ttft) // 2],
                             "short_ttft_max": ttft[-1]}
    print(json.dumps(result), flush=True)
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, dtype in sorted({(r["model"], r["kv_cache_dtype"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["kv_cache_dtype"]) == (name, dtype)]
        x = [r["context"] for r in mine]
        label = f"{name}, {dtype} KV"
        axes[0].plot(x, [r["prefill_seconds"] for r in mine], marker="o", label=label)
        axes[1].plot(x, [r["decode_tokens_per_s"] for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ("prefill of one prompt filling the context (s)", "decode at that context (tok/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    parser.add_argument("--kv-cache-dtypes", nargs="*", default=list(MEASURED_KV_DTYPES))
    parser.add_argument("--fairness-prompt", type=int, default=131000)
    parser.add_argument("--fairness-only", action="store_true", help="only the fairness measurement (not written)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_context.json")
    args = parser.parse_args()
    from pagoda.model_store import DEFAULT_MODEL

    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(tiny_long_model(Path(tmp) / "tiny-long"))
        fairness = measure_fairness(tiny, args.fairness_prompt, 512)
        if args.fairness_only:
            print(json.dumps(fairness))
            return
        rows = []
        for kv in args.kv_cache_dtypes:
            rows += measure_contexts("tiny yarn 128k (1 layer)", tiny, args.contexts, 512, kv)
            rows += measure_contexts("SmolLM2-135M", DEFAULT_MODEL, [c for c in args.contexts if c <= 8192], 49152,
                                     kv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"contexts": rows, "fairness": fairness}, indent=2))
    plot(rows, ROOT / "benchmarks" / "plots" / "long_context.png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
