"""FP8 (e4m3) checkpoints in the layouts llm-compressor and Hugging Face write, made here from a tiny random model:
the engine must load exactly the dequantized values (greedy tokens equal transformers' on those values), and
refuse what it cannot read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda import LLM, SamplingParams
from pagoda.loader.fp8 import FP8Source, fp8_scheme

transformers = pytest.importorskip("transformers")

from tests.tiny_models import save_tiny_model  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_MAX = 448.0


def _quantize(w: torch.Tensor, strategy: str, block: tuple[int, int] = (32, 32)):
    """(fp8 weight, scale, dequantized weight) for one strategy."""
    if strategy == "tensor":
        scale = w.abs().max().reshape(1) / E4M3_MAX
        expanded = scale.reshape(1, 1)
    elif strategy == "channel":
        scale = w.abs().amax(1, keepdim=True) / E4M3_MAX
        expanded = scale
    else:
        bn, bk = block
        rows, cols = math.ceil(w.shape[0] / bn), math.ceil(w.shape[1] / bk)
        scale = torch.zeros(rows, cols)
        for i in range(rows):
            for j in range(cols):
                scale[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max() / E4M3_MAX
        expanded = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:w.shape[0], :w.shape[1]]
    q = (w / expanded).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * expanded


def _fp8_checkpoint(directory, layout: str, strategy: str):
    """Rewrite a saved tiny model's linear weights in fp8; returns the dequantized state dict (the oracle's)."""
    tensors = load_file(directory / "model.safetensors")
    out, reference = {}, {}
    for name, w in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, scale, deq = _quantize(w.float(), strategy)
            out[name] = q
            out[name.removesuffix(".weight") + (".weight_scale" if layout == "compressed-tensors"
                                                else ".weight_scale_inv")] = scale
            if layout == "compressed-tensors":
                out[name.removesuffix(".weight") + ".input_scale"] = torch.ones(1)  # static activation scale
            reference[name] = deq
        else:
            out[name] = w
            reference[name] = w
    save_file(out, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if layout == "compressed-tensors":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy}
        if strategy == "block":
            weights["block_structure"] = [32, 32]
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": {"num_bits": 8, "type": "float", "dynamic": False,
                                                                "strategy": "tensor"}}}}
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         **({"weight_block_size": [32, 32]} if strategy == "block" else {})}
    (directory / "config.json").write_text(json.dumps(config))
    return reference


CASES = [("compressed-tensors", "tensor"), ("compressed-tensors", "channel"), ("compressed-tensors", "block"),
         ("fp8", "block"), ("fp8", "tensor")]


@pytest.mark.parametrize("layout, strategy", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_an_fp8_checkpoint_gives_the_dequantized_models_tokens(tmp_path, layout, strategy) -> None:
    # 96 rows and 80 columns: blocks of 32 do not divide every matrix evenly
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2, tie_word_embeddings=False)
    directory = save_tiny_model(tmp_path, config)
    reference_weights = _fp8_checkpoint(directory, layout, strategy)
    oracle = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    oracle.load_state_dict(reference_weights)
    oracle.generation_config.eos_token_id = None
    prompts = [[1 + (5 * i + j) % 127 for i in range(n)] for j, n in enumerate((3, 17, 40))]  # no pad id 0
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(str(directory), dtype="float32", quantization=None, kv_cache_dtype="float32",
             kv_cache_memory="16MiB", tensor_parallel_size=1, progress=False) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            expected = oracle.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


def test_a_tensor_parallel_rank_reads_its_slice_of_the_block_scales() -> None:
    class Dense:
        def __init__(self, t):
            self.t, self.shape = t, tuple(t.shape)

        def read(self, dtype, rows=None, cols=None):
            r, c = slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None)
            return (self.t[r, c] if self.t.dim() == 2 else self.t[r]).to(dtype)

    torch.manual_seed(0)
    w = torch.randn(96, 80)
    q, scale, deq = _quantize(w, "block")
    source = FP8Source(Dense(q), Dense(scale), (32, 32))
    for rows, cols in [((0, 96), (0, 80)), ((48, 96), None), (None, (40, 80)), ((13, 61), (7, 77))]:
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        assert torch.equal(source.read(torch.float32, rows, cols), deq[r, c])


@pytest.mark.parametrize("config, message", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "'gptq' of this checkpoint is not supported"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "int", "strategy": "channel"}}}}}, "fp8 \\(float, 8-bit\\) weights only"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8},
                              "config_groups": {}}}, "quantized KV-cache scheme"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "only e4m3"),
])
def test_other_quantizations_are_refused_with_a_reason(config, message) -> None:
    with pytest.raises(ValueError, match=message):
        fp8_scheme(config)
    assert fp8_scheme({}) is None
