"""`--kv-cache-memory auto`: the KV cache sized from the memory left once the weights are loaded, capped at what
the scheduler can use, refused with the numbers when one request cannot fit; the lazily committed cache; the
memory figures on /v1/engine and /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from pagoda.config import CacheConfig, EngineConfig, ModelConfig
from pagoda.entrypoints.llm import LLM
from pagoda.worker import kv_cache
from pagoda.worker.kv_cache import KVCacheLayout, allocate_kv_cache, kv_cache_budget

GiB = 2 ** 30
AUTO = CacheConfig(kv_cache_memory=None)


def budget(available: int, ranks: int = 1, max_model_len: int = 4096, is_set: bool = False, per_token: int = 1024,
           cache: CacheConfig = AUTO):
    return kv_cache_budget(cache, per_token, available=available, ranks_on_host=ranks, activation_reserve=GiB // 4,
                           max_num_seqs=8, max_model_len=max_model_len, max_model_len_is_set=is_set)


def test_a_given_size_is_used_as_given() -> None:
    b = budget(GiB, cache=CacheConfig(kv_cache_memory=123 * 2 ** 20))
    assert (b.bytes, b.reason) == (123 * 2 ** 20, "set")


def test_auto_takes_the_fraction_of_what_is_left_less_the_activations() -> None:
    b = budget(10 * GiB, max_model_len=2 ** 21)  # wants 8 x 2M x 1024 B = 16 GiB: more than there is
    assert b.bytes == int(0.9 * 10 * GiB) - GiB // 4
    assert b.reason.startswith("auto: 0.9 x 10.00 GiB available - 0.25 GiB activations")


def test_auto_never_takes_more_than_the_scheduler_can_hold() -> None:
    b = budget(100 * GiB, max_model_len=4096)
    assert b.bytes == 8 * 4096 * 1024
    assert "8 requests x 4096 tokens" in b.reason


def test_ranks_on_one_host_share_its_memory() -> None:
    one, two = budget(10 * GiB, max_model_len=2 ** 21), budget(10 * GiB, ranks=2, max_model_len=2 ** 21)
    assert two.bytes == int(0.9 * 10 * GiB) // 2 - GiB // 4 < one.bytes
    assert "/ 2 ranks" in two.reason


def test_a_utilisation_lowers_the_budget() -> None:
    b = budget(10 * GiB, max_model_len=2 ** 21, cache=CacheConfig(kv_cache_memory=None, memory_utilization=0.5))
    assert b.bytes == 5 * GiB - GiB // 4


def test_a_requested_length_that_cannot_fit_is_an_error_with_the_numbers() -> None:
    with pytest.raises(ValueError) as info:
        budget(GiB, max_model_len=2 ** 20, is_set=True)  # one request: 1 GiB; 0.9 GiB - 0.25 GiB left
    message = str(info.value)
    assert "0.65 GiB" in message and "1.00 GiB" in message and "1024 B/token" in message
    assert "--max-model-len" in message
    # the model's own (default) length is lowered by the engine to what fits instead
    assert budget(GiB, max_model_len=2 ** 20, is_set=False).bytes == int(0.9 * GiB) - GiB // 4


def test_no_memory_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        budget(GiB // 4)


@pytest.mark.parametrize("value", [0, 1.5, -0.1])
def test_a_utilisation_outside_0_1_is_refused(value) -> None:
    with pytest.raises(ValueError, match="memory_utilization"):
        EngineConfig(model="x", memory_utilization=value)


def test_a_size_that_is_neither_a_size_nor_auto_is_refused() -> None:
    with pytest.raises(ValueError, match="or auto"):
        EngineConfig(model="x", kv_cache_memory="lots")


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_the_cache_takes_memory_as_blocks_are_written() -> None:
    config = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    layout = KVCacheLayout(num_blocks=2 ** 16, block_size=16, bytes_per_token=0)  # 1M tokens: 256 MiB per layer
    before = _rss()
    caches = allocate_kv_cache(layout, config, torch.float32, torch.device("cpu"))
    assert caches[0].shape == (2, 2 ** 20, 2, 16) and sum(c.nbytes for c in caches) == 512 * 2 ** 20
    assert all(float(c.abs().max()) == 0 for c in caches)  # zeroed, and reading commits nothing
    assert _rss() - before < 64 * 2 ** 20
    caches[1][1, 5:7] = 3.0
    assert float(caches[1].sum()) == 3.0 * 2 * 2 * 16 and float(caches[0].sum()) == 0


def test_an_engine_sizes_its_cache_automatically(tiny_qwen3, monkeypatch) -> None:
    from pagoda import planner

    monkeypatch.setattr(planner, "local_memory_bytes", lambda: 64 * GiB)
    with LLM(str(tiny_qwen3.directory), max_num_seqs=4, max_model_len=512, progress=False) as llm:
        plan, layout = llm.engine.plan, llm.engine.kv_layout
        assert layout.num_tokens == 4 * 512  # four requests of 512 tokens: all the scheduler can hold
        assert plan.kv_cache_sizing.startswith("auto: 4 requests x 512 tokens (0.9 x 64.00 GiB available")
        assert plan.kv_cache_tokens == layout.num_tokens and llm.engine.max_concurrency == 4.0
        assert plan.activation_measured_bytes > 0 and plan.activation_formula_bytes > 0
        assert plan.activation_reserve_bytes == max(plan.activation_formula_bytes, plan.activation_measured_bytes)
    monkeypatch.setattr(planner, "local_memory_bytes", lambda: 2 ** 20)
    with pytest.raises(ValueError, match="does not fit"):
        LLM(str(tiny_qwen3.directory), max_num_seqs=4, max_model_len=512, progress=False)


def test_ranks_measure_together(monkeypatch) -> None:
    """With several ranks the measurement is taken after a barrier, and the host with the least memory per rank
    decides for everyone."""
    calls = []

    class FakeDist:
        def is_initialized(self):
            return True

        def get_world_size(self):
            return 3

        def barrier(self):
            calls.append("barrier")

        def all_gather_object(self, out, mine):
            calls.append("gather")
            out[:] = [("a", 10 * GiB), ("a", 9 * GiB), ("b", 6 * GiB)]

    monkeypatch.setattr(kv_cache, "dist", FakeDist())
    assert kv_cache.host_memory() == (9 * GiB, 2)  # host a: 9 GiB for 2 ranks beats host b's 6 GiB for one
    assert calls == ["barrier", "gather"]


def test_the_server_reports_its_memory(tiny_qwen3, tmp_path) -> None:
    from tests.servers import ServerProcess

    server = ServerProcess(tiny_qwen3.directory, "--max-num-seqs", "4", "--max-model-len", "256",
                           log_dir=tmp_path).start()
    try:
        engine = httpx.get(f"{server.url}/v1/engine").json()
        rank = engine["ranks"][0]
        assert engine["kv_cache_tokens"] == 4 * 256 and engine["max_concurrency"] == 4.0
        assert rank["kv_cache_sizing"].startswith("auto: 4 requests x 256 tokens")
        metrics = httpx.get(f"{server.url}/metrics").text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("pagoda:") and "{" in line}
        assert values["pagoda:kv_cache_tokens"] == 1024
        assert values["pagoda:kv_cache_bytes"] == rank["kv_cache_bytes"] == 1024 * rank["kv_bytes_per_token"]
        assert values["pagoda:weight_bytes"] == rank["weight_bytes"] > 0
        assert values["pagoda:kv_cache_bytes_per_token"] == rank["kv_bytes_per_token"]
        assert values["pagoda:activation_reserve_bytes"] == rank["activation_reserve_bytes"] > 0
        assert values["pagoda:activation_measured_bytes"] == rank["activation_measured_bytes"] > 0
        assert values["pagoda:max_concurrency"] == 4.0
    finally:
        server.stop()
