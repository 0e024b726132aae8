"""`pagoda plan` (pagoda/planner.py): parameter counts against transformers' models, bytes by precision, KV bytes
per token against the engine's own accounting, a GGUF file's stored bytes, device fits, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pagoda.config import ModelConfig
from pagoda.planner import (
    DEVICES,
    PRECISIONS,
    PlanError,
    count_parameters,
    load_for_plan,
    plan,
    weight_bytes_from_config,
)
from pagoda.worker.kv_cache import kv_bytes_per_token

LLAMA_70B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False}


def tiny_configs():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return {"llama": LlamaConfig(**common), "llama-tied": LlamaConfig(**common, tie_word_embeddings=True),
            "qwen3": Qwen3Config(**common, head_dim=32), "mistral": MistralConfig(**common, sliding_window=64),
            "gemma3": Gemma3TextConfig(**common, head_dim=16, sliding_window=32)}


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen3", "mistral", "gemma3"])
def test_parameter_counts_equal_transformers_models(name) -> None:
    from transformers import AutoModelForCausalLM

    hf_config = tiny_configs()[name]
    model = AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in model.parameters())  # tied weights counted once
    counts = count_parameters(ModelConfig.from_hf_config(hf_config.to_dict()))
    assert sum(counts.values()) == expected
    assert (counts["lm_head"] == 0) == bool(hf_config.tie_word_embeddings)


def test_a_70b_config_alone_is_planned_in_bytes() -> None:
    config = ModelConfig.from_hf_config(LLAMA_70B)
    p = plan(config, precision="bf16", kv_cache_dtype="bfloat16", context=32768, concurrency=8)
    assert abs(p.parameters - 70.55e9) < 0.01e9  # Llama 3 70B
    assert p.kv_bytes_per_token == 80 * 8 * 128 * 2 * 2 == 327_680
    assert p.kv_bytes == 327_680 * 32768 * 8
    assert p.weights.linear == count_parameters(config)["linear"] * 2
    total = p.weights.per_rank(1) + p.kv_bytes + p.activation_bytes + p.overhead_bytes
    assert p.total_per_rank == total
    by_name = {d.device: d for d in p.devices}
    assert by_name["L4"].tp is None  # 8 x 24 GB cannot hold it
    for d in p.devices:
        if d.tp is not None:  # the smallest degree that fits: it fits, and half of it does not
            at = plan(config, precision="bf16", context=32768, concurrency=8, tp=d.tp).total_per_rank
            assert at <= 0.9 * d.memory_bytes and math.isclose(d.utilization, at / d.memory_bytes)
            if d.tp > 1:
                half = plan(config, precision="bf16", context=32768, concurrency=8, tp=d.tp // 2).total_per_rank
                assert half > 0.9 * d.memory_bytes
    assert {name for name, _ in DEVICES} <= set(by_name)


def test_tensor_parallel_splits_kv_heads_and_projections() -> None:
    config = ModelConfig.from_hf_config(LLAMA_70B)
    one, eight = plan(config, tp=1), plan(config, tp=8)
    assert eight.kv_bytes_per_token == one.kv_bytes_per_token // 8  # 8 KV heads: one per rank
    assert plan(config, tp=16 // 2).weights_per_rank < one.weights_per_rank / 7
    sixteen_heads = plan(ModelConfig.from_hf_config({**LLAMA_70B, "num_key_value_heads": 4}), tp=8)
    assert sixteen_heads.kv_bytes_per_token == one.kv_bytes_per_token // 8  # 4 heads on 8 ranks: replicated


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_bytes_per_parameter_by_precision(precision) -> None:
    config = ModelConfig.from_hf_config(LLAMA_70B)
    weights = weight_bytes_from_config(config, precision)
    assert weights.linear == round(count_parameters(config)["linear"] * PRECISIONS[precision])
    assert weights.norms == count_parameters(config)["norms"] * 4
    assert PRECISIONS["int4"] < PRECISIONS["fp8"] < PRECISIONS["int8"] < PRECISIONS["bf16"] < PRECISIONS["fp32"]


@pytest.mark.parametrize("kv_dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16),
                                                   ("bfloat16", torch.bfloat16), ("int8", torch.int8),
                                                   ("fp8_e4m3", torch.float8_e4m3fn),
                                                   ("fp8_e5m2", torch.float8_e5m2)])
def test_kv_bytes_per_token_are_the_engines(smollm_gguf, kv_dtype, torch_dtype) -> None:
    config, stored, _ = load_for_plan(str(smollm_gguf))
    p = plan(config, weights=stored, kv_cache_dtype=kv_dtype, context=2048, concurrency=3)
    assert p.kv_bytes_per_token == kv_bytes_per_token(config, torch_dtype)
    assert p.kv_bytes == kv_bytes_per_token(config, torch_dtype) * 2048 * 3


def test_a_gguf_file_is_planned_from_its_tensors(smollm_gguf) -> None:
    from pagoda.loader.gguf_file import GGUFFile

    config, held, _ = load_for_plan(str(smollm_gguf))
    gguf = GGUFFile(smollm_gguf)
    assert sum(held.by_type.values()) == sum(t.data.nbytes for t in gguf.tensors())
    assert sum(held.by_type.values()) < smollm_gguf.stat().st_size < sum(held.by_type.values()) + 8 * 2 ** 20
    assert {"Q4_1", "Q8_0", "F32"} <= set(held.by_type)
    # Q4_1 and Q8_0 are held as stored (the file's only types here), plus the rotary tables
    assert held.total == sum(held.by_type.values()) + held.buffers
    p = plan(config, weights=held)
    assert p.precision == "as stored" and p.weights.source.startswith(str(smollm_gguf))


@pytest.mark.parametrize("fixture", ["smollm_gguf", "gemma_gguf"])
def test_the_plan_matches_the_engines_memory(fixture, request) -> None:
    """The registry models' weights and KV cache as the loaded engine reports them (its execution plan): within
    5% (Gemma's Q4_K/Q6_K/Q5_0 matrices are dequantized to fp32 at load, which the plan counts)."""
    from pagoda.entrypoints.llm import LLM

    path = request.getfixturevalue(fixture)
    config, held, _ = load_for_plan(str(path))
    with LLM(str(path), kv_cache_memory="64MiB", max_model_len=1024, progress=False) as llm:
        engine, seqs = llm.engine.plan, llm.engine.config.max_num_seqs
    p = plan(config, weights=held, kv_cache_dtype=engine.kv_cache_dtype, context=1024, max_num_seqs=seqs)
    assert abs(p.weights_per_rank - engine.weight_bytes) <= 0.05 * engine.weight_bytes
    assert p.kv_bytes_per_token == engine.kv_bytes_per_token
    # the activation formula against the peak the engine measured on its largest step (BENCHMARKS.md: within
    # 0.7-1.3x on these models); the engine reserves the larger
    assert p.activation_bytes == engine.activation_formula_bytes
    assert 0.5 * engine.activation_formula_bytes < engine.activation_measured_bytes < 2 * p.activation_bytes
    assert engine.activation_reserve_bytes == max(engine.activation_formula_bytes, engine.activation_measured_bytes)


def test_sliding_window_layers_are_capped_in_the_lower_bound() -> None:
    gemma = tiny_configs()["gemma3"].to_dict() | {"num_hidden_layers": 6, "layer_types": None}
    config = ModelConfig.from_hf_config(gemma)
    p = plan(config, context=256, concurrency=2)
    # 5 of every 6 layers slide over 32 tokens, the sixth attends to the whole context
    per_layer = p.kv_bytes_per_token // 6
    assert p.kv_window_capped_bytes == per_layer * (5 * 32 + 256) * 2
    assert any("sliding-window" in note for note in p.notes)
    assert plan(config, context=16).kv_window_capped_bytes == plan(config, context=16).kv_bytes  # inside the window


def test_bad_settings_are_refused() -> None:
    config = ModelConfig.from_hf_config(LLAMA_70B)
    for kwargs in ({"precision": "int3"}, {"kv_cache_dtype": "fp4"}, {"context": 0}, {"tp": 3},
                   {"utilization": 1.5}):
        with pytest.raises(PlanError):
            plan(config, **kwargs)
    long = plan(config, context=262144)
    assert any("max_position_embeddings" in note for note in long.notes)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_plans_a_config_json_alone(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    out = run_cli(str(path), "--context", "docs", "--concurrency", "4", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["context"] == 131072 and data["concurrency"] == 4 and data["kv_bytes_per_token"] == 327_680
    assert data["weights"]["source"] == "config" and data["precision"] == "bf16"
    text = run_cli(str(path), "--context", "32k", "--precision", "int4", "-tp", "2")
    assert text.returncode == 0 and "H100 80GB" in text.stdout and "tensor parallel 2" in text.stdout
    assert "context 32768 tokens" in text.stdout
    for bad in (["--context", "lots"], ["--context", "-5"]):
        refused = run_cli(str(path), *bad)
        assert refused.returncode == 2 and "not a token count" in refused.stderr
    missing = run_cli(str(tmp_path / "nope"))
    assert missing.returncode == 1 and "pagoda plan:" in missing.stderr and "Traceback" not in missing.stderr
    not_config = tmp_path / "other.json"
    not_config.write_text("{}")
    wrong = run_cli(str(not_config))
    assert wrong.returncode == 1 and "not a model config.json" in wrong.stderr
