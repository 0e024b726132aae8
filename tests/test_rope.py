"""Rope scaling (layers/rope.py) against transformers' own rotary initialisation, the context each type reaches, and
long prompts. Greedy agreement with transformers for yarn and longrope models is in tests/test_models_random.py."""

from __future__ import annotations

import math

import pytest
import torch

from pagoda.config import EngineConfig, ModelConfig
from pagoda.layers.common import RotaryEmbedding
from pagoda.layers.rope import context_length, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM = 32
MAX_POS = 4096


def _hf_config(rope: dict, max_pos: int = MAX_POS):
    return transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=max_pos, rope_parameters={"rope_theta": 10000.0, **rope})


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-betas": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16,
                   "beta_slow": 2},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 512, "mscale": 1.0,
                    "mscale_all_dim": 0.5},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                              "attention_factor": 1.3},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                 "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.9 * i for i in range(HEAD_DIM // 2)]},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("served", [MAX_POS // 4, MAX_POS])
def test_frequencies_equal_transformers(name, served) -> None:
    scaling = SCALINGS[name]
    config = _hf_config(scaling)
    # transformers picks longrope's set by the sequence length; ours by the context served
    expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=served)
    ours, factor = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, served)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-6)


def test_longrope_switches_to_its_long_factors_beyond_the_original_context() -> None:
    scaling = SCALINGS["longrope"]
    short, _ = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, 1024)
    long, factor = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, 1025)
    assert torch.all(long[1:] < short[1:])  # larger divisors: longer wavelengths
    assert factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(1024)))


@pytest.mark.parametrize("served", [MAX_POS // 2, MAX_POS, 3 * MAX_POS])
def test_dynamic_ntk_is_fixed_at_the_context_served(served) -> None:
    """Equal to transformers' frequencies at a sequence of `served` tokens; the default ones within the original
    context, so a server that stays inside it computes exactly the unscaled model."""
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](_hf_config(scaling), "cpu", seq_len=served)
    ours, factor = rope_frequencies(HEAD_DIM, 10000.0, scaling, MAX_POS, served)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=2e-6, atol=0)
    default, _ = rope_frequencies(HEAD_DIM, 10000.0, None, MAX_POS, served)
    assert torch.equal(ours, default) == (served <= MAX_POS) and factor == 1.0


def test_the_table_carries_the_attention_factor() -> None:
    scaling = SCALINGS["yarn-attention-factor"]
    plain, scaled = RotaryEmbedding(HEAD_DIM, 64, 1e4), RotaryEmbedding(HEAD_DIM, 64, 1e4, scaling, None, MAX_POS)
    inv_freq, _ = rope_frequencies(HEAD_DIM, 1e4, scaling, MAX_POS, 64)
    angles = torch.outer(torch.arange(64, dtype=torch.float64), inv_freq)
    torch.testing.assert_close(scaled.cos, (1.3 * angles.cos()).float())
    torch.testing.assert_close(scaled.sin, (1.3 * angles.sin()).float())
    assert plain.cos.shape == scaled.cos.shape == (64, HEAD_DIM // 2)


def test_unknown_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        rope_frequencies(HEAD_DIM, 1e4, {"rope_type": "mystery", "factor": 2.0}, MAX_POS, MAX_POS)


@pytest.mark.parametrize("scaling, expected", [
    (None, MAX_POS),
    ({"rope_type": "linear", "factor": 2.0}, 2 * MAX_POS),
    ({"rope_type": "dynamic", "factor": 4.0}, 4 * MAX_POS),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),  # Qwen3's recipe
    ({"rope_type": "yarn", "factor": 4.0}, 4 * MAX_POS),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512}, MAX_POS),
    (SCALINGS["longrope"], MAX_POS),
])
def test_the_context_each_scaling_reaches(scaling, expected) -> None:
    assert context_length(MAX_POS, scaling) == expected


def _model_config(rope: dict | None, max_pos: int) -> ModelConfig:
    c = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=max_pos, rope_parameters=rope)
    return ModelConfig.from_hf_config(c.to_dict())


