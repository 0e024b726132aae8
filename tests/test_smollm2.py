"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.layers.attention import BatchLayout, ForwardContext, forward_context  # noqa: E402

GREEDY_TOKENS = 48
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: What is 12 times 7?\nA:",
    "Les bases de données relationnelles utilisent des tables. Une table contient des lignes et des colonnes, "
    "et chaque ligne représente un enregistrement. Par exemple, une table de clients peut contenir",
    "Hi",
]
LOGITS_ATOL = 2e-3  # fp32, same weights; differences come from summation order only


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def expected_greedy(hf_model, llm):
    model, _ = hf_model
    tokenizer = llm.get_tokenizer()
    return {p: hf_greedy(model, tokenizer.encode(p), GREEDY_TOKENS) for p in PROMPTS}


def greedy_params(n: int = GREEDY_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


def test_prefill_logits_close_to_transformers(hf_model, llm):
    model, _ = hf_model
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    runner = llm.engine.runner
    n = len(ids)
    pool = llm.engine.scheduler.kv_cache.pool
    taken = pool.allocate(-(-n // runner.block_size))  # through the pool, so no cached prefix is overwritten
    blocks = np.array([b.block_id for b in taken], dtype=np.int64)
    slots = torch.from_numpy(blocks[np.arange(n) // runner.block_size] * runner.block_size
                             + np.arange(n) % runner.block_size)
    layout = BatchLayout(np.array([0, n]), np.array([n]), blocks[None, :], 0, runner.block_size, slots)
    with torch.inference_mode(), forward_context(ForwardContext(
            runner.backend, runner.backend.build_metadata(layout, runner.windows), runner.kv_caches)):
        hidden = runner.model(torch.tensor(ids), torch.arange(n))
        ours = runner.model.compute_logits(hidden)
    pool.free(taken)
    diff = (ours - expected).abs().max().item()
    assert diff < LOGITS_ATOL, f"max |logit difference| {diff} exceeds {LOGITS_ATOL}"
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_greedy_batch_equals_transformers_and_each_alone(llm, expected_greedy):
    outs = llm.generate(PROMPTS, greedy_params())
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == expected_greedy[prompt], f"batched output differs for {prompt!r}"
    for prompt in PROMPTS[:3]:
        [alone] = llm.generate([prompt], greedy_params())
        assert alone.outputs[0].token_ids == expected_greedy[prompt], f"output alone differs for {prompt!r}"
    assert llm.engine.scheduler.kv_cache.usage == 0.0


def test_greedy_under_preemption_equals_transformers(smollm_gguf, expected_greedy):
    # 12 blocks of 16 tokens: the prompts (up to ~50 tokens) plus 48 generated each cannot all fit at once.
    small = LLM(str(smollm_gguf), dtype="float32", kv_cache_dtype="float32", kv_cache_memory=12 * 16 * 46080,
                max_prefill_tokens=64, enable_prefix_caching=False, progress=False)
    assert small.engine.kv_layout.num_blocks == 12
    outs = small.generate(PROMPTS, greedy_params())
    assert small.engine.scheduler.num_preemptions_total > 0, "the cache is small enough that preemption happens"
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == expected_greedy[prompt], f"output after preemption differs: {prompt!r}"
    kv = small.engine.scheduler.kv_cache
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.num_blocks, "every block is free again"


def test_chat_answers_paris(llm):
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_hf_directory_gives_the_same_tokens(hf_model, expected_greedy, tmp_path_factory):
    model, tokenizer = hf_model
    directory = tmp_path_factory.mktemp("smollm2-hf")
    plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)  # GGUF-loaded
    plain.load_state_dict(model.state_dict())  # models refuse save_pretrained; a plain copy does not
    plain.config.quantization_config = None
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    from_dir = LLM(str(directory), dtype="float32", kv_cache_memory="128MiB", progress=False)
    outs = from_dir.generate(PROMPTS[:3], greedy_params())
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.outputs[0].token_ids == expected_greedy[prompt]
    assert from_dir.get_tokenizer().eos_token_ids == frozenset({2})
