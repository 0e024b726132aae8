"""The native CPU attention backend against the reference backend (the oracle): one layer on random paged
caches, tiny random models end to end, the default model's greedy tokens, and the backend selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import random_attention_step

from pagoda.layers.attention import Attention
from pagoda.layers.attention_cpu import CpuPagedBackend
from pagoda.layers.attention_reference import ReferenceBackend
from pagoda.layers.attention_select import create_backend

CPU = torch.device("cpu")
ATOL = 1e-5

# (query tokens, context length) per request, decodes first: decodes at short and long contexts (one of a
# single token), a fresh prompt longer than one query tile, and a chunk continuing a cached prefix.
MIXED = [(1, 1), (1, 17), (1, 40), (1, 100), (45, 45), (23, 84)]


def run(backend, layer, q, k, v, cache, layout):
    with torch.inference_mode():
        return backend.forward(layer, q, k, v, cache, backend.build_metadata(layout, {layer.sliding_window}))


@pytest.fixture(scope="module")
def cpu_backend():
    return CpuPagedBackend()


def assert_matches_reference(cpu_backend, layer, q, k, v, cache, layout, atol=ATOL):
    ref_cache, cpu_cache = cache.clone(), cache.clone()
    expected = run(ReferenceBackend(CPU), layer, q, k, v, ref_cache, layout)
    got = run(cpu_backend, layer, q, k, v, cpu_cache, layout)
    assert got.shape == expected.shape == (q.shape[0], layer.num_heads * layer.head_dim)
    assert got.dtype == expected.dtype
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max |difference| {diff} exceeds {atol}"
    assert torch.equal(cpu_cache, ref_cache), "the cache after the write differs"


@pytest.mark.parametrize("window", [None, 7], ids=["causal", "window7"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
def test_mixed_batch_matches_reference(cpu_backend, heads, head_dim, window):
    num_heads, num_kv_heads = heads
    layer = Attention(0, num_heads, num_kv_heads, head_dim, head_dim ** -0.5, sliding_window=window)
    assert_matches_reference(cpu_backend, layer, *random_attention_step(MIXED, num_heads, num_kv_heads, head_dim))


@pytest.mark.parametrize("requests", [
    [(1, 3), (1, 200), (1, 33)],  # decodes only
    [(70, 70)],  # one fresh prompt: several query tiles, keys across many blocks
    [(1, 9), (16, 16), (5, 41), (2, 2), (33, 97)],  # small chunks, a two-token prompt
], ids=["decodes", "prefill", "chunks"])
@pytest.mark.parametrize("window", [None, 1, 20], ids=["causal", "window1", "window20"])
def test_batch_shapes_match_reference(cpu_backend, requests, window):
    layer = Attention(0, 9, 3, 64, 0.125, sliding_window=window)
    assert_matches_reference(cpu_backend, layer, *random_attention_step(requests, 9, 3, 64, seed=1))


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_head_dim_tails_and_block_sizes(cpu_backend, block_size):
    # head dims that are not multiples of 8 take the kernel's scalar tails; odd block sizes split the key segments
    for head_dim in (20, 36):
        layer = Attention(0, 6, 2, head_dim, 0.3, sliding_window=13)
        step = random_attention_step(MIXED, 6, 2, head_dim, block_size=block_size)
        assert_matches_reference(cpu_backend, layer, *step)


def test_strided_views_of_a_fused_projection(cpu_backend):
    # the model passes q, k, v as views of one qkv projection: token stride larger than heads * head_dim
    q, k, v, cache, layout = random_attention_step(MIXED, 9, 3, 64)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    qs, ks, vs = fused.split([9 * 64, 3 * 64, 3 * 64], dim=1)
    qs, ks, vs = qs.view(-1, 9, 64), ks.view(-1, 3, 64), vs.view(-1, 3, 64)
    assert not ks.is_contiguous()
    layer = Attention(0, 9, 3, 64, 0.125)
    assert_matches_reference(cpu_backend, layer, qs, ks, vs, cache, layout)


def test_bfloat16_inputs_are_computed_in_fp32(cpu_backend):
    q, k, v, cache, layout = random_attention_step(MIXED, 8, 2, 64, dtype=torch.bfloat16)
    layer = Attention(0, 8, 2, 64, 0.125, sliding_window=9)
    ref_cache, cpu_cache = cache.clone(), cache.clone()
    expected = run(ReferenceBackend(CPU), layer, q.float(), k.float(), v.float(), ref_cache, layout)
    got = run(cpu_backend, layer, q, k, v, cpu_cache, layout)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    assert torch.equal(cpu_cache, ref_cache)


@pytest.mark.parametrize("requests", [MIXED, [(1, 300)], [(1, 3), (1, 200), (1, 33)]],
                         ids=["mixed", "split", "decodes"])
@pytest.mark.parametrize("window", [None, 20], ids=["causal", "window20"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_caches_match_reference(cpu_backend, requests, window, cache_dtype):
    # fp16 and bf16 caches: new rows rounded exactly as torch rounds them, old rows widened on load
    q, k, v, cache, layout = random_attention_step(requests, 9, 3, 64, seed=2)
    layer = Attention(0, 9, 3, 64, 0.125, sliding_window=window)
    assert_matches_reference(cpu_backend, layer, q, k, v, cache.to(cache_dtype), layout)


def test_bf16_cache_rounds_as_torch_does(cpu_backend):
    # ties to even, values that carry into the exponent, overflow to inf, NaN, subnormals, signed zero: each
    # written through the kernel's vector loop (the first 64 values of a row) and its scalar tail (odd head dim)
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -(2 - 2 ** -9),
                            3.3895e38, float("inf"), float("-inf"), float("nan"), 1e-40, -0.0, 0.0, 65504.0])
    for head_dim in (64, 67):
        q, k, v, cache, layout = random_attention_step([(1, 4)], 2, 2, head_dim, seed=5)
        k.view(-1)[: special.numel()] = special
        v.view(-1)[-special.numel():] = special
        got_cache = cache.to(torch.bfloat16)
        ref_cache = got_cache.clone()
        layer = Attention(0, 2, 2, head_dim, 0.125)
        run(cpu_backend, layer, q, k, v, got_cache, layout)
        run(ReferenceBackend(CPU), layer, q, k, v, ref_cache, layout)
        nan = got_cache.isnan()
        assert torch.equal(nan, ref_cache.isnan()) and nan.sum() == 2  # NaN bits differ between torch's own paths
        assert torch.equal(got_cache.view(torch.int16)[~nan], ref_cache.view(torch.int16)[~nan])


def test_decode_split_over_key_ranges_matches_reference(cpu_backend):
    # one or two long requests: their keys are split over work items whose partial softmaxes are merged
    for requests in ([(1, 1000)], [(1, 700), (1, 65)]):
        q, k, v, cache, layout = random_attention_step(requests, 9, 3, 64, seed=3)
        assert_matches_reference(cpu_backend, Attention(0, 9, 3, 64, 0.125), q, k, v, cache, layout)


def test_rejects_a_cache_it_cannot_read(cpu_backend):
    q, k, v, cache, layout = random_attention_step([(1, 5)], 4, 4, 64)
    with pytest.raises(ValueError, match="fp32, fp16, bf16, int8 or fp8 KV cache"):
        run(cpu_backend, Attention(0, 4, 4, 64, 0.125), q, k, v, cache.to(torch.float64), layout)


# ---- selection -------------------------------------------------------------------------------------------------

def test_selection():
    chosen = [create_backend(name, CPU, dtype) for name, dtype in
              [("auto", torch.float32), ("cpu", torch.float32), ("reference", torch.float32), ("auto", torch.float64)]]
    assert [type(b) for b, _ in chosen] == [CpuPagedBackend, CpuPagedBackend, ReferenceBackend, ReferenceBackend]
    assert "float64" in chosen[-1][1] and chosen[2][1] == "requested"  # each choice says why
    with pytest.raises(ValueError, match="fp32, fp16 and bf16"):
        create_backend("cpu", CPU, torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        assert isinstance(create_backend("cpu", CPU, dtype)[0], CpuPagedBackend)
    with pytest.raises(ValueError, match="not supported"):
        create_backend("fast", CPU, torch.float32)


# ---- models end to end -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mistral-sliding", "gemma3"])
def test_tiny_models_generate_the_same_tokens(name, tmp_path, cpu_backend):
    transformers = pytest.importorskip("transformers")
    from harness import Harness, hf_checkpoint

    common = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "initializer_range": 0.15, "rms_norm_eps": 1e-5}
    config = (transformers.MistralConfig(**common, sliding_window=20) if name == "mistral-sliding" else
              transformers.Gemma3TextConfig(**common, head_dim=32, sliding_window=12, query_pre_attn_scalar=24,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    checkpoint = hf_checkpoint(tmp_path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 320, n).tolist() for n in (1, 6, 19, 44, 75)]

    def tokens(backend, **kw):
        harness = Harness(checkpoint, **kw)
        if backend is not None:
            harness.runner.backend = backend
        return harness.generate(prompts, 24)

    plain, tight = {"budget": 48}, {"num_blocks": 20, "block_size": 4, "budget": 16, "max_num_seqs": 5}
    for kw in (plain, tight):  # tight: requests are preempted and recomputed
        assert tokens(cpu_backend, **kw) == tokens(None, **kw), f"{name} {kw}"


def greedy(llm, prompts, n=32):
    from pagoda import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n))
    return [o.outputs[0].token_ids for o in outs]


PROMPTS = [
    "The capital of France is",
    "Hi",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning",
    "def fibonacci(n):\n    ",
    ("Les bases de données relationnelles utilisent des tables. Une table contient des lignes et des colonnes, "
     "et chaque ligne représente un enregistrement. Par exemple, une table de clients peut contenir"),
]


def test_default_model_greedy_tokens_equal_reference(smollm_gguf):
    from pagoda import LLM

    def make(backend, kv_cache_memory="128MiB", max_prefill_tokens=24, **kw):
        # 24 tokens per step: the longer prompts are prefilled in chunks continuing their cached prefix
        return LLM(str(smollm_gguf), kv_cache_memory=kv_cache_memory, max_prefill_tokens=max_prefill_tokens,
                   attention_backend=backend, progress=False, **kw)

    reference = make("reference")
    assert isinstance(reference.engine.runner.backend, ReferenceBackend)
    expected = greedy(reference, PROMPTS)
    cpu = make("cpu")
    assert isinstance(cpu.engine.runner.backend, CpuPagedBackend)
    assert greedy(cpu, PROMPTS) == expected
    # 12 blocks of 16 tokens cannot hold every request at once: some are preempted and recomputed
    small = make("cpu", kv_cache_memory=12 * 16 * cpu.engine.kv_layout.bytes_per_token, max_prefill_tokens=64,
                 enable_prefix_caching=False)
    assert greedy(small, PROMPTS) == expected
    assert small.engine.scheduler.num_preemptions_total > 0


# ---- KV cache element type ---------------------------------------------------------------------------------------

def test_kv_cache_dtype_resolution(served_llm, llm):
    from pagoda.worker.kv_cache import resolve_kv_cache_dtype

    assert resolve_kv_cache_dtype("auto", torch.float32, CPU) == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", torch.float32, torch.device("cuda")) == torch.float32
    assert resolve_kv_cache_dtype("float32", torch.float32, CPU) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not supported"):
        resolve_kv_cache_dtype("int4", torch.float32, CPU)
    # the default engine caches fp16 (twice the tokens in the same memory) and reads it with the native kernel
    assert served_llm.engine.runner.kv_caches[0].dtype == torch.float16
    assert isinstance(served_llm.engine.runner.backend, CpuPagedBackend)
    assert llm.engine.runner.kv_caches[0].dtype == torch.float32
    assert served_llm.engine.kv_layout.bytes_per_token * 2 == llm.engine.kv_layout.bytes_per_token


# ---- 8-bit caches: codes and a scale per row (layers/kv_quant.py) -----------------------------------------------

EIGHT_BIT = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
EIGHT_BIT_IDS = ["int8", "fp8_e4m3", "fp8_e5m2"]


def _assert_8bit_matches_reference(cpu_backend, layer, q, k, v, cache, layout, dtype):
    from pagoda.layers.kv_quant import quantize_rows

    packed = quantize_rows(cache, dtype)  # every old row a valid row of the format
    ref_cache, cpu_cache = packed.clone(), packed.clone()
    expected = run(ReferenceBackend(CPU), layer, q, k, v, ref_cache, layout)
    got = run(cpu_backend, layer, q, k, v, cpu_cache, layout)
    # the same codes and scales for the new rows, byte for byte
    assert torch.equal(cpu_cache.view(torch.uint8), ref_cache.view(torch.uint8)), "the cache after the write differs"
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"max |difference| {diff}"


@pytest.mark.parametrize("requests", [MIXED, [(1, 300)], [(1, 3), (1, 200), (1, 33)]],
                         ids=["mixed", "split", "decodes"])
@pytest.mark.parametrize("window", [None, 20], ids=["causal", "window20"])
@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=EIGHT_BIT_IDS)
def test_8bit_caches_match_reference(cpu_backend, requests, window, dtype):
    q, k, v, cache, layout = random_attention_step(requests, 9, 3, 64, seed=4)
    layer = Attention(0, 9, 3, 64, 0.125, sliding_window=window)
    _assert_8bit_matches_reference(cpu_backend, layer, q, k, v, cache, layout, dtype)


@pytest.mark.parametrize("head_dim", [32, 67, 80, 128])
@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=EIGHT_BIT_IDS)
def test_8bit_caches_at_other_head_dims(cpu_backend, head_dim, dtype):
    q, k, v, cache, layout = random_attention_step(MIXED, 4, 2, head_dim, seed=6)
    _assert_8bit_matches_reference(cpu_backend, Attention(0, 4, 2, head_dim, head_dim ** -0.5), q, k, v, cache,
                                   layout, dtype)


@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=EIGHT_BIT_IDS)
def test_8bit_codes_round_as_torch_does(cpu_backend, dtype):
    """Ties, values at the codes' extremes, subnormal codes and a zero row, written by the kernel and by torch."""
    q, k, v, cache, layout = random_attention_step([(2, 2)], 2, 2, 64, seed=7)
    amax = 448.0 if dtype == torch.float8_e4m3fn else 57344.0 if dtype == torch.float8_e5m2 else 127.0
    row = torch.linspace(-1, 1, 64)
    row[:8] = torch.tensor([1.0, -1.0, 0.5 / amax, 1.5 / amax, 2.5 / amax, 1e-6, 0.999, 2 ** -10])
    k[0, 0] = row  # scale = 1 / amax: the codes are row x amax, ties included
    k[0, 1] = 0.0  # a zero row: scale 0, codes 0
    v[1, 0] = row * 3.7
    _assert_8bit_matches_reference(cpu_backend, Attention(0, 2, 2, 64, 0.125), q, k, v, cache, layout, dtype)


