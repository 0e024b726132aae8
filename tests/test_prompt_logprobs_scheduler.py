"""Prompt logprobs in the scheduler, with a fake model (no torch): which positions each step asks the runner
for (chunked prefill, preemption, prefix cache), and max_tokens 0."""

from __future__ import annotations

import pytest

from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from pagoda.request import RequestStatus
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from tests.test_scheduler import BLOCK, fake_next_token, make_request, make_scheduler


def fake_logprob(tokens: list[int], position: int) -> TokenLogprobs:
    """A deterministic stand-in for the logits at `position` scoring the token after it."""
    return TokenLogprobs(tokens[position + 1], -float(position), [], rank=1)


def run_fake_model(out: SchedulerOutput, asked: list[tuple[str, int]]) -> ModelRunnerOutput:
    """Like the real runner: a token for sampling rows, prompt logprobs for each requested position (recorded
    in `asked` as (request id, position))."""
    sampled, prompt_logprobs = {}, {}
    for s in out.requests:
        lo, hi = s.prompt_logprobs_start, s.prompt_logprobs_stop
        assert (lo, hi) == (0, 0) or s.start <= lo < hi <= s.end
        if s.sample:
            sampled[s.request_id] = fake_next_token(s.token_ids[: s.end])
        positions = range(lo, hi)
        if positions:
            asked.extend((s.request_id, p) for p in positions)
            prompt_logprobs[s.request_id] = [fake_logprob(s.token_ids, p) for p in positions]
    return ModelRunnerOutput(sampled, prompt_logprobs=prompt_logprobs)


def drive(sched, max_steps=2000):
    """Run to completion. Returns (core outputs by request id, positions asked for, ids seen preempted)."""
    outputs, asked, preempted = {}, [], set()
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        preempted.update(out.preempted_ids)
        for o in sched.update_from_output(out, run_fake_model(out, asked)):
            outputs.setdefault(o.request_id, []).append(o)
    assert not sched.has_unfinished_requests()
    sched.kv_cache.check_integrity()
    assert sched.kv_cache.pool.num_free_blocks == sched.kv_cache.num_blocks
    return outputs, asked, preempted


def expected_logprobs(request) -> list[TokenLogprobs]:
    return [fake_logprob(request.prompt_token_ids, p) for p in range(request.num_prompt_tokens - 1)]


def test_chunked_prefill_asks_each_position_once_and_delivers_with_the_first_token():
    sched = make_scheduler(budget=8)
    r = make_request("r", 30, 5, prompt_logprobs=2)
    sched.add_request(r)
    outputs, asked, _ = drive(sched)
    assert asked == [("r", p) for p in range(29)]  # 4 chunks, no position twice, none past the prompt
    first, *rest = outputs["r"]
    assert first.prompt_logprobs == expected_logprobs(r)
    assert len(first.new_token_ids) == 1
    assert all(o.prompt_logprobs is None for o in rest)


def test_max_tokens_zero_finishes_after_the_prefill_without_sampling():
    sched = make_scheduler(budget=8)
    r = make_request("r", 21, 0, prompt_logprobs=0)
    plain = make_request("plain", 9, 4)
    sched.add_request(r)
    sched.add_request(plain)
    outputs, _, _ = drive(sched)
    [only] = outputs["r"]
    assert only.new_token_ids == [] and only.status == RequestStatus.FINISHED_LENGTH
    assert only.prompt_logprobs == expected_logprobs(r)
    assert r.output_token_ids == []
    assert len(outputs["plain"]) == 4  # its batch mate is untouched


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=0)
    assert info.value.param == "max_tokens"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(prompt_logprobs=21)
    assert info.value.param == "prompt_logprobs"
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


def test_preemption_mid_prefill_keeps_what_was_computed():
    # 12 blocks of 4 tokens: two long decoders fill the cache while the prompt-logprobs request prefills in
    # chunks, so it (the most recent) is preempted part-way and recomputes its prefix later.
    sched = make_scheduler(num_blocks=12, budget=2, max_model_len=48)
    a = make_request("a", 4, 40, ignore_eos=True)
    b = make_request("b", 4, 40, ignore_eos=True)
    r = make_request("r", 24, 3, prompt_logprobs=1)
    for request in (a, b, r):
        sched.add_request(request)
    partial = []  # how many prompt logprobs r had each time it was preempted
    original = sched._preempt

    def preempt(request):
        if request is r:
            partial.append(len(r.prompt_logprobs))
        original(request)

    sched._preempt = preempt
    outputs, asked, preempted = drive(sched)
    assert "r" in preempted and any(0 < n < 23 for n in partial), partial
    positions = [p for rid, p in asked if rid == "r"]
    assert positions == list(range(23))  # each position asked for once, across the preemption
    first = outputs["r"][0]
    assert first.prompt_logprobs == expected_logprobs(r)
    assert sum(o.prompt_logprobs is not None for o in outputs["r"]) == 1


def test_prompt_logprobs_request_takes_no_prefix_hits_but_publishes_its_blocks():
    sched = make_scheduler(budget=64)
    warm = make_request("warm", 20, 1)
    sched.add_request(warm)
    drive(sched)
    same = make_request("warm", 20, 1, prompt_logprobs=0)
    same.request_id = "scored"
    sched.add_request(same)
    outputs, asked, _ = drive(sched)
    assert same.num_cached_tokens == 0
    assert [p for _, p in asked] == list(range(19))
    assert outputs["scored"][0].prompt_logprobs == expected_logprobs(same)
    # ...and a plain request after it reuses the blocks it computed.
    again = make_request("warm", 20, 1)
    again.request_id = "again"
    sched.add_request(again)
    drive(sched)
    assert again.num_cached_tokens == (19 // BLOCK) * BLOCK


def test_prefix_hits_are_capped_at_the_known_prompt_logprobs():
    sched = make_scheduler(budget=64)
    sched.add_request(make_request("warm", 20, 1))
    drive(sched)
    r = make_request("warm", 20, 5, prompt_logprobs=0)
    assert r.max_prefix_hit_tokens == 0 and sched.kv_cache.find_cached_prefix(r) == []
    r.prompt_logprobs.extend(expected_logprobs(r)[:9])  # as if computed before a preemption
    assert len(sched.kv_cache.find_cached_prefix(r)) == 9 // BLOCK
    r.prompt_logprobs.extend(expected_logprobs(r)[9:])
    assert len(sched.kv_cache.find_cached_prefix(r)) == 19 // BLOCK  # all known: the usual cap
    assert make_request("x", 20, 5).max_prefix_hit_tokens is None
