"""Random-weight tiny models of each architecture, built from transformers configs: our greedy tokens must
equal transformers' token for token, in one mixed batch, alone, and under preemption."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness import Harness, hf_checkpoint  # noqa: E402

MAX_TOKENS = 24


def _configs():
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15, rms_norm_eps=1e-5)
    return {
        "llama": transformers.LlamaConfig(**common, tie_word_embeddings=False),
        "llama3-rope-tied": transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # YaRN over the whole context (a short original context, so the blend of frequencies is exercised)
        "qwen3-yarn": transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 128}),
        # LongRoPE inside its original context: the short factors and the attention factor of `factor`
        "llama-longrope": transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
        "mistral-sliding": transformers.MistralConfig(**common, sliding_window=20, tie_word_embeddings=False),
        "gemma3": transformers.Gemma3TextConfig(**common, head_dim=32, sliding_window=12, query_pre_attn_scalar=24,
                                                layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention"],
                                                rope_parameters={
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    }


CONFIGS = _configs()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_model(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return name, model, directory


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 5, 17, 40, 75)]


def _reference(model, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    model.generation_config.eos_token_id = None  # never stop early, and never suppress any token
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def test_random_model_matches_transformers(tiny_model):
    name, model, directory = tiny_model
    if name == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None, "qwen2 must exercise the qkv bias"
    prompts = _prompts(model.config.vocab_size)
    expected = _reference(model, prompts)
    checkpoint = hf_checkpoint(directory)

    batched = Harness(checkpoint, budget=48).generate(prompts, MAX_TOKENS)
    assert batched == expected, f"{name}: batched greedy tokens differ from transformers"

    alone = [Harness(checkpoint, budget=48).generate([p], MAX_TOKENS)[0] for p in prompts[:3]]
    assert alone == expected[:3], f"{name}: a request alone differs from transformers"

    tight = Harness(checkpoint, num_blocks=20, block_size=4, budget=16, max_num_seqs=5)
    assert tight.generate(prompts[:4], MAX_TOKENS) == expected[:4], f"{name}: preemption changed the tokens"
    assert tight.scheduler.num_preemptions_total > 0, "the cache is small enough that preemption must happen"
