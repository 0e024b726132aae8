"""`--dtype bfloat16` on the CPU: the bf16-weight kernel (Bf16Linear) and the native stack over a bf16 model.

The kernel widens bf16 weights to fp32 and multiplies fp32 activations, so a bf16 model with an fp32 KV cache
computes what an fp32 model with the same (bf16-representable) weights computes, up to fp32 rounding order: the
fp32 engine on those weights (itself checked against transformers in test_models_random.py) is the oracle, token
for token."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda.layers import quantized
from pagoda.layers.linear import Linear
from pagoda.layers.quantized import Bf16Linear, use_bf16_kernels

transformers = pytest.importorskip("transformers")

from test_models_random import CONFIGS  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

MAX_TOKENS = 16


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (5, 67), (13, 3), (1, 8)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 64])
def test_bf16_linear_matches_its_weights(n, k, rows):
    gen = torch.Generator().manual_seed(n * k + rows)
    w = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    layer = Bf16Linear(w, bias)
    assert layer.weight.data_ptr() == w.data_ptr()  # the model's own tensor, not a copy
    x = torch.randn(rows, k, generator=gen)
    expected = x.double() @ w.double().T + bias.double()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # returned in the caller's dtype


def test_use_bf16_kernels_swaps_only_bf16_layers():
    model = torch.nn.Sequential()
    model.add_module("a", Linear(32, 16))
    model.add_module("b", Linear(16, 8))
    model.a.weight.data = model.a.weight.data.bfloat16()
    model.b.weight.data = model.b.weight.data.float()
    assert use_bf16_kernels(model) == 1
    assert isinstance(model.a, Bf16Linear) and not isinstance(model.b, quantized.QuantizedLinear)


def _bf16_checkpoint(name: str, directory) -> None:
    """A random tiny model (and a tokenizer) whose weights are exactly representable in bf16, saved in fp32."""
    save_tiny_model(directory, CONFIGS[name])
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(directory)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bf16_model_runs_natively_with_fp32_tokens(name, tmp_path):
    from pagoda import LLM, SamplingParams

    _bf16_checkpoint(name, tmp_path)
    rng = random.Random(5)
    vocab = CONFIGS[name].vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]} for n in (1, 7, 30, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = dict(kv_cache_memory="64MiB", progress=False, max_prefill_tokens=48)  # 48: chunked prefill
    fp32 = LLM(str(tmp_path), dtype="float32", kv_cache_dtype="float32", quantization=None, **engine)
    expected = [o.outputs[0].token_ids for o in fp32.generate(prompts, params)]
    llm = LLM(str(tmp_path), dtype="bfloat16", kv_cache_dtype="float32", **engine)
    plan = llm.engine.plan
    assert plan.dtype == "bfloat16" and plan.native_stack, plan.native_stack_reason
    model = llm.engine.runner.model
    assert isinstance(model.model.layers[0].mlp.down_proj, Bf16Linear) and isinstance(model.lm_head, Bf16Linear)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    assert llm.engine.scheduler.kv_cache.pool.num_free_blocks == llm.engine.scheduler.kv_cache.num_blocks

    # the default KV cache of a bf16 model is bf16, read and written by the native kernels too; its rounding
    # moves some tokens of a random model, so the check is agreement, not identity
    llm = LLM(str(tmp_path), dtype="bfloat16", **engine)
    assert llm.engine.plan.kv_cache_dtype == "bfloat16" and llm.engine.plan.native_stack
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    first = [g[0] == e[0] for g, e in zip(got, expected)]
    assert sum(first) >= len(prompts) - 1, (got, expected)

