"""`pagoda plan` against the memory an engine really takes: for each registry model and precision, the planner's
per-rank total for one request of CONTEXT tokens beside the resident memory (RSS) of a fresh process that loaded
the engine and served such a request (each configuration in its own process).

    .venv/bin/python benchmarks/planner_rss.py            # writes benchmarks/results/planner_rss.json

Precisions: the GGUF's own blocks (default; planned from the file as Pagoda holds it), int8 (every linear layer
requantized; planned from the config at int8), fp32 weights (`--quantization none`) and bf16 weights (`--dtype
bfloat16`), each with the default fp16 KV cache (bf16 for the bf16 model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 2048
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
PRECISIONS = {  # name: (engine keyword arguments, planner precision or None for the file's bytes)
    "gguf": ({}, None),
    "int8": ({"quantization": "int8"}, "int8"),
    "fp32": ({"quantization": None}, "fp32"),
    "bf16": ({"quantization": None, "dtype": "bfloat16"}, "bf16"),
}

CHILD = """
import json, random, sys
from pagoda import LLM, SamplingParams
model, kwargs, context = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model, max_model_len=context, max_num_seqs=1, kv_cache_memory="auto", progress=False, **kwargs)
vocab = llm.engine.model_config.vocab_size
prompt = [random.Random(0).randrange(1, vocab) for _ in range(context - 8)]
llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
plan = llm.engine.plan
print(json.dumps({"rss": int(status["VmRSS"].split()[0]) * 1024, "hwm": int(status["VmHWM"].split()[0]) * 1024,
                  "weight_bytes": plan.weight_bytes, "kv_bytes_per_token": plan.kv_bytes_per_token,
                  "kv_cache_dtype": plan.kv_cache_dtype}))
"""


def main() -> None:
    from pagoda.planner import load_for_plan, plan, weight_bytes_from_config

    rows = []
    for model in MODELS:
        config, held, _ = load_for_plan(model)
        for name, (kwargs, precision) in PRECISIONS.items():
            out = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(kwargs), str(CONTEXT)],
                                 capture_output=True, text=True, check=True)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            weights = held if precision is None else weight_bytes_from_config(config, precision)
            p = plan(config, weights=weights, precision=precision or "bf16", context=CONTEXT,
                     kv_cache_dtype=measured["kv_cache_dtype"], concurrency=1, max_num_seqs=1)
            row = {"model": model, "precision": name, "planned_total": p.total_per_rank,
                   "planned_weights": p.weights_per_rank, "engine_weights": measured["weight_bytes"],
                   "rss": measured["rss"], "peak_rss": measured["hwm"],
                   "planned_over_rss": p.total_per_rank / measured["rss"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out_path = ROOT / "benchmarks" / "results" / "planner_rss.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
