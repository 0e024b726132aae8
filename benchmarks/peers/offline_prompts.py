"""Write the offline workload's prompts (64 synthetic prompts of 256 tokens, seeded, as `pagoda bench throughput`
builds them) as JSONL, so a peer's offline benchmark (openvino_offline.py) and `pagoda bench throughput --dataset`
run the same texts. A new seed per run: the engines cache prefixes.

    .venv/bin/python benchmarks/peers/offline_prompts.py --seed 1 OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    from pagoda.bench.workload import WorkloadSpec, build_workload, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spec = WorkloadSpec(args.num_prompts, input_len=args.input_len, output_len=args.output_len, seed=args.seed)
    with args.out.open("w") as f:
        for request in build_workload(spec, tokenizer):
            f.write(json.dumps({"prompt": request.prompt, "output_len": request.output_len}) + "\n")


if __name__ == "__main__":
    main()
