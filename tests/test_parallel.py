"""Tensor and pipeline parallelism (pagoda/parallel/): the same greedy tokens and logprobs as one rank.

Tiny random-weight models of each architecture run with TP=2, PP=2 and TP=2 x PP=2 (4 processes, one thread
each) on a batch whose prompts are prefilled in chunks and whose KV cache is small enough to preempt; the tokens
must equal the single-rank engine's, and the logprobs of the sampled and of the prompt tokens agree within 1e-4
(fp32: only the order of the all-reduce's additions differs). The splits that do not divide evenly are covered:
6 heads over 3 KV heads on 2 ranks (a 1:2 split of the KV groups), 2 KV heads on 4 ranks (each replicated
twice), and a vocabulary of 321 tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.loader.hf_loader import read_config
from pagoda.parallel.layout import ParallelConfig, layer_ranges, partition_heads, rank_layout, split
from pagoda.worker.kv_cache import kv_bytes_per_token

transformers = pytest.importorskip("transformers")

from tests.tiny_models import save_tiny_model  # noqa: E402

VOCAB = 321  # odd: the vocabulary splits unevenly over 2 ranks
MAX_TOKENS = 16
NUM_BLOCKS = 12  # 192 cached tokens for five requests of up to 91: preemption is certain


def _configs():
    common = dict(vocab_size=VOCAB, intermediate_size=160, num_hidden_layers=4, max_position_embeddings=512,
                  initializer_range=0.15, rms_norm_eps=1e-5)
    return {
        # 6 query heads in 3 KV groups: on 2 ranks, one holds one group and the other two
        "llama": transformers.LlamaConfig(**common, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                          tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False),
        "qwen3": transformers.Qwen3Config(**common, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, tie_word_embeddings=True),
        "gemma3": transformers.Gemma3TextConfig(**common, hidden_size=64, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=32, sliding_window=12,
                                                query_pre_attn_scalar=24,
                                                layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention", "full_attention"]),
    }


CONFIGS = _configs()
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def _prompts() -> list[dict]:
    rng = random.Random(7)
    return [{"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(n)]} for n in (1, 5, 17, 40, 75)]


def _engine_kwargs(directory, tp: int, pp: int) -> dict:
    """fp32 weights and cache; a 32-token prompt budget (chunked prefill); NUM_BLOCKS blocks on every rank."""
    config = read_config(directory)
    parallel = ParallelConfig(tp, pp)
    per_token = max(kv_bytes_per_token(config, torch.float32,
                                       rank_layout(parallel, r, config.num_hidden_layers))
                    for r in range(parallel.world_size))
    return dict(dtype="float32", quantization=None, kv_cache_dtype="float32", max_prefill_tokens=32,
                kv_cache_memory=NUM_BLOCKS * 16 * per_token, max_num_seqs=8, tensor_parallel_size=tp,
                pipeline_parallel_size=pp, threads_per_rank=1, progress=False)


def _run(directory, tp: int, pp: int, transport: str = "shm"):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    with LLM(str(directory), **_engine_kwargs(directory, tp, pp)) as llm:
        outputs = llm.generate(_prompts(), params)
        preemptions = llm.engine.scheduler.num_preemptions_total
        assert {p.tp_transport for p in llm.engine.plans} == {transport if tp > 1 else "none"}
        assert llm.engine.scheduler.kv_cache.pool.num_free_blocks == llm.engine.scheduler.kv_cache.num_blocks
    tokens = [o.outputs[0].token_ids for o in outputs]
    # the sampled tokens' logprobs, and the prompt's (computed on the last stage, chunk by chunk)
    logprobs = [[lp.logprob for lp in o.outputs[0].logprobs] + [lp.logprob for lp in o.prompt_logprobs[1:]]
                for o in outputs]
    return tokens, logprobs, preemptions


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return request.param, directory, _run(directory, 1, 1)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_parallel_layouts_match_one_rank(tiny, tp, pp):
    name, directory, (tokens, logprobs, preemptions) = tiny
    assert preemptions > 0, "the single-rank run must preempt, or the test proves less than it says"
    got_tokens, got_logprobs, got_preemptions = _run(directory, tp, pp)
    assert got_preemptions > 0
    assert got_tokens == tokens
    for ours, reference in zip(got_logprobs, logprobs):
        assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4


def test_kv_heads_replicated_over_four_ranks(tmp_path, monkeypatch):
    """2 KV heads on TP=4: every KV head is held by two ranks, each with one of its query heads. The all-reduce
    goes through gloo here (PAGODA_TP_TRANSPORT; elsewhere the ranks share a host, so shared memory)."""
    monkeypatch.setenv("PAGODA_TP_TRANSPORT", "gloo")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.15, tie_word_embeddings=True)
    directory = save_tiny_model(tmp_path, config)
    tokens, logprobs, _ = _run(directory, 1, 1)
    got_tokens, got_logprobs, _ = _run(directory, 4, 1, transport="gloo")
    assert got_tokens == tokens
    for ours, reference in zip(got_logprobs, logprobs):
        assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4


def test_ranks_agree_on_an_automatic_cache_size(tmp_path):
    """--kv-cache-memory auto on two pipeline stages of unequal layers: both ranks measure after the barrier, share
    the host, and hold the same blocks (the scheduler's one block table serves both)."""
    directory = save_tiny_model(tmp_path, CONFIGS["qwen3"])
    with LLM(str(directory), dtype="float32", quantization=None, kv_cache_dtype="float32", max_model_len=256,
             max_num_seqs=4, pipeline_parallel_size=2, pipeline_layers=(1, 3), threads_per_rank=1,
             progress=False) as llm:
        plans = llm.engine.plans
        assert len({p.kv_cache_blocks for p in plans}) == 1 and plans[0].kv_cache_tokens == 4 * 256
        assert all("/ 2 ranks" in p.kv_cache_sizing for p in plans)
        assert plans[1].kv_cache_bytes == 3 * plans[0].kv_cache_bytes  # 3 layers against 1
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4


# ---- the layout arithmetic ---------------------------------------------------------------------------------------

def test_splits_are_balanced_and_aligned():
    assert split(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split(1536, 2, 32) == [(0, 768), (768, 1536)]
    assert split(321, 2, 32) == [(0, 160), (160, 321)]  # boundaries on whole blocks, the remainder at the end
    with pytest.raises(ValueError):
        split(2, 3)
    assert layer_ranges(30, 2) == [(0, 15), (15, 30)]
    assert layer_ranges(30, 2, (10, 20)) == [(0, 10), (10, 30)]
    with pytest.raises(ValueError, match="add up"):
        layer_ranges(30, 2, (10, 10))


def test_head_partitions():
    # SmolLM2: 9 heads in 3 groups on 2 ranks -> whole groups, 1 and 2 (the driver, which also schedules and
    # samples, gets the smaller share)
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in partition_heads(9, 3, 2)] == [
        (0, 3, 0, 1), (3, 9, 1, 3)]
    # fewer KV heads than ranks: each KV head replicated, its query heads split
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in partition_heads(8, 2, 4)] == [
        (0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]
    with pytest.raises(ValueError, match="multiple"):
        partition_heads(6, 2, 3)
    with pytest.raises(ValueError, match="without a query head"):
        partition_heads(2, 1, 4)


def test_rank_layout_numbering():
    parallel = ParallelConfig(2, 2)
    layouts = [rank_layout(parallel, r, 30) for r in range(4)]
    assert [(lay.tp_rank, lay.pp_rank, lay.layer_start, lay.layer_end) for lay in layouts] == [
        (0, 0, 0, 15), (1, 0, 0, 15), (0, 1, 15, 30), (1, 1, 15, 30)]
    assert layouts[0].stage_rank(1) == 2 and layouts[3].stage_rank(0) == 1


def test_channel_keeps_a_bounded_number_of_sends(monkeypatch):
    """gloo's send works say is_completed() only after a wait: the channel must wait for old sends itself, or
    every send (and its buffer) of a long-running server stays in its list."""
    from pagoda.parallel import runtime

    class GlooLikeSend:
        def __init__(self):
            self.waited = False

        def is_completed(self):
            return self.waited

        def wait(self, timeout=None):
            self.waited = True

    sends = []
    monkeypatch.setattr(runtime.dist, "isend", lambda tensor, dst, group=None, tag=0: sends.append(GlooLikeSend())
                        or sends[-1])
    channel = runtime.Channel(None, None)
    for step in range(1000):
        channel.send_object({"step": step}, 1, runtime.TAG_STEP)  # a header and a payload each
    assert len(channel._in_flight) == runtime.MAX_PENDING_SENDS
    assert all(s.waited for s in sends[:-runtime.MAX_PENDING_SENDS])
    channel.flush()
    assert not channel._in_flight and all(s.waited for s in sends)
