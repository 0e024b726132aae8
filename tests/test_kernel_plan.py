"""The kernel plan (worker/kernel_plan.py): the bf16 GEMM path of the quantized layers, the choice of a row
threshold from timings, its cache, the overrides, and what it does to the native stack and an engine."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from pagoda import kernels
from pagoda.layers.quantized import Int8Linear, Q4Linear, packed_bf16_kinds
from pagoda.worker import kernel_plan
from pagoda.worker.kernel_plan import KernelPlan, ShapeChoice, parse_mode
from tests.harness import random_q4 as random_q4_values


def random_q4(n: int, k: int, seed: int, activations: str = "int16") -> Q4Linear:
    return Q4Linear(*random_q4_values(n, k, seed), activations=activations)


def layers() -> list:
    torch.manual_seed(0)
    return [random_q4(96, 64, 1), random_q4(40, 96, 2, "int8"), Int8Linear(torch.randn(48, 80) * 0.05)]


@pytest.mark.parametrize("index", range(3), ids=["q4a16", "q4a8", "int8"])
def test_bf16_path_computes_the_dequantized_weights_from_its_threshold(index) -> None:
    layer = layers()[index]
    w = layer.weight_fp32_t()[:layer.in_features].t().double()
    small, large = torch.randn(3, layer.in_features), torch.randn(8, layer.in_features)
    before_small, before_large = layer(small), layer(large)
    plain_bytes = layer.nbytes

    layer.use_bf16(4)
    packed = bool(packed_bf16_kinds()) and layer.out_features % 16 == 0
    # the AMX kernel's packed bf16 copy where it runs and the shape fits it, else fp32 for oneDNN
    assert layer.dense_weight is not None
    assert layer.dense_weight.dtype == (torch.bfloat16 if packed else torch.float32)
    assert layer.nbytes == plain_bytes + layer.dense_weight.nbytes
    assert torch.equal(layer(small), before_small)  # below the threshold: the same path as before, bit for bit
    y = layer(large)
    assert not torch.equal(y, before_large)  # another path: bf16 rounding of x and of the weights
    # each product x_k w_k is off by at most ~2^-8 relative (bf16 rounding of both), accumulated in fp32
    assert y.dtype == torch.float32
    bound = 2 ** -7 * (large.double().abs() @ w.abs().T) + 1e-6
    assert ((y.double() - large.double() @ w.T).abs() <= bound).all()

    layer.use_bf16(None)
    assert layer.dense_weight is None and layer.nbytes == plain_bytes
    assert torch.equal(layer(large), before_large)


def test_modes_are_validated_at_the_config_and_reach_it_from_the_cli() -> None:
    from pagoda.cli import _engine_args, _engine_config
    from pagoda.config import EngineConfig

    assert parse_mode("auto") is None and parse_mode("kernel") is None and parse_mode("bf16:96") == 96
    for bad in ("bf16", "bf16:0", "bf16:-3", "bf16:x", "amx", ""):
        with pytest.raises(ValueError, match="auto, kernel, bf16:N"):
            parse_mode(bad)
    with pytest.raises(ValueError, match="kernel plan 'fast'"):
        EngineConfig(model="x", kernel_plan="fast")
    parser = argparse.ArgumentParser()
    _engine_args(parser)
    assert _engine_config(parser.parse_args([])).kernel_plan == "kernel"
    assert _engine_config(parser.parse_args(["--kernel-plan", "bf16:64"])).kernel_plan == "bf16:64"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = layers()
        self.d = random_q4(96, 64, 7)  # the shape of `a`: measured once, planned alike


def fake_seconds(calls: list):
    """Kernel: 1 µs per row; bf16: 40 µs + 0.5 µs per row, so bf16 wins from 81 rows on."""

    def seconds(fn, x, budget=None):
        calls.append((x.shape[0], budget is None))
        rows = x.shape[0]
        return rows * 1e-6 if budget is None else (40 + 0.5 * rows) * 1e-6

    return seconds


def test_threshold_is_the_smallest_bucket_from_which_bf16_wins(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(kernel_plan, "_seconds", fake_seconds(calls))
    model = Tiny()
    plan = kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)
    assert plan.source.startswith("measured") and len(plan.shapes) == 3
    assert {s.bf16_min_rows for s in plan.shapes} == {128}
    # from the largest bucket down, stopping at the first bucket bf16 loses (64)
    assert [rows for rows, _, _ in plan.shapes[0].timings] == [64, 128, 256, 512, 576]
    assert [rows for rows, kernel in calls[:6]] == [576, 576, 512, 512, 256, 256]
    plan.apply(model)
    assert model.a.bf16_min_rows == model.d.bf16_min_rows == 128 and model.a.dense_weight is not None
    assert "q4a16 96x64 bf16 from 128" in plan.summary()
    assert "bf16 from 128 rows" in plan.table()


def test_a_slow_first_call_is_a_warm_up_not_the_answer() -> None:
    # A path's first call in a process pays one-off costs (oneDNN's JIT for the shape): it must not be timed, nor
    # end the measurement through the budget.
    durations = iter([0.05] + [0.001] * 10)
    calls = []

    def call(x):
        calls.append(x)
        time.sleep(next(durations))

    assert kernel_plan._seconds(call, torch.zeros(1), budget=0.01) < 0.01
    assert len(calls) == 1 + kernel_plan.REPEATS
    slow = iter([0.001, 0.02, 0.001, 0.001])
    # a warm call over the budget is the answer: no more calls
    assert kernel_plan._seconds(lambda x: time.sleep(next(slow)), torch.zeros(1), budget=0.01) >= 0.02
    assert next(slow) == 0.001 and next(slow) == 0.001


def test_a_bf16_path_that_never_wins_is_not_chosen(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_plan, "_seconds", lambda fn, x, budget=None: 1.0 if budget is None else 2.0)
    model = Tiny()
    plan = kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)
    assert all(s.bf16_min_rows is None and len(s.timings) == 1 for s in plan.shapes)  # one bucket timed
    plan.apply(model)
    assert model.a.dense_weight is None  # no copy kept


def test_the_plan_is_cached_per_machine_and_model(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_plan, "_seconds", fake_seconds([]))
    model = Tiny()
    first = kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)
    files = list((tmp_path / "kernel-plans").glob("*.json"))
    assert len(files) == 1

    def no_measuring(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernel_plan, "measure_shape", no_measuring)
    again = kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)
    assert again.source.startswith("cached") and again.shapes == first.shapes
    # another step size is another plan; so is a corrupt file
    with pytest.raises(AssertionError, match="measured again"):
        kernel_plan.resolve("auto", model, largest_rows=1024, head_rows=64)
    files[0].write_text("{not json")
    with pytest.raises(AssertionError, match="measured again"):
        kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)
    files[0].write_text(json.dumps([{"fmt": "q4a16"}]))
    with pytest.raises(AssertionError, match="measured again"):
        kernel_plan.resolve("auto", model, largest_rows=576, head_rows=64)


def test_overrides_are_not_measured(monkeypatch) -> None:
    monkeypatch.setattr(kernel_plan, "measure_shape", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    model = Tiny()
    assert {s.bf16_min_rows for s in kernel_plan.resolve("kernel", model, 576, 64).shapes} == {None}
    forced = kernel_plan.resolve("bf16:32", model, 576, 64)
    assert forced.source == "override" and {s.bf16_min_rows for s in forced.shapes} == {32}
    assert kernel_plan.resolve("auto", torch.nn.Linear(4, 4), 576, 64).shapes == ()


def test_real_measurement_times_both_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    layer = random_q4(256, 128, 3)
    choice = kernel_plan.measure_shape(layer, largest_rows=64)
    assert choice.timings and all(k > 0 and (b is None or b > 0) for _, k, b in choice.timings)
    assert choice.timings[-1][0] == 64  # the largest bucket is always timed
    assert choice.bf16_min_rows in (None, *kernel_plan._buckets(64))
    assert layer.dense_weight is None  # measuring leaves the layer as it was


@pytest.mark.parametrize("bf16_path", ["packed", "onednn"])
def test_engine_plan_and_native_stack_follow_the_kernel_plan(smollm_gguf, monkeypatch, bf16_path) -> None:
    """The native stack runs the plan's bf16 calls by a packed kernel in the stack (AMX or AVX512-BF16, where the
    CPU has them) or calls back into torch (oneDNN) for them: forced here by pretending it has neither."""
    from pagoda import LLM, SamplingParams
    from pagoda.layers import quantized
    from pagoda.models import native_stack

    if bf16_path == "packed" and not packed_bf16_kinds():
        pytest.skip(f"no AMX or AVX512-BF16 on this CPU ({kernels.host_isa() or 'unknown ISA'})")
    if bf16_path == "onednn":
        monkeypatch.setattr(quantized, "_packed_kinds", 0)
    calls = []
    run_dense = native_stack.NativeStack._run_dense
    monkeypatch.setattr(native_stack.NativeStack, "_run_dense",
                        lambda self, index, x, rows, y: (calls.append(rows), run_dense(self, index, x, rows, y)))
    llm = LLM(str(smollm_gguf), kernel_plan="bf16:32", kv_cache_memory="64MiB", progress=False)
    engine = llm.engine
    assert engine.plan.kernel_plan.startswith("bf16:32 (override)")
    stack = engine.runner.native_stack
    assert stack.max_tokens is None  # the stack serves every step, its GEMMs dense from 32 rows on
    structs = [s for layer in stack._layers for s in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert {s.dense_from for s in structs} == {32}
    assert all(bool(s.dense) == (bf16_path == "packed") for s in structs)  # a packed weight runs in the stack
    kernel = LLM(str(smollm_gguf), kernel_plan="kernel", kv_cache_memory="64MiB", progress=False)
    kernel_stack = kernel.engine.runner.native_stack
    assert {layer.qkv.dense_from for layer in kernel_stack._layers} == {0}
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 3
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    a = llm.generate([prompt], params)[0].outputs[0]
    if bf16_path == "packed":
        assert not calls
    else:
        assert calls and min(calls) >= 32 and len(calls) % 120 == 0  # the prefill's 4 x 30 layers, not the decode
    b = kernel.generate([prompt], params)[0].outputs[0]
    # the prefill ran bf16 GEMMs, the decode the kernels: the first token's logprob is close, not equal
    assert a.token_ids[0] == b.token_ids[0]
    assert 0 < abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.05
    kv = engine.scheduler.kv_cache
    assert kv.pool.num_free_blocks == kv.num_blocks


def test_bf16_gemm_sums_and_returns_fp32() -> None:
    """Products of bf16-rounded operands summed in fp32 (on a CPU without bf16 units oneDNN may compute in fp32:
    also accepted); never a result rounded to bf16, which would cost 8 significant bits per output."""
    from pagoda.layers.quantized import bf16_gemm

    torch.manual_seed(0)
    x, w = torch.randn(64, 576), torch.randn(320, 576) * 0.05
    before = torch.backends.mkldnn.matmul.fp32_precision
    y = bf16_gemm(x, w)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # the switch is undone
    assert y.dtype == torch.float32
    scale = x.double().abs() @ w.double().abs().T
    bf16_operands = x.bfloat16().double() @ w.bfloat16().double().T
    exact = x.double() @ w.double().T
    close = lambda ref: bool(((y.double() - ref).abs() <= 1e-5 * scale + 1e-6).all())
    assert close(bf16_operands) or close(exact)  # a bf16-rounded output is ~2^-9 away from both


def test_step_check_raises_thresholds_to_where_whole_steps_win(monkeypatch, tmp_path) -> None:
    """Per-shape timings say bf16 from 16 rows; whole steps (cold weights, callbacks) say the plan wins from 64:
    the decoder shapes then start at 64, the LM head keeps its own choice, and the result is cached."""
    from types import SimpleNamespace

    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    model = Tiny()
    model.config = SimpleNamespace(vocab_size=100)
    shapes = tuple(ShapeChoice(fmt, n, k, 16, ((16, 1.0, 0.5), (32, 1.0, 0.5), (64, 1.0, 0.5), (128, 1.0, 0.5)),
                               head=(fmt == "int8")) for fmt, n, k in kernel_plan._distinct_shapes(model))
    plan = KernelPlan("auto", "measured", shapes, None, tmp_path / "plan.json")
    assert plan.needs_step_check

    def step_seconds(fn, x, budget=None):  # the kernels: 1 per token; the plan: 40 + 0.5 per token
        return x.shape[0] * 1.0 if model.a.bf16_min_rows is None else 40 + 0.5 * x.shape[0]

    monkeypatch.setattr(kernel_plan, "_seconds", step_seconds)
    stack = SimpleNamespace(follow_layers=lambda: None)
    backend = SimpleNamespace(build_metadata=lambda layout, windows: None)
    checked = kernel_plan.check_steps(plan, model, stack, backend, [torch.zeros(2, 64 * 16, 1, 1)], 16)
    assert checked.step.floor == 128 and [t[0] for t in checked.step.timings] == [16, 32, 64, 128]
    assert {s.bf16_min_rows for s in checked.shapes if not s.head} == {128}
    assert [s.bf16_min_rows for s in checked.shapes if s.head] == [16]
    assert model.a.bf16_min_rows == 128 and not checked.needs_step_check
    cached = kernel_plan._read_cache(tmp_path / "plan.json")
    assert cached.shapes == checked.shapes and cached.step == checked.step
