"""Int8 linear layers (pagoda/layers/quantized.py + pagoda/kernels/quant_linear.cpp): the kernel against a torch
reference of the same quantized math, the quantizer's error bound, and int8 vs fp32 on the default model."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.layers import quantized
from pagoda.layers.linear import Linear
from pagoda.layers.quantized import GROUP, Int8Linear, dequantize, pack, quantize, quantize_model, unpack
from tests.harness import sequence_logprobs

SHAPES = [(576, 960), (576, 3072), (1536, 576), (576, 576), (64, 17), (96, 33), (32, 1), (100, 40)]  # (K, N)
ROWS = [1, 3, 16, 64, 200]  # 200: above INT8_KERNEL_MAX_ROWS, the dequantize + GEMM path


def weight(layer: Int8Linear) -> torch.Tensor:
    """dequantize(W) [N, K] in float64, from the layer's own packed weights."""
    q, scales = unpack(layer.qweight, layer.scales.view(torch.float16), layer.out_features)
    return dequantize(q, scales)[:, : layer.in_features].double()


def reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantize(W)^T in float64: the weight-only math."""
    return x.double() @ weight(layer).T


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel rounds it: per group of 32, q = rint(x / s) with s = max|x_group| / 32767 (fp32 math)."""
    padded = torch.nn.functional.pad(x, (0, -x.shape[1] % GROUP)).view(x.shape[0], -1, GROUP)
    scale = padded.abs().amax(-1, keepdim=True) / 32767
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return ((padded * inverse).round() * scale).view(x.shape[0], -1)[:, : x.shape[1]]


