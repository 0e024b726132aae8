"""Gemma-3-270M (base model, Q4_K_M GGUF, sliding-window layers) against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagoda import LLM, SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def add(a, b):\n", "Once upon a time"]
TOKENS = 32


@pytest.fixture(scope="module")
def hf_gemma(gemma_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32).eval()


def test_gemma3_greedy_matches_transformers(gemma_gguf, hf_gemma):
    llm = LLM(str(gemma_gguf), dtype="float32", kv_cache_memory="256MiB", max_model_len=4096, progress=False)
    tokenizer = llm.get_tokenizer()
    # A long prompt crosses the 512-token sliding window of the local layers.
    long_prompt = " ".join(f"item {i}: the number {i * 7 % 13}." for i in range(90))
    prompts = PROMPTS + [long_prompt]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=TOKENS, min_tokens=TOKENS))
    assert len(tokenizer.encode(long_prompt)) > 600
    for prompt, out in zip(prompts, outs):
        ids = tokenizer.encode(prompt)
        assert ids[0] == tokenizer.bos_token_id, "Gemma prompts start with <bos>"
        with torch.no_grad():
            expected = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                         do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == expected, f"differs from transformers for {prompt[:40]!r}"