def test_the_8bit_caches_are_selected_and_sized():
    from pagoda.layers.kv_quant import kv_row

    for dtype in EIGHT_BIT:
        assert isinstance(create_backend("auto", CPU, dtype)[0], CpuPagedBackend)
        assert kv_row(dtype, 64) == 68
    assert kv_row(torch.float16, 64) == 64


@pytest.mark.parametrize("name, dtype", [("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn),
                                         ("fp8_e5m2", torch.float8_e5m2)])
def test_the_default_model_serves_from_an_8bit_cache(smollm_gguf, served_llm, name, dtype):
    """--kv-cache-dtype int8 / fp8_*: the native stack runs on the 8-bit cache, which holds 1.88x the tokens of
    fp16 in the same memory (68 bytes a row of 64 against 128), and every block comes back. (Quality against fp32:
    BENCHMARKS.md, stop 21.)"""
    from pagoda import LLM, SamplingParams

    with LLM(str(smollm_gguf), kv_cache_dtype=name, kv_cache_memory="256MiB", progress=False) as llm:
        engine = llm.engine
        assert engine.runner.kv_caches[0].dtype == dtype and engine.runner.native_stack is not None
        assert engine.plan.kv_bytes_per_token == 2 * 30 * 3 * 68 == 12240
        fp16_tokens = served_llm.engine.kv_layout.num_tokens
        assert engine.kv_layout.num_tokens == pytest.approx(fp16_tokens * 23040 / 12240, rel=0.01)
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16,
                                                                         ignore_eos=True))[0].outputs[0]
        assert len(out.token_ids) == 16 and out.text.strip()
        kv = engine.scheduler.kv_cache
        assert kv.pool.num_free_blocks == kv.num_blocks