def magnitude(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """|x| @ |dequantize(W)|^T: the scale of each output's terms, against which rounding is measured."""
    return x.double().abs() @ weight(layer).abs().T


def error_bound(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the kernel may differ from `reference` by: x is rounded to int16 per group of 32 (error at most half
    a step, step = max|x_group| / 32767, on each element), then fp32 rounding of the per-group scaling."""
    q, scales = unpack(layer.qweight, layer.scales.view(torch.float16), layer.out_features)
    w_abs = dequantize(q, scales)[:, : layer.in_features].double().abs()
    padded = torch.nn.functional.pad(x.double(), (0, -x.shape[1] % GROUP))
    step = padded.abs().view(x.shape[0], -1, GROUP).amax(-1) / 32767
    step = step.repeat_interleave(GROUP, dim=1)[:, : x.shape[1]]
    return 0.51 * step @ w_abs.T + 2e-6 * x.double().abs() @ w_abs.T


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}")
def layer(request) -> Int8Linear:
    k, n = request.param
    torch.manual_seed(k * 1000 + n)
    weight = torch.randn(n, k) * 0.05
    weight[:, :GROUP] *= 20  # groups of very different scales
    return Int8Linear(weight)


@pytest.mark.parametrize("m", ROWS)
def test_kernel_matches_reference(layer: Int8Linear, m: int) -> None:
    torch.manual_seed(m)
    x = torch.randn(m, layer.in_features)
    x[:, 1] *= 50  # an outlier channel, as real activations have
    with torch.inference_mode():
        y = layer(x)
    expected = reference(layer, x)
    assert y.dtype == torch.float32 and y.shape == (m, layer.out_features)
    if layer.out_features >= 64:  # over many outputs the int16 rounding of x averages out (measured: ~2e-5)
        assert (y.double() - expected).norm() <= 1e-4 * expected.norm()
    if m <= quantized.INT8_KERNEL_MAX_ROWS:  # the kernel: exact integer products of the rounded x, fp32 group scaling
        exact = round_activations(x).double() @ weight(layer).T
        assert ((y.double() - exact).abs() <= 1e-5 * magnitude(layer, x)).all()
        assert ((y.double() - expected).abs() <= error_bound(layer, x)).all()
    else:  # dequantize + fp32 GEMM
        assert ((y.double() - expected).abs() <= 1e-5 * magnitude(layer, x)).all()


def test_rows_are_independent_of_batch_and_threads() -> None:
    """Each output row is computed by the same instructions whatever the batch or the thread count: bitwise equal."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(200, 576))
    x = torch.randn(13, 576)
    with torch.inference_mode():
        batched = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single_thread = layer(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(batched, alone)
    assert torch.equal(batched, single_thread)


def test_bias_leading_dims_and_dtype() -> None:
    torch.manual_seed(1)
    linear = Linear(64, 40, bias=True)
    linear.weight.data.normal_()
    linear.bias.data.normal_()
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        y = layer(x)
        y_bf16 = layer(x.to(torch.bfloat16))
    expected = (reference(layer, x.view(-1, 64)) + linear.bias.double()).view(2, 3, 40)
    assert y.shape == (2, 3, 40)
    assert (y.double() - expected).norm() <= 1e-4 * expected.norm()
    assert y_bf16.dtype == torch.bfloat16 and torch.allclose(y_bf16.float(), y, rtol=2e-2, atol=2e-2)


def test_torch_fallback_matches_kernel(monkeypatch) -> None:
    """Without the compiled kernel (no compiler), the layer computes the same function in torch."""
    torch.manual_seed(2)
    layer = Int8Linear(torch.randn(50, 96))
    x = torch.randn(5, 96)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr(quantized, "_library", False)
        slow = layer(x)
        assert torch.allclose(layer.weight_fp32_t(), dequantize(*unpack(
            layer.qweight, layer.scales.view(torch.float16), 50)).T)
    assert (slow - fast).norm() <= 1e-4 * slow.norm()


def test_quantize_round_trip_error_bound() -> None:
    torch.manual_seed(3)
    weight = torch.randn(64, 256) * torch.logspace(-4, 2, 64)[:, None]  # rows spanning six decades
    weight[0] = 0.0  # an all-zero row: zero scales, zero weights
    weight[1, 5] = 1e3  # an outlier: its group has a large step, the other groups do not
    q, scales = quantize(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (64, 256 // GROUP)
    assert q.abs().max() <= 127
    step = scales.float().repeat_interleave(GROUP, dim=1)
    restored = dequantize(q, scales)
    assert ((restored - weight).abs() <= 0.5 * step * (1 + 1e-6)).all()
    assert torch.equal(restored[0], torch.zeros(256))
    exact = weight.abs().view(64, -1, GROUP).amax(-1) / 127
    assert (scales.float() >= exact).all() and (scales.float() <= exact * (1 + 2**-10) + 2**-24).all()  # fp16 up
    assert torch.equal(torch.stack(unpack(*pack(q, scales), 64)[:1])[0], q)


def test_check_quantization_names_the_methods() -> None:
    from pagoda.layers.quantized import check_quantization

    with pytest.raises(ValueError, match="not supported"):
        check_quantization("int4", torch.device("cpu"))
    check_quantization(None, torch.device("cpu"))


@pytest.mark.parametrize("tied", [True, False])
def test_int8_from_the_checkpoint_equals_requantizing_the_loaded_model(tmp_path, tied) -> None:
    """The loader builds each int8 layer from its own slices of the checkpoint before reading the rest (no fp32
    copy of the model): the same buffers as quantizing a loaded model; the embedding looked up from int8 rows
    (the tied head's, shared, or its own copy)."""
    import transformers

    from pagoda.layers.quantized import Int8Embedding
    from pagoda.worker.model_loader import build_model, new_model
    from tests.harness import hf_checkpoint

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    checkpoint = hf_checkpoint(tmp_path)
    loaded = build_model(checkpoint, torch.float32, torch.device("cpu"))
    embedding = loaded.model.embed_tokens.weight.clone()
    assert quantize_model(loaded, "int8") == set()  # nothing read: the loaded weights were requantized
    fresh = new_model(checkpoint, torch.float32, torch.device("cpu"))
    consumed = quantize_model(fresh, "int8", checkpoint.sources())
    assert "model.embed_tokens.weight" in consumed and "model.layers.1.mlp.down_proj.weight" in consumed
    assert ("lm_head.weight" in consumed) != tied
    fresh.load_weights(checkpoint.tensors(), consumed)  # the norms
    assert not any(isinstance(m, Linear) for m in fresh.modules())
    mine, theirs = dict(fresh.named_buffers()), dict(loaded.named_buffers())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), loaded.parameters(), strict=True))
    embed = fresh.model.embed_tokens
    assert isinstance(embed, Int8Embedding)
    assert (embed.qweight.data_ptr() == fresh.lm_head.qweight.data_ptr()) == tied
    ids = torch.arange(300)
    step = embedding.abs().view(300, -1, GROUP).amax(-1, keepdim=True) / 127  # half an int8 step per group
    assert ((embed(ids) - embedding).abs().view(300, -1, GROUP) <= 0.5 * step * (1 + 1e-3)).all()


def test_quantize_works_a_bounded_number_of_rows_at_a_time(monkeypatch) -> None:
    weight = torch.randn(64, 96)
    whole = quantize(weight)
    monkeypatch.setattr(quantized, "QUANTIZE_ROWS", 7)  # chunks that cut through tiles and groups of rows
    assert all(torch.equal(a, b) for a, b in zip(quantize(weight), whole))


def test_cli_flag_reaches_engine_config() -> None:
    import argparse

    from pagoda.cli import _engine_args, _engine_config

    parser = argparse.ArgumentParser()
    _engine_args(parser)
    assert _engine_config(parser.parse_args(["--quantization", "int8"])).quantization == "int8"
    assert _engine_config(parser.parse_args(["--quantization", "none"])).quantization is None
    assert _engine_config(parser.parse_args([])).quantization == "auto"


def test_auto_quantization_resolves_per_checkpoint_device_and_dtype() -> None:
    from pagoda.layers.quantized import resolve_quantization

    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu, torch.float32, is_gguf=True) == "gguf"
    assert resolve_quantization("auto", cpu, torch.float32, is_gguf=False) is None
    assert resolve_quantization("auto", cpu, torch.bfloat16, is_gguf=True) is None
    assert resolve_quantization("auto", torch.device("meta"), torch.float32, is_gguf=True) is None
    assert resolve_quantization(None, cpu, torch.float32, is_gguf=True) is None
    with pytest.raises(ValueError, match="not supported"):
        resolve_quantization("int3", cpu, torch.float32, is_gguf=True)


# ---- the default model, int8 vs fp32 ----------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: What is 12 times 7?\nA:",
    "Explain in simple terms why the sky is blue.",
    "import numpy as np\n\ndef softmax(x):",
    "Relational databases store data in tables. A table has rows and columns, and each row is one record. " * 4
    # over INT8_KERNEL_MAX_ROWS tokens: the prefill takes the GEMM path
    + "For example, a table of customers might hold",
]
TOKENS = 32


