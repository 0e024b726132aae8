"""Write a Hugging Face directory (bf16 safetensors + tokenizer + chat template) from a GGUF file, for peers that
need one (vLLM). Uses transformers' GGUF dequantization; run with a Python that has transformers (the project's
.venv after `make setup`).

    .venv/bin/python benchmarks/peers/export_hf.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers


def export(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=dtype)  # GGUF-loaded models
    plain.load_state_dict(model.state_dict())  # refuse save_pretrained; a plain copy does not
    plain.config.quantization_config = None
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)  # written as null, which optimum's export reads as a quantizer
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    export(Path(sys.argv[1]), Path(sys.argv[2]))
