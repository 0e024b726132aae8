"""pagoda.loader.dequant against gguf's numpy reference (gguf.quants.dequantize), bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from pagoda.loader.dequant import SUPPORTED_TYPES, dequantize
from pagoda.loader.gguf_file import GGUFFile

# Byte offsets of the float16 scale fields in one block of each type (GGML block layouts).
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
BLOCK_TYPES = sorted(F16_FIELDS, key=lambda t: t.name)
QUANTIZABLE = [t for t in BLOCK_TYPES if t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)]  # gguf.quants can make


def reference(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.array(quants.dequantize(data, qtype), dtype=np.float32).reshape(shape))


def assert_same(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> None:
    ours = dequantize(data, qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, reference(data, qtype, shape))


def random_blocks(rng: np.random.Generator, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes in every bit field, with finite float16 values in the scale fields."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def test_supported_types() -> None:
    expected = {T.F32, T.F16, T.BF16, *F16_FIELDS}
    assert SUPPORTED_TYPES == expected


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 768)], ids=str)
def test_random_bits_match_reference(qtype: T, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(int(qtype))
    assert_same(random_blocks(rng, qtype, shape), qtype, shape)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_weights_match_reference(qtype: T) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 256)).astype(np.float32)
    weights[0] = 0.0  # all-zero blocks: zero scales
    data = quants.quantize(weights, qtype)
    assert_same(data, qtype, weights.shape)
    ours = dequantize(data, qtype, weights.shape)
    assert (ours - torch.from_numpy(weights)).abs().max() < 0.5  # and it is a dequantization of `weights`


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_reference(qtype: T) -> None:
    values = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    assert_same(quants.quantize(values, qtype), qtype, values.shape)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_every_16_bit_pattern(qtype: T) -> None:
    """All 65536 inputs. Same bits, except that F16 signalling NaNs come back quieted (still NaN)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    data = bits.view(np.float16) if qtype == T.F16 else bits.view(np.uint8).reshape(1, -1)  # as GGUFReader gives
    ours = dequantize(data, qtype, (1 << 16,))
    ref = reference(data, qtype, (1 << 16,))
    differ = ours.view(torch.int32) != ref.view(torch.int32)
    assert torch.isnan(ours[differ]).all() and torch.isnan(ref[differ]).all()
    assert differ.sum() == (1022 if qtype == T.F16 else 0)


def test_result_owns_its_memory() -> None:
    data = np.arange(8, dtype=np.float32)
    out = dequantize(data, T.F32, (2, 4))
    out.zero_()
    assert data[3] == 3.0


def test_unsupported_type_raises() -> None:
    data = np.zeros((1, GGML_QUANT_SIZES[T.IQ2_XXS][1]), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"IQ2_XXS.*supported types: .*Q4_K"):
        dequantize(data, T.IQ2_XXS, (256,))


def test_wrong_size_raises() -> None:
    data = random_blocks(np.random.default_rng(2), T.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(data, T.Q4_0, (2, 96))
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(data, T.Q4_0, (8, 16))  # rows must be whole blocks


def test_real_model_tensors_match_reference(smollm_gguf) -> None:
    tensors = GGUFFile(smollm_gguf).tensors()
    by_type: dict[T, list] = {}
    for t in tensors:
        by_type.setdefault(t.qtype, []).append(t)
    assert {T.Q4_1, T.Q8_0, T.F32} <= set(by_type)
    for group in by_type.values():
        picks = {0: group[0], 1: group[len(group) // 2], 2: group[-1]}.values()
        for t in picks:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. no "array is not writable" warning leaks out
                ours = dequantize(t.data, t.qtype, t.shape)
            assert ours.shape == t.shape, t.name
            assert torch.equal(ours, reference(t.data, t.qtype, t.shape)), t.name


def test_source_reads_slices_a_bounded_chunk_at_a_time(smollm_gguf, monkeypatch) -> None:
    """GGUFSource.read dequantizes READ_ELEMENTS values at a time into the result: the same values as one
    dequantization of the whole tensor, for a permuted q projection (chunks of whole heads), the Q8_0 table
    and a 1-D norm, whole and sliced."""
    from pagoda.loader import tensors as tensor_module
    from pagoda.loader.gguf_loader import config_from_gguf, gguf_tensors

    gguf = GGUFFile(smollm_gguf)
    sources = dict(gguf_tensors(gguf, config_from_gguf(gguf)))
    names = ["model.layers.3.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]
    whole = {name: sources[name].read(torch.float32) for name in names}
    q = whole[names[0]]
    assert sources[names[0]].head_rows == 64
    monkeypatch.setattr(tensor_module, "READ_ELEMENTS", 5000)  # the q projection: one head of 64 rows per chunk
    for name in names:
        assert torch.equal(sources[name].read(torch.float32), whole[name]), name
    assert torch.equal(sources[names[0]].read(torch.float32, (64, 320), (32, 96)), q[64:320, 32:96])
    table = sources[names[1]]
    assert torch.equal(table.read(torch.float16, (1000, 1037)), whole[names[1]][1000:1037].half())