@pytest.fixture(scope="module")
def int8_llm(smollm_gguf):
    return LLM(str(smollm_gguf), dtype="float32", quantization="int8", kv_cache_memory="256MiB", progress=False)


def test_int8_model_is_quantized(int8_llm) -> None:
    model = int8_llm.engine.runner.model
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.out_features == 49152


def test_int8_greedy_agrees_with_fp32(llm, int8_llm) -> None:
    """Measured: 6 of these 7 prompts keep fp32's first 16 tokens, 4 all 32 (greedy, near-ties diverge)."""
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    fp32 = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    int8 = [o.outputs[0].token_ids for o in int8_llm.generate(PROMPTS, params)]
    first_16_same = sum(a[:16] == b[:16] for a, b in zip(fp32, int8))
    assert first_16_same >= len(PROMPTS) - 2, f"only {first_16_same} of {len(PROMPTS)} prompts keep 16 tokens"
    assert int8_llm.engine.scheduler.kv_cache.usage == 0.0


def test_int8_logprobs_close_to_fp32(llm, int8_llm) -> None:
    """Teacher-forced on fp32's greedy continuation. Measured here: top-1 agreement 0.987, mean |logprob
    difference| of fp32's chosen token 0.022, max 0.19."""
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    diffs, agree = [], []
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        cont = out.outputs[0].token_ids
        ids = tokenizer.encode(prompt) + cont
        positions = torch.arange(len(ids) - len(cont) - 1, len(ids) - 1)
        chosen = torch.tensor(cont)[:, None]
        ref, ours = sequence_logprobs(llm, ids)[positions], sequence_logprobs(int8_llm, ids)[positions]
        diffs.append((ref.gather(1, chosen) - ours.gather(1, chosen)).abs().squeeze(1))
        agree.append(ours.argmax(-1) == chosen.squeeze(1))
    diff, agree = torch.cat(diffs), torch.cat(agree).float()
    assert agree.mean() >= 0.97, f"top-1 agreement {agree.mean():.3f}"
    assert diff.mean() < 0.05, f"mean |logprob difference| {diff.mean():.4f}"
    assert diff.max() < 1.0, f"max |logprob difference| {diff.max():.4f}"
