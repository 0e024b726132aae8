"""End-to-end quantized (gguf: the file's own blocks; int8: requantized) weights and fp16 KV cache vs fp32
weights and cache on the default model: decode speed and output quality.

A configuration is QUANTIZATION[+KV_CACHE_DTYPE][@KERNEL_PLAN]: "gguf" is the default engine (the GGUF's blocks,
fp16 KV cache on the CPU, the compiled kernels at every size), "gguf+float32" the same weights with an fp32 cache,
"gguf@auto" the kernel plan measured on this CPU (bf16 GEMMs where faster), "gguf@bf16:1" bf16 GEMMs (oneDNN) for
every call, "bf16" the weights rounded to bf16 (`--dtype bfloat16`, its bf16 KV cache; "bf16+float32" an fp32 one);
the reference "fp32" has fp32 weights and an fp32 cache.

Speed: one request (or --batch requests at once), greedy, ignore_eos, --tokens tokens; time per output token
after the first (steps after the prefill step), best of --repeats runs.
Quality: --prompts prompts x --quality-tokens greedy tokens. Reports greedy agreement (tokens equal to fp32's,
common prefix length), and, teacher-forced on fp32's greedy continuation, top-1 agreement and |logprob|
differences of fp32's chosen tokens.

    python benchmarks/quantized_e2e.py [--model PATH_OR_NAME] [--methods gguf,gguf+float32,int8] [--tokens 128]
                                       [--batch 1,16]
    python benchmarks/quantized_e2e.py --methods gguf,gguf@auto,gguf@bf16:1 --batch 1 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pagoda import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import sequence_logprobs

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: What is 12 times 7?\nA:",
    "Les bases de données relationnelles utilisent des tables. Une table contient des lignes et des colonnes,",
    "Hi",
    "Explain in simple terms why the sky is blue.",
    "import numpy as np\n\ndef softmax(x):",
]


def decode_seconds_per_token(llm: LLM, batch: int, tokens: int, repeats: int) -> float:
    """Best over `repeats` of (time of the steps after the first) / (tokens after the first), per request."""
    engine, params = llm.engine, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    best = float("inf")
    for run in range(repeats):
        for i in range(batch):
            engine.add_request(f"speed-{run}-{i}", PROMPTS[i % len(PROMPTS)], params)
        engine.step()  # prefill + first token of every request (the prompts fit one step's budget)
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        best = min(best, (time.perf_counter() - start) / max(steps, 1))
    return best


def quality(reference: LLM, candidate: LLM, num_prompts: int, tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = PROMPTS[:num_prompts]
    ref_out = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    cand_out = [o.outputs[0].token_ids for o in candidate.generate(prompts, params)]
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), len(r)) for r, c in zip(ref_out, cand_out)]
    diffs, top1 = [], []
    tokenizer = reference.get_tokenizer()
    for prompt, cont in zip(prompts, ref_out):
        ids = tokenizer.encode(prompt) + cont
        positions = torch.arange(len(ids) - len(cont) - 1, len(ids) - 1)  # each predicts the next (fp32's) token
        chosen = torch.tensor(cont)
        ref_lp, cand_lp = sequence_logprobs(reference, ids)[positions], sequence_logprobs(candidate, ids)[positions]
        diffs.append((ref_lp.gather(1, chosen[:, None]) - cand_lp.gather(1, chosen[:, None])).abs().squeeze(1))
        top1.append(cand_lp.argmax(-1) == chosen)
    diff, agree = torch.cat(diffs), torch.cat(top1)
    return {
        "identical_outputs": sum(p == tokens for p in prefixes) / len(prefixes),
        "first_16_identical": sum(p >= 16 for p in prefixes) / len(prefixes),
        "mean_common_prefix": statistics.mean(prefixes),
        "token_match": float(np.mean([np.mean(np.equal(r, c)) for r, c in zip(ref_out, cand_out)])),
        "teacher_forced_top1": agree.float().mean().item(),
        "mean_abs_logprob_diff": diff.mean().item(),
        "max_abs_logprob_diff": diff.max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or path (default: the default model)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request for speed (default: 128)")
    parser.add_argument("--batch", default="1,16", help="requests at once for speed (default: 1,16)")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs, best taken (default: 3)")
    parser.add_argument("--methods", default="gguf,gguf+float32,int8",
                        help="QUANTIZATION[+KV_CACHE_DTYPE][@KERNEL_PLAN] configurations (QUANTIZATION may be "
                             "bf16) to compare with fp32 (default: gguf,gguf+float32,int8)")
    parser.add_argument("--prompts", type=int, default=8, help=f"quality prompts, at most {len(PROMPTS)}")
    parser.add_argument("--quality-tokens", type=int, default=64, help="greedy tokens per prompt (default: 64)")
    args = parser.parse_args()
    kwargs = {"dtype": "float32", "kv_cache_memory": "512MiB", "progress": False}
    methods = args.methods.split(",")
    llms = {"fp32": LLM(args.model, quantization=None, kv_cache_dtype="float32", **kwargs)}
    for method in methods:
        weights, _, plan = method.partition("@")
        quantization, _, kv_cache_dtype = weights.partition("+")
        config = dict(kwargs, quantization=quantization, kv_cache_dtype=kv_cache_dtype or "auto",
                      kernel_plan=plan or "kernel")
        if quantization == "bf16":  # the weights in bf16, no quantization: `--dtype bfloat16`
            config.update(dtype="bfloat16", quantization=None)
        llms[method] = LLM(args.model, **config)
        print(f"{method}: kernel plan {llms[method].engine.plan.kernel_plan}", flush=True)
    print(f"threads={torch.get_num_threads()}")
    for batch in (int(b) for b in args.batch.split(",")):
        for name, llm in llms.items():
            seconds = decode_seconds_per_token(llm, batch, args.tokens, args.repeats)
            print(f"decode batch={batch:>3} {name}: {seconds * 1e3:7.2f} ms/step  {batch / seconds:8.1f} tok/s",
                  flush=True)
    for method in methods:
        for key, value in quality(llms["fp32"], llms[method], args.prompts, args.quality_tokens).items():
            print(f"{method} {key}: {value:.4f}")


if __name__ == "__main__":
    main()
