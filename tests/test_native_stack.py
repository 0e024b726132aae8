"""The q4 (Q4_1) linear kernel and the native decoder stack (pagoda/models/native_stack.py): each against the
torch path over the same weights, on random tiny models of every Llama-layout architecture, and the default
model with quantization="gguf" against its fp32 weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pagoda.layers import quantized
from pagoda.layers.attention import ForwardContext, forward_context
from pagoda.layers.attention_cpu import CpuPagedBackend
from pagoda.layers.linear import Linear
from pagoda.layers.quantized import GROUP, Int8Embedding, Int8Linear, Q4Linear, q4_1_codes, quantize_model
from pagoda.models import native_stack

transformers = pytest.importorskip("transformers")

from harness import Harness, hf_checkpoint, paged_layout, random_q4, sequence_logprobs  # noqa: E402
from test_models_random import CONFIGS as ALL_CONFIGS  # noqa: E402


def q4_weight(codes, d, m) -> torch.Tensor:
    n, k = codes.shape
    w = codes.double().view(n, -1, GROUP) * d.double().unsqueeze(-1) + m.double().unsqueeze(-1)
    return w.view(n, k)


@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 17), (96, 40), (32, 1)])
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 200])
def test_q4_linear_matches_its_weights(k, n, rows):
    codes, d, m = random_q4(n, k, seed=k + n)
    layer = Q4Linear(codes, d, m, activations="int8")
    w = q4_weight(codes, d, m)
    assert torch.equal(layer.weight_fp32_t()[:, :n].t().double(), w.float().double())  # dequantized exactly
    x = torch.randn(rows, k)
    y, ref = layer(x).double(), x.double() @ w.T
    a16 = Q4Linear(codes, d, m, activations="int16")
    assert torch.equal(a16.weight_fp32_t(), layer.weight_fp32_t())
    # int16 rounding of x (half a step of max|x_group| / 32767 per element) plus fp32 rounding
    scale = x.double().abs() @ w.abs().T
    assert ((a16(x).double() - ref).abs() <= 4e-5 * scale + 1e-6).all()
    # The kernel computes x~ @ W^T with x~ = x rounded to int8 per group of 32 (half a step, max|x_group| / 254,
    # per element at most), plus fp32 rounding of its per-group terms.
    half_step = (x.double().view(rows, -1, GROUP).abs().amax(-1, keepdim=True) / 254).expand(-1, -1, GROUP)
    bound = half_step.reshape(rows, k) @ w.abs().T + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() / bound).max()
    # and x~ is x rounded to nearest (the kernel multiplies by the fp32 reciprocal of the scale)
    scale = x.view(rows, -1, GROUP).abs().amax(-1, keepdim=True) / 127
    x_rounded = ((x.view(rows, -1, GROUP) * (1 / scale)).round() * scale).view(rows, k)
    ref_rounded = x_rounded.double() @ w.T
    assert ((y - ref_rounded).abs() <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6).all()


@pytest.mark.parametrize("activations", ["int8", "int16"])
def test_q4_torch_fallback_computes_the_same(monkeypatch, activations):
    """Without the compiled kernels (no compiler), the torch path reads the same packed codes."""
    codes, d, m = random_q4(40, 96, seed=5)
    layer, x = Q4Linear(codes, d, m, activations=activations), torch.randn(3, 96)
    monkeypatch.setattr(quantized, "_library", False)
    monkeypatch.setattr(quantized, "_kernel", lambda: None)
    torch.testing.assert_close(layer(x), x @ q4_weight(codes, d, m).float().T, rtol=1e-5, atol=1e-5)


def test_q4_1_blocks_unpack_to_the_ggml_layout():
    """One Q4_1 block: fp16 d, fp16 m, element j in the low nibble of byte j, element j + 16 in its high one."""
    codes = np.arange(32) % 16
    block = np.zeros(20, dtype=np.uint8)
    block[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    block[2:4] = np.frombuffer(np.float16(-1.0).tobytes(), np.uint8)
    block[4:] = codes[:16] | (codes[16:] << 4)
    c, d, m = q4_1_codes(block[None, :], 1, 32)
    assert c.tolist() == [codes.tolist()]
    assert d.item() == 0.5 and m.item() == -1.0
    assert Q4Linear(c, d, m).weight_fp32_t()[:, 0].tolist() == [0.5 * v - 1.0 for v in codes]


# ---- the native stack on random tiny models ----------------------------------------------------------------

# The Llama-layout architectures of the random-model tests (Gemma's layout has no native stack).
CONFIGS = {name: ALL_CONFIGS[name] for name in ("llama", "llama3-rope-tied", "qwen3", "mistral-sliding")}


def to_q4(model: torch.nn.Module, activations: str) -> None:
    """Quantize every decoder Linear to Q4_1 values (min/max per group of 32), as a GGUF converter would."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]:
        w = module.weight.detach().view(module.out_features, -1, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        d = ((hi - lo) / 15).to(torch.float16)
        m = lo.to(torch.float16)
        codes = ((w - m.float().unsqueeze(-1)) / d.float().clamp_min(1e-8).unsqueeze(-1)).round().clamp(0, 15)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                Q4Linear(codes.to(torch.uint8).view(module.out_features, -1), d, m, activations=activations))


