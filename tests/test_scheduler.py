"""Block pool, KV cache manager and scheduler, driven by a fake model (no torch, no weights)."""

from __future__ import annotations

import random
import zlib

import pytest

from pagoda.core.block_pool import BlockPool
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.core.scheduler import Scheduler, SchedulerConfig
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams

EOS = 0


def fake_next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole history, never EOS."""
    return 1 + (sum(t * (i + 1) for i, t in enumerate(tokens)) % 97)


def make_request(rid: str, prompt_len: int, max_tokens: int, **params) -> Request:
    prompt = [1 + zlib.crc32(f"{rid}/{i}".encode()) % 50 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), frozenset({EOS}), max_tokens)


def run_fake_model(out: SchedulerOutput) -> ModelRunnerOutput:
    sampled = {}
    for s in out.requests:
        assert s.num_tokens > 0
        assert len(s.block_ids) * BLOCK >= s.end, "blocks must cover every scheduled token"
        if s.sample:
            sampled[s.request_id] = fake_next_token(s.token_ids[: s.end])
    return ModelRunnerOutput(sampled_token_ids=sampled)


BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=256, caching=True):
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), kv)


def run_to_completion(sched: Scheduler, max_steps=10_000):
    finished, steps = {}, []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        prompt_tokens = sum(s.num_tokens for s in out.requests if s.num_tokens > 1)
        assert prompt_tokens <= sched.config.max_prefill_tokens
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.requests)
        assert len(out.requests) <= sched.config.max_num_seqs
        steps.append(out)
        for o in sched.update_from_output(out, run_fake_model(out)):
            if o.finished:
                finished[o.request_id] = o.status
        sched.kv_cache.check_integrity()
    else:
        pytest.fail("requests did not finish")
    return finished, steps


def expected_output(req: Request) -> list[int]:
    tokens = list(req.prompt_token_ids)
    for _ in range(req.max_tokens):
        tokens.append(fake_next_token(tokens))
    return tokens[req.num_prompt_tokens:]


# ---- block pool -------------------------------------------------------------------------------------------


def test_block_pool_allocate_and_free():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free_blocks == 1
    assert pool.allocate(2) is None and pool.num_free_blocks == 1, "failed allocation changes nothing"
    pool.free(a)
    assert pool.num_free_blocks == 4
    pool.check_integrity()
    with pytest.raises(RuntimeError):
        pool.free(a[:1])


def test_block_pool_cached_blocks_are_revived_or_evicted():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.register(b, b"h")
    pool.free([b])
    assert pool.lookup(b"h") is b and pool.num_free_blocks == 2
    pool.touch([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([b])
    pool.allocate(2)  # reuses every block, evicting the cached one
    assert pool.lookup(b"h") is None and b.block_hash is None
    pool.check_integrity()


# ---- scheduler --------------------------------------------------------------------------------------------


def test_single_request_chunked_prefill_then_decode():
    sched = make_scheduler(budget=8)
    req = make_request("a", prompt_len=20, max_tokens=5)
    sched.add_request(req)
    finished, steps = run_to_completion(sched)
    chunks = [out.requests[0].num_tokens for out in steps]
    assert chunks == [8, 8, 4, 1, 1, 1, 1], "a 20-token prompt is prefilled in budget-sized chunks, then decoded"
    assert [out.requests[0].sample for out in steps] == [False, False, True, True, True, True, True]
    assert finished == {"a": RequestStatus.FINISHED_LENGTH}
    assert req.output_token_ids == expected_output(req)
    assert sched.kv_cache.pool.num_free_blocks == sched.kv_cache.num_blocks


def test_mixed_prefill_and_decode_in_one_step():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 4, 10))
    out = sched.schedule()
    sched.update_from_output(out, run_fake_model(out))
    sched.add_request(make_request("b", 30, 3))
    out = sched.schedule()
    kinds = {s.request_id: s.num_tokens for s in out.requests}
    assert kinds == {"a": 1, "b": 16}, "the decode of a rides beside a whole prompt chunk of b"


def test_decodes_do_not_shrink_the_prompt_budget():
    sched = make_scheduler(num_blocks=256, max_num_seqs=8, budget=16)
    for i in range(7):
        sched.add_request(make_request(f"d{i}", 3, 100))
    out = sched.schedule()
    assert sum(s.num_tokens for s in out.requests) == 16, "prompts share the budget: 5 whole, the 6th chunked"
    while any(sched.requests[f"d{i}"].num_computed_tokens < 3 for i in range(7)):
        sched.update_from_output(out, run_fake_model(out))
        out = sched.schedule()
    sched.update_from_output(out, run_fake_model(out))
    sched.add_request(make_request("prompt", 40, 1))
    sizes = {s.request_id: s.num_tokens for s in sched.schedule().requests}
    assert sizes == {**{f"d{i}": 1 for i in range(7)}, "prompt": 16}, "7 decodes and a whole 16-token chunk"


def test_a_long_prefill_leaves_room_for_a_new_request():
    """While a request waits, a running prompt takes at most half of the budget, so the newcomer starts at once
    (its TTFT does not wait for the whole long prefill); with nobody waiting the long prompt takes it all."""
    sched = make_scheduler(num_blocks=64, budget=16, max_model_len=256)
    sched.add_request(make_request("long", 200, 2))
    out = sched.schedule()
    assert {s.request_id: s.num_tokens for s in out.requests} == {"long": 16}
    sched.update_from_output(out, run_fake_model(out))
    sched.add_request(make_request("short", 5, 2))
    out = sched.schedule()
    assert {s.request_id: s.num_tokens for s in out.requests} == {"long": 8, "short": 5}
    sched.update_from_output(out, run_fake_model(out))
    out = sched.schedule()
    assert {s.request_id: s.num_tokens for s in out.requests} == {"long": 16, "short": 1}
    finished, _ = run_to_completion(sched)
    assert set(finished) == {"long", "short"}
    assert sched.requests == {} and sched.kv_cache.pool.num_free_blocks == sched.kv_cache.num_blocks


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 3, 4))
    out = sched.schedule()
    assert len(out.requests) == 2 and sched.num_waiting == 3
    finished, _ = run_to_completion(sched)
    assert len(finished) == 5


def test_continuous_batching_fills_a_freed_seat_next_step():
    sched = make_scheduler(max_num_seqs=2, budget=100)
    sched.add_request(make_request("short", 3, 1))
    sched.add_request(make_request("long", 3, 10))
    sched.add_request(make_request("next", 3, 2))
    out = sched.schedule()
    outs = sched.update_from_output(out, run_fake_model(out))
    assert [o.request_id for o in outs if o.finished] == ["short"]
    out = sched.schedule()
    assert {s.request_id for s in out.requests} == {"long", "next"}


def test_preemption_under_tiny_cache_every_request_finishes_with_the_same_tokens():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=12, max_num_seqs=6, budget=16, max_model_len=48, caching=False)
    reqs = [make_request(f"r{i}", rng.randint(3, 14), rng.randint(5, 20)) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    finished, steps = run_to_completion(sched)
    assert sched.num_preemptions_total > 0, "the cache is small enough that preemption must happen"
    assert set(finished) == {r.request_id for r in reqs}
    for r in reqs:
        assert r.output_token_ids == expected_output(r), f"{r.request_id} differs after preemption"
    assert sched.kv_cache.pool.num_free_blocks == 12, "no block leaked"
    assert any(s.preempted_ids for s in steps)


def test_preempted_request_resumes_at_the_front_of_the_queue():
    sched = make_scheduler(num_blocks=3, max_num_seqs=4, budget=64, max_model_len=12, caching=False)
    a, b, c = make_request("a", 4, 8), make_request("b", 4, 8), make_request("c", 4, 8)
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()  # one full block each; none free
    sched.update_from_output(out, run_fake_model(out))
    out = sched.schedule()  # a takes c's block; b finds none left and is preempted itself
    assert out.preempted_ids == ["c", "b"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0


def test_finish_requests_frees_blocks_whatever_the_state():
    sched = make_scheduler(max_num_seqs=1, budget=100)
    sched.add_request(make_request("run", 10, 50))
    sched.add_request(make_request("wait", 10, 50))
    out = sched.schedule()
    sched.update_from_output(out, run_fake_model(out))
    ended = sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in ended} == {"run", "wait"}
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.pool.num_free_blocks == sched.kv_cache.num_blocks
    sched.kv_cache.check_integrity()


def test_stop_token_ids_eos_and_min_tokens():
    sched = make_scheduler()
    r = make_request("a", 3, 10)
    stop_tok = expected_output(r)[2]
    a = make_request("a", 3, 10, stop_token_ids=[stop_tok])
    b = make_request("b", 3, 10, stop_token_ids=[stop_tok], min_tokens=5)
    c = make_request("a", 3, 10, ignore_eos=True)
    c.request_id, c.eos_token_ids = "c", frozenset({stop_tok})
    d = make_request("a", 3, 10)
    d.request_id, d.eos_token_ids = "d", frozenset({stop_tok})
    for r in (a, b, c, d):
        sched.add_request(r)
    finished, _ = run_to_completion(sched)
    assert finished["a"] == RequestStatus.FINISHED_STOPPED and a.output_token_ids[-1] == stop_tok
    assert len(a.output_token_ids) == 3 and a.stop_reason == stop_tok
    assert len(b.output_token_ids) >= 5, "min_tokens holds back the stop token"
    assert finished["c"] == RequestStatus.FINISHED_LENGTH and len(c.output_token_ids) == 10
    assert finished["d"] == RequestStatus.FINISHED_STOPPED and len(d.output_token_ids) == 3 and d.stop_reason is None


def test_prefix_cache_hits_share_blocks_and_skip_compute():
    sched = make_scheduler(budget=64)
    first = make_request("first", 13, 2)
    sched.add_request(first)
    run_to_completion(sched)
    second = Request("second", list(first.prompt_token_ids), SamplingParams(max_tokens=2), frozenset({EOS}), 2)
    sched.add_request(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 12, "3 full blocks of 4 tokens are reused"
    assert out.requests[0].start == 12 and out.requests[0].num_tokens == 1
    sched.update_from_output(out, run_fake_model(out))
    run_to_completion(sched)
    assert second.output_token_ids == first.output_token_ids
    sched.kv_cache.check_integrity()
    assert sched.kv_cache.pool.num_free_blocks == sched.kv_cache.num_blocks


def test_prefix_cache_never_covers_the_whole_prompt():
    sched = make_scheduler(budget=64)
    first = make_request("first", 8, 1)
    sched.add_request(first)
    run_to_completion(sched)
    again = Request("again", list(first.prompt_token_ids), SamplingParams(max_tokens=1), frozenset({EOS}), 1)
    sched.add_request(again)
    out = sched.schedule()
    assert again.num_cached_tokens == 4 and out.requests[0].num_tokens == 4, "the last block is recomputed"


def test_concurrent_shared_prefix_with_preemption_keeps_integrity():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=16, max_num_seqs=5, budget=12, max_model_len=64)
    shared = [7] * 9
    reqs = []
    for i in range(12):
        prompt = shared + [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        r = Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(3, 15)), frozenset({EOS}), 0)
        r.max_tokens = r.sampling_params.max_tokens
        reqs.append(r)
        sched.add_request(r)
    finished, _ = run_to_completion(sched)
    assert len(finished) == 12
    for r in reqs:
        assert r.output_token_ids == expected_output(r)
    assert any(r.num_cached_tokens > 0 for r in reqs)
    assert sched.kv_cache.pool.num_free_blocks == 16


def test_two_steps_in_flight_under_preemption_give_the_same_tokens():
    """Pipeline parallelism's scheduling: two steps in flight, each with half the requests; a request of a step in
    flight is neither scheduled again nor preempted (its KV blocks are being written), and a tiny cache forces
    preemptions among the others. Every request ends with the tokens of running alone."""
    from collections import deque

    sched = make_scheduler(num_blocks=24, budget=16, max_model_len=96)
    reqs = [make_request(f"r{i}", 5 + 7 * i, 12) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    in_flight: deque = deque()
    busy: set[str] = set()
    for _ in range(10_000):
        if not sched.has_unfinished_requests() and not in_flight:
            break
        share = max(1, -(-(sched.num_running + sched.num_waiting) // 2))
        while len(in_flight) < 2:
            out = sched.schedule(busy, share)
            if out.empty:
                break
            ids = {s.request_id for s in out.requests}
            assert not ids & busy, "a request in flight was scheduled again"
            assert len(out.requests) <= share
            in_flight.append(out)
            busy |= ids
        assert all(sched.requests[rid].status == RequestStatus.RUNNING for rid in busy if rid in sched.requests), (
            "a request in flight was preempted")
        out = in_flight.popleft()
        busy -= {s.request_id for s in out.requests}
        sched.update_from_output(out, run_fake_model(out))
        sched.kv_cache.check_integrity()
    assert sched.num_preemptions_total > 0
    assert [r.output_token_ids for r in reqs] == [expected_output(r) for r in reqs]
