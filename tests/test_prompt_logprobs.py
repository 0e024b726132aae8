"""Prompt logprobs of the offline engine against transformers on the same weights (tolerance: see
tests/logprobs_oracle.py): whole prompts, prompts prefilled in several chunks, under preemption, batched with
plain requests and over a prefix another request has cached; max_tokens 0; and the default precision's
native decoder stack against the torch modules."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.logprobs_oracle import assert_prompt_logprobs_match, hf_logprobs

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and a "
        "notebook in which he wrote down the ships he saw, the colour of the sky and the direction of the wind. "
        "Nobody had asked him to keep such a record, but after forty years it filled a whole shelf of the tower, "
        "and sailors from distant ports came to read it before they set out across the bay. In the winter of the "
        "great storm the lamp went out for the first time, and the keeper, who was by then very old, sat by the "
        "window all night long with a candle, counting the waves that broke over the rocks below and listening "
        "for the bells of the fishing boats that were still out at sea. By morning every boat had come home.")


def assert_idle(engine) -> None:
    kv = engine.scheduler.kv_cache
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert not engine.has_unfinished_requests() and not engine.output_processor.requests


@pytest.fixture(scope="module")
def chunked(smollm_gguf):
    """fp32 like `llm`, but 16 prompt tokens per step and a KV cache of 17 blocks (272 tokens): long prompts
    are prefilled in several chunks and a few requests are enough to force preemption."""
    return LLM(str(smollm_gguf), dtype="float32", quantization=None, kv_cache_dtype="float32",
               kv_cache_memory="12MiB", max_prefill_tokens=16, progress=False)


def test_prompt_logprobs_match_transformers_and_max_tokens_zero_samples_nothing(llm, hf_model):
    ids = llm.get_tokenizer().encode(TEXT)[:40]
    [out] = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=5))
    assert_prompt_logprobs_match(out.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=5)
    sample = out.outputs[0]
    assert out.finished and sample.finish_reason == "length" and sample.token_ids == [] and sample.text == ""
    assert_idle(llm.engine)


def test_prompt_logprobs_leave_generation_alone(llm, hf_model):
    ids = llm.get_tokenizer().encode(TEXT)[:30]
    [plain] = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6, logprobs=2))
    [scored] = llm.generate({"prompt_token_ids": ids},
                            SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=0, n=2))
    assert plain.prompt_logprobs is None
    assert_prompt_logprobs_match(scored.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=0)
    for sample in scored.outputs:  # both samples; only the first computed the prompt's logprobs
        assert sample.token_ids == plain.outputs[0].token_ids
        assert [lp.logprob for lp in sample.logprobs] == pytest.approx(
            [lp.logprob for lp in plain.outputs[0].logprobs], abs=1e-4)
    assert_idle(llm.engine)


def test_a_prompt_prefilled_in_chunks_gives_the_same_values(chunked, hf_model):
    ids = chunked.get_tokenizer().encode(TEXT)[:100]  # 7 chunks of at most 16 tokens
    [out] = chunked.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=3))
    assert_prompt_logprobs_match(out.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=3)
    assert_idle(chunked.engine)


def test_preemption_during_the_prefill_neither_loses_nor_repeats_logprobs(chunked, hf_model):
    engine = chunked.engine
    tokens = engine.tokenizer.encode(TEXT)
    ids = tokens[:120]
    assert len(ids) == 120
    long_run = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", tokens[:60], long_run)
    engine.add_request("b", tokens[1:61], long_run)
    engine.add_request("scored", ids, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2))
    finals, preempted_with = {}, []
    while engine.has_unfinished_requests():
        request = engine.scheduler.requests.get("scored#0")
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if request is not None and request.status.name == "PREEMPTED":
            preempted_with.append(len(request.prompt_logprobs))
    # The cache (272 tokens) holds the two decoders and part of the scored prompt: it was preempted while it had
    # some of its prompt logprobs, then recomputed its prefix.
    assert any(0 < n < len(ids) - 1 for n in preempted_with), preempted_with
    assert_prompt_logprobs_match(finals["scored"].prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=2)
    assert len(finals["scored"].outputs[0].token_ids) == 4
    assert_idle(engine)


def test_batched_with_plain_requests_and_over_a_cached_prefix(chunked, hf_model):
    engine = chunked.engine
    tokens = engine.tokenizer.encode(TEXT)
    # tokens from 50 on: no earlier test of the module cached blocks of these (hashes chain from the start)
    prefix, ids = tokens[50:98], tokens[50:120]
    [warm] = chunked.generate({"prompt_token_ids": prefix}, SamplingParams(temperature=0, max_tokens=2))
    outs = chunked.generate(
        [{"prompt_token_ids": ids}, {"prompt_token_ids": ids}, {"prompt_token_ids": tokens[5:40]}],
        [SamplingParams(temperature=0, max_tokens=3), SamplingParams(max_tokens=0, prompt_logprobs=1),
         SamplingParams(temperature=0, max_tokens=3)])
    plain, scored, other = outs
    assert plain.num_cached_tokens == 48  # the prefix cache is there...
    assert scored.num_cached_tokens == 0  # ...and the scored request computes its whole prompt anyway
    assert_prompt_logprobs_match(scored.prompt_logprobs, ids, hf_logprobs(hf_model, ids), k=1)
    [alone] = chunked.generate({"prompt_token_ids": tokens[5:40]}, SamplingParams(temperature=0, max_tokens=3))
    assert other.outputs[0].token_ids == alone.outputs[0].token_ids
    assert warm.outputs[0].token_ids and plain.outputs[0].token_ids
    assert_idle(engine)


def test_default_precision_native_stack_rows_match_the_torch_modules(served_llm):
    """The default engine (the GGUF's Q4_1 blocks) runs its prefill on the native decoder stack, whose hidden
    states of every row feed the LM head: its prompt logprobs agree with the torch modules' on the same
    quantized weights (measured 2e-3 apart: both round activations per group of 32, in different fp32 orders;
    bound 1e-2), and the one of a greedy token is the sampler's logprob of it (within 1e-3)."""
    runner = served_llm.engine.runner
    assert runner.native_stack is not None and runner.native_stack.max_tokens is None  # every step runs natively
    ids = served_llm.get_tokenizer().encode(TEXT)[:60]
    params = SamplingParams(max_tokens=0, prompt_logprobs=3)
    [native] = served_llm.generate({"prompt_token_ids": ids}, params)
    stack, runner.native_stack = runner.native_stack, None
    try:
        [torch_path] = served_llm.generate({"prompt_token_ids": ids}, params)
    finally:
        runner.native_stack = stack
    for a, b in zip(native.prompt_logprobs[1:], torch_path.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-2)
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-2)
    [greedy] = served_llm.generate({"prompt_token_ids": ids[:30]},
                                   SamplingParams(temperature=0, max_tokens=1, logprobs=0))
    [sampled] = greedy.outputs[0].logprobs
    [scored] = served_llm.generate({"prompt_token_ids": ids[:30] + [sampled.token_id]},
                                   SamplingParams(max_tokens=0, prompt_logprobs=0))
    # the same row of the same weights, in a step one token longer (the kernels' fp32 sums may split differently)
    assert scored.prompt_logprobs[-1].logprob == pytest.approx(sampled.logprob, abs=1e-3)
    assert_idle(served_llm.engine)