@pytest.fixture(scope="module", params=[(name, fmt) for name in sorted(CONFIGS) for fmt in ("int8", "q4", "q4a16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def harness(request, tmp_path_factory):
    name, fmt = request.param
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(name)
    transformers.AutoModelForCausalLM.from_config(CONFIGS[name], dtype=torch.float32).save_pretrained(directory)
    h = Harness(hf_checkpoint(directory), budget=48)
    h.runner.backend = CpuPagedBackend()
    if fmt == "int8":
        quantize_model(h.model, "int8")
    else:
        to_q4(h.model, "int8" if fmt == "q4" else "int16")
    h.runner.native_stack, reason = native_stack.build(h.model, h.runner.kv_caches, h.runner.backend)
    assert h.runner.native_stack is not None, reason
    return h


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, 17, 40, 75)]


def test_native_stack_generates_the_torch_tokens(harness):
    """Mixed steps (decodes + prefill chunks of at most 48 tokens) all run natively here; preemption too."""
    prompts = _prompts(harness.config.vocab_size)
    native = harness.generate(prompts, 24)
    stack, harness.runner.native_stack = harness.runner.native_stack, None
    try:
        torch_path = harness.generate(prompts, 24)
    finally:
        harness.runner.native_stack = stack
    assert native == torch_path


def _stack_over_cache(tmp_path, kv_dtype):
    """A tiny Llama with q4 layers on the native CPU backend, its KV cache of kv_dtype, and its native stack."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"], dtype=torch.float32).save_pretrained(tmp_path)
    h = Harness(hf_checkpoint(tmp_path), budget=48, kv_dtype=kv_dtype)
    h.runner.backend = CpuPagedBackend()
    to_q4(h.model, "int16")
    stack, reason = native_stack.build(h.model, h.runner.kv_caches, h.runner.backend)
    assert stack is not None and h.runner.kv_caches[0].dtype == kv_dtype, reason
    return h, stack


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_native_stack_reads_half_caches(tmp_path, kv_dtype):
    """fp16 and bf16 KV caches: one mixed step (two decodes over a random cached past, a 20-token prompt) gives
    the torch modules' hidden states, and the rows it writes differ from theirs by less than one rounding step
    of the cache's type in norm (an fp32-rounding difference upstream can move a value across a rounding
    boundary, and later layers amplify it)."""
    h, stack = _stack_over_cache(tmp_path, kv_dtype)
    runner = h.runner
    layout, positions = paged_layout([(1, 30), (1, 3), (20, 20)], 16, seed=1)
    gen = torch.Generator().manual_seed(1)
    past = [torch.randn(c.shape, generator=gen).to(kv_dtype) for c in runner.kv_caches]
    ids = torch.randint(0, h.config.vocab_size, (22,), generator=gen)

    def run(forward):
        for cache, saved in zip(runner.kv_caches, past):
            cache.copy_(saved)
        md = runner.backend.build_metadata(layout, runner.windows)
        with torch.inference_mode(), forward_context(ForwardContext(runner.backend, md, runner.kv_caches)):
            hidden = forward(ids, torch.from_numpy(positions))
        return hidden, [c[:, layout.slot_mapping].float() for c in runner.kv_caches]

    native, native_kv = run(stack)
    reference, reference_kv = run(h.model)
    torch.testing.assert_close(native, reference, rtol=1e-3, atol=1e-3)
    step = torch.finfo(kv_dtype).eps  # one rounding step, relative
    for a, b in zip(native_kv, reference_kv):
        assert (a - b).norm() <= step * b.norm(), ((a - b).norm() / b.norm() / step).item()


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["int8", "fp8_e4m3", "fp8_e5m2"])
def test_native_stack_reads_8bit_caches(tmp_path, kv_dtype):
    """8-bit caches (codes and a scale per row): the native stack's step gives the torch modules' hidden states
    over the same kernels' attention, and the rows it writes decode to theirs within a code step."""
    from pagoda.layers.kv_quant import CODE_MAX, dequantize_rows, quantize_rows

    h, stack = _stack_over_cache(tmp_path, kv_dtype)
    runner = h.runner
    head_dim = h.config.head_dim
    layout, positions = paged_layout([(1, 30), (1, 3), (20, 20)], 16, seed=1)
    gen = torch.Generator().manual_seed(1)
    past = [quantize_rows(torch.randn(*c.shape[:-1], head_dim, generator=gen), kv_dtype) for c in runner.kv_caches]
    ids = torch.randint(0, h.config.vocab_size, (22,), generator=gen)

    def run(forward):
        for cache, saved in zip(runner.kv_caches, past):
            cache.view(torch.uint8).copy_(saved.view(torch.uint8))
        md = runner.backend.build_metadata(layout, runner.windows)
        with torch.inference_mode(), forward_context(ForwardContext(runner.backend, md, runner.kv_caches)):
            hidden = forward(ids, torch.from_numpy(positions))
        return hidden, [dequantize_rows(c.view(torch.uint8)[:, layout.slot_mapping].view(kv_dtype), head_dim)
                        for c in runner.kv_caches]

    native, native_kv = run(stack)
    reference, reference_kv = run(h.model)
    torch.testing.assert_close(native, reference, rtol=1e-3, atol=1e-3)
    step = 1 / CODE_MAX[kv_dtype] if kv_dtype == torch.int8 else 2.0 ** -(3 if kv_dtype == torch.float8_e4m3fn else 2)
    for a, b in zip(native_kv, reference_kv):
        assert (a - b).norm() <= step * b.norm(), ((a - b).norm() / b.norm() / step).item()


