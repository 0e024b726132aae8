"""The Hugging Face transformers baseline: static batching with `generate`, fp32, on the same GGUF weights.

W1 and W2's shapes offline (no HTTP): W1 = 8 requests one at a time, 128 prompt tokens, 128 output tokens;
W2 = 64 requests in static batches of 16, 256 prompt tokens, 128 output tokens. Greedy; every request
generates exactly the output length.

    .venv/bin/python benchmarks/hf_baseline.py   # -> benchmarks/results/hf_baseline.json (needs transformers)
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pagoda.model_store import resolve_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "hf_baseline.json"
WORKLOADS = {"W1": (1, 8, 128, 128), "W2": (16, 64, 256, 128)}  # batch, requests, prompt, output


def main() -> None:
    import transformers

    path = resolve_model("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    result = {"transformers": transformers.__version__, "torch": torch.__version__}
    for name, (batch, total, prompt_len, output_len) in WORKLOADS.items():
        rng = random.Random(0)
        prompts = torch.tensor([[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(total)])
        with torch.inference_mode():
            model.generate(prompts[:1, :8], max_new_tokens=4, do_sample=False)  # warm-up
            start = time.perf_counter()
            for i in range(0, total, batch):
                ids = prompts[i:i + batch]
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                               min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            seconds = time.perf_counter() - start
        result[name] = {"batch": batch, "requests": total, "seconds": seconds,
                        "output_tok_s": total * output_len / seconds}
        print(name, result[name], flush=True)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
