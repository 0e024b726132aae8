"""Engine behaviour on the default model: seeds, n, logprobs, stops, limits, errors, aborts, failures."""

from __future__ import annotations

import pytest
import torch

from pagoda import SamplingParams
from pagoda.engine.llm_engine import PromptTooLongError
from pagoda.sampling_params import SamplingParamsError

STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def text_of(out) -> str:
    return out.outputs[0].text


def assert_idle(llm):
    kv = llm.engine.scheduler.kv_cache
    kv.check_integrity()
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.output_processor.requests


def test_seed_gives_the_same_tokens_alone_or_in_a_crowd(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
    [alone] = llm.generate([STORY], params)
    crowd = llm.generate(["Hello there", STORY, "def f(x):", "The weather today"],
                         [SamplingParams(temperature=1.0, max_tokens=30), params,
                          SamplingParams(temperature=0.7, max_tokens=10), SamplingParams(temperature=0, max_tokens=5)])
    assert crowd[1].outputs[0].token_ids == alone.outputs[0].token_ids
    [other_seed] = llm.generate([STORY], SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=24))
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    assert_idle(llm)


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16)
    [out] = llm.generate([STORY], params)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    [again] = llm.generate([STORY], params)
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    assert_idle(llm)


def test_greedy_logprobs_match_transformers(llm, hf_model):
    model, _ = hf_model
    tokenizer = llm.get_tokenizer()
    [out] = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=8, logprobs=5))
    sample = out.outputs[0]
    ids = tokenizer.encode(STORY) + sample.token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    start = len(ids) - len(sample.token_ids)
    assert len(sample.logprobs) == 8
    for i, lp in enumerate(sample.logprobs):
        expected = logprobs[start - 1 + i]
        assert lp.token_id == sample.token_ids[i]
        assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=2e-3)
        assert lp.top[0][0] == lp.token_id, "greedy picks the most likely token"
        assert [t for t, _ in lp.top] == expected.topk(5).indices.tolist()


def test_stop_strings_across_tokens_and_include_option(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40)
    [full] = llm.generate([STORY], greedy)
    text = text_of(full)
    stop = text[10:16]  # a piece of text that need not align with token boundaries
    [cut] = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    assert text_of(cut) == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    [kept] = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                  include_stop_str_in_output=True))
    assert text_of(kept) == text[: text.index(stop) + len(stop)]
    assert_idle(llm)


def test_stop_token_ids_max_tokens_min_tokens_ignore_eos(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [answer] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))
    eos_ended = answer.outputs[0]
    assert eos_ended.finish_reason == "stop" and eos_ended.token_ids[-1] == 2 and eos_ended.stop_reason is None
    n = len(eos_ended.token_ids)

    third = eos_ended.token_ids[2]
    [by_token] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[third]))
    assert by_token.outputs[0].token_ids == eos_ended.token_ids[:3] and by_token.outputs[0].stop_reason == third

    [short] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=3))
    assert short.outputs[0].finish_reason == "length" and len(short.outputs[0].token_ids) == 3

    [longer] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n + 10, min_tokens=n + 5))
    assert len(longer.outputs[0].token_ids) >= n + 5 and 2 not in longer.outputs[0].token_ids[: n + 4]

    [ignoring] = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n + 6, ignore_eos=True))
    assert len(ignoring.outputs[0].token_ids) == n + 6 and ignoring.outputs[0].finish_reason == "length"
    assert ignoring.outputs[0].token_ids[n - 1] == 2, "EOS is generated but does not stop the request"
    assert_idle(llm)


def test_prompt_token_ids_input_and_text_input_agree(llm):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=6)
    by_text, by_ids = llm.generate([STORY, {"prompt_token_ids": tokenizer.encode(STORY)}], params)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt == STORY and by_ids.prompt is None


def test_prefix_cache_reuses_the_shared_system_prompt(llm):
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    params = SamplingParams(temperature=0, max_tokens=8)
    [first] = llm.chat([system, {"role": "user", "content": "Name a color."}], params)
    [second] = llm.chat([system, {"role": "user", "content": "Name a fruit."}], params)
    assert second.num_cached_tokens >= 48, "the system prompt's full blocks come from the prefix cache"
    [repeat] = llm.chat([system, {"role": "user", "content": "Name a color."}], params)
    assert repeat.outputs[0].token_ids == first.outputs[0].token_ids
    assert_idle(llm)


def test_bad_requests_are_refused_before_any_work(llm):
    engine = llm.engine
    with pytest.raises(PromptTooLongError) as info:
        engine.add_request("long", [1] * engine.max_model_len, SamplingParams())
    assert str(engine.max_model_len) in str(info.value) and info.value.code == "context_length_exceeded"
    # prompt + max_tokens past the context: refused with the numbers, never cut silently
    prompt = [1] * 100
    room = engine.max_model_len - len(prompt)
    with pytest.raises(PromptTooLongError) as info:
        engine.add_request("too-many", prompt, SamplingParams(max_tokens=room + 1))
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded"
    assert f"{engine.max_model_len + 1} tokens (100 in the prompt, {room + 1} in the completion)" in str(info.value)
    assert f"at most {room} here" in str(info.value)
    with pytest.raises(SamplingParamsError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(SamplingParamsError, match="vocabulary"):
        engine.add_request("oov", [1, 10**6], SamplingParams())
    with pytest.raises(SamplingParamsError) as info:
        engine.add_request("bias", [1, 2], SamplingParams(logit_bias={10**6: 1.0}))
    assert info.value.param == "logit_bias"
    assert_idle(llm)


def test_abort_frees_blocks_and_reports_abort(llm):
    engine = llm.engine
    engine.add_request("a", STORY, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("b", STORY + " and", SamplingParams(n=2, max_tokens=200, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.kv_cache.usage > 0
    outs = engine.abort_request(["a", "b", "missing"])
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    assert all(o.finished and all(c.finish_reason == "abort" for c in o.outputs) for o in outs)
    assert_idle(llm)


def test_a_failing_step_fails_its_requests_not_the_engine(llm, monkeypatch):
    engine = llm.engine
    engine.add_request("doomed", STORY, SamplingParams(max_tokens=5))

    def explode(scheduler_output):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine.runner, "execute", explode)
    [out] = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "error" and "simulated" in out.error
    monkeypatch.undo()
    assert_idle(llm)
    [ok] = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=4))
    assert len(ok.outputs[0].token_ids) == 4