@pytest.mark.parametrize("chunk", [7, 100])
def test_native_stack_hidden_states_and_cache_match_torch(harness, chunk):
    """One mixed step (two decodes after cached contexts, one chunk of 7 or 100 tokens): final hidden states and
    the KV rows written agree with the torch modules."""
    runner, model, bs = harness.runner, harness.model, 16
    stack = runner.native_stack
    if stack.max_tokens is not None and chunk + 2 > stack.max_tokens:
        pytest.skip("int8 layers: steps this large run on the torch path")
    rng = np.random.default_rng(1)
    layout, positions = paged_layout([(1, 30), (1, 3), (chunk, chunk)], bs, seed=1)
    slots = layout.slot_mapping
    for cache in runner.kv_caches:  # a random cached past for the decodes
        cache.copy_(torch.from_numpy(rng.standard_normal(cache.shape).astype(np.float32)))
    ids = torch.from_numpy(rng.integers(0, harness.config.vocab_size, 2 + chunk))
    pos = torch.from_numpy(positions)

    def run(forward):
        saved = [c.clone() for c in runner.kv_caches]
        md = runner.backend.build_metadata(layout, runner.windows)
        with torch.inference_mode(), forward_context(ForwardContext(runner.backend, md, runner.kv_caches)):
            hidden = forward(ids, pos)
        written = [c[:, slots].clone() for c in runner.kv_caches]
        for c, s in zip(runner.kv_caches, saved):
            c.copy_(s)
        return hidden, written

    native, native_kv = run(stack)
    reference, reference_kv = run(model)
    # Both paths round each linear layer's input per group of 32, int8 layers to int16 (a step is 2^-15 of the
    # group's largest value), q4 layers to int8 (2^-7): an fp32-rounding difference upstream can move an element
    # by a step, and the random model amplifies it, so the bound is a few steps, not fp32 epsilon.
    if getattr(model.model.layers[0].mlp.down_proj, "activations", None) == "int8":
        for a, b in [(native, reference), *zip(native_kv, reference_kv)]:
            assert (a - b).norm() <= 0.03 * b.norm(), ((a - b).norm() / b.norm()).item()
    else:
        torch.testing.assert_close(native, reference, rtol=1e-3, atol=1e-3)
        for a, b in zip(native_kv, reference_kv):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_native_stack_is_refused_with_reasons(harness):
    model = harness.model
    assert native_stack.unsupported_reason(model, harness.runner.kv_caches, object()) is not None
    layer = model.model.layers[0].mlp
    kept = layer.down_proj
    layer.down_proj = Linear(kept.in_features, kept.out_features)
    try:
        assert "quantized" in native_stack.unsupported_reason(model, harness.runner.kv_caches, harness.runner.backend)
    finally:
        layer.down_proj = kept