def test_a_qwen3_yarn_config_reaches_128k_and_longer_is_refused() -> None:
    config = _model_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                            "rope_theta": 1e6}, 40960)
    assert config.context_length == 131072
    assert EngineConfig(model="x").context_for(config) == 131072
    assert EngineConfig(model="x", max_model_len=65536).context_for(config) == 65536
    with pytest.raises(ValueError, match="outside the model's context of 131072 tokens"):
        EngineConfig(model="x", max_model_len=131073).context_for(config)
    plain = _model_config({"rope_type": "default", "rope_theta": 1e6}, 40960)
    with pytest.raises(ValueError, match="needs rope scaling"):
        EngineConfig(model="x", max_model_len=40961).context_for(plain)


def test_an_engine_refuses_a_context_the_model_cannot_reach(tmp_path) -> None:
    from pagoda.entrypoints.llm import LLM
    from tests.tiny_models import save_tiny_model

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    directory = save_tiny_model(tmp_path, config)
    with pytest.raises(ValueError, match="max_model_len 257 is outside the model's context of 256 tokens"):
        LLM(str(directory), max_model_len=257, progress=False)


def test_dynamic_ntk_inside_the_original_context_is_the_unscaled_model(tmp_path) -> None:
    """A dynamic-NTK model served at its original context gives transformers' greedy tokens (transformers does
    not rescale below max_position_embeddings either)."""
    from pagoda import LLM, SamplingParams
    from tests.tiny_models import save_tiny_model

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.15,
                                      rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4})
    directory = save_tiny_model(tmp_path, config)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    prompt = [1 + (7 * i) % 95 for i in range(50)]  # no 0: generate() would mask pad_token_id 0 as padding
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    with LLM(str(directory), dtype="float32", quantization=None, kv_cache_dtype="float32", max_model_len=128,
             kv_cache_memory="16MiB", progress=False) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=20,
                                                                          ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()


def test_a_128k_token_prompt_completes(tmp_path) -> None:
    """A tiny yarn model (4096 x 32 = 131072 tokens) prefills a 131000-token prompt in chunks and decodes: the
    whole context is usable, nothing is truncated, every block comes back."""
    from pagoda import LLM, SamplingParams
    from tests.tiny_models import save_tiny_model

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                                      rope_parameters={"rope_type": "yarn", "factor": 32.0, "rope_theta": 1e4,
                                                       "original_max_position_embeddings": 4096})
    directory = save_tiny_model(tmp_path, config)
    prompt = [(i * 13) % 64 for i in range(131000)]
    with LLM(str(directory), max_num_seqs=2, max_prefill_tokens=4096, progress=False) as llm:
        assert llm.engine.max_model_len == 131072
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))
        assert len(out[0].prompt_token_ids) == 131000 and len(out[0].outputs[0].token_ids) == 8
        kv = llm.engine.scheduler.kv_cache
        assert kv.pool.num_free_blocks == kv.num_blocks


def test_greedy_tokens_equal_transformers_at_32k(tmp_path) -> None:
    """A tiny Qwen3 with Qwen's yarn recipe (4096 x 8): a 32000-token prompt prefilled in chunks, then decoded,
    gives transformers' greedy tokens (fp32 weights and cache)."""
    from pagoda import LLM, SamplingParams
    from tests.tiny_models import save_tiny_model

    config = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=4096, initializer_range=0.2,
                                      rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                                                       "original_max_position_embeddings": 4096})
    directory = save_tiny_model(tmp_path, config)
    rng = torch.Generator().manual_seed(3)
    prompt = (torch.randint(1, 128, (32000,), generator=rng)).tolist()  # no 0: generate() masks pad_token_id 0
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with LLM(str(directory), dtype="float32", quantization=None, kv_cache_dtype="float32", max_model_len=32768,
             max_num_seqs=1, max_prefill_tokens=4096, progress=False) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=6,
                                                                          ignore_eos=True))
    assert out[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()