# ---- the default model: quantization="gguf" computes on the file's own blocks ------------------------------

@pytest.mark.parametrize("method", ["gguf", "gguf-a8"])
def test_gguf_quantization_uses_the_checkpoint_blocks_exactly(smollm_gguf, llm, method):
    from pagoda import LLM, SamplingParams

    fast = LLM(str(smollm_gguf), quantization=method, kv_cache_memory="256MiB", progress=False)
    model = fast.engine.runner.model
    assert fast.engine.runner.native_stack is not None and fast.engine.plan.native_stack
    layers = model.model.layers
    assert all(isinstance(m, Q4Linear) for m in (layers[0].self_attn.qkv_proj, layers[29].mlp.down_proj))
    assert layers[0].mlp.down_proj.activations == ("int16" if method == "gguf" else "int8")
    assert isinstance(model.lm_head, Int8Linear)  # the Q8_0 embedding, as the tied LM head
    fp32 = llm.engine.runner.model
    # and the lookups read the head's int8 rows: exactly the checkpoint's table, without an fp32 copy
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert model.model.embed_tokens.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    ids = torch.tensor([[0, 1, 15, 16, 17], [4242, 49151, 31, 32, 100]])
    assert torch.equal(model.model.embed_tokens(ids), fp32.model.embed_tokens(ids))
    every = torch.arange(fp32.config.vocab_size)
    assert torch.equal(model.model.embed_tokens(every), fp32.model.embed_tokens.weight)
    for mine, theirs in [(layers[0].self_attn.qkv_proj, fp32.model.layers[0].self_attn.qkv_proj),
                         (layers[17].mlp.gate_up_proj, fp32.model.layers[17].mlp.gate_up_proj),
                         (model.lm_head, fp32.model.embed_tokens)]:
        assert torch.equal(mine.weight_fp32_t()[:, :mine.out_features].t(), theirs.weight)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List five fruits:"]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    if method == "gguf":  # int16 activations: fp32's greedy tokens
        assert [o.outputs[0].token_ids for o in fast.generate(prompts, params)] == reference
        return
    # int8 activations: teacher-forced on fp32's continuations, the same next token almost everywhere and
    # logprobs within a few hundredths (BENCHMARKS.md measures more prompts)
    tokenizer = llm.get_tokenizer()
    diffs, agree = [], []
    for prompt, continuation in zip(prompts, reference):
        ids = tokenizer.encode(prompt) + continuation
        at = torch.arange(len(ids) - len(continuation) - 1, len(ids) - 1)
        ref_lp, lp = sequence_logprobs(llm, ids)[at], sequence_logprobs(fast, ids)[at]
        chosen = torch.tensor(continuation)[:, None]
        diffs.append((ref_lp.gather(1, chosen) - lp.gather(1, chosen)).abs().flatten())
        agree.append(lp.argmax(-1) == chosen.flatten())
    diff, agree = torch.cat(diffs), torch.cat(agree)
    assert agree.float().mean() >= 0.95 and diff.mean() < 0.05 and diff.max() < 0.5, (agree.float().mean(), diff)
