"""Shared fixtures. Model files come from the model store (`pagoda pull`, run by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


def _store_home() -> Path:
    return Path(os.environ.get("PAGODA_HOME", Path.home() / ".cache" / "pagoda"))


def _pulled(name: str) -> Path:
    found = sorted((_store_home() / "models" / name).glob("*.gguf"))
    if not found:
        pytest.fail(f"model {name} missing: run `pagoda pull {name}` (make test does)")
    return found[0]


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path of the default model's GGUF file (SmolLM2-135M-Instruct, Q4_1: llama architecture, byte-level BPE)."""
    return _pulled(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma-3-270M, Q4_K_M: gemma3 architecture, SentencePiece-style vocabulary, base model."""
    return _pulled("gemma3-270m")


@pytest.fixture(scope="session")
def hf_model(smollm_gguf):
    """transformers' model and tokenizer on the same GGUF file: the correctness oracle (fp32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def llm(smollm_gguf):
    """One fp32 engine on the default model (fp32 weights and KV cache: the transformers oracle's numbers),
    shared by the tests (each leaves it idle, every block free)."""
    from pagoda import LLM

    return LLM(str(smollm_gguf), dtype="float32", quantization=None, kv_cache_dtype="float32",
               kv_cache_memory="256MiB", progress=False)


@pytest.fixture(scope="session")
def served_llm(smollm_gguf):
    """An offline engine configured like `server` (default precision: quantization "auto", i.e. the GGUF's own
    blocks, and an fp16 KV cache), to compare the server's outputs with."""
    from pagoda import LLM

    return LLM(str(smollm_gguf), kv_cache_memory="256MiB", progress=False)


API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def server(smollm_gguf, tmp_path_factory):
    """`pagoda serve` on the default model in a child process: API key API_KEY, served as "smol"."""
    from tests.servers import ServerProcess

    proc = ServerProcess(smollm_gguf, "--api-key", API_KEY, "--served-model-name", "smol",
                         "--kv-cache-memory", "512MiB", "--max-model-len", "2048",
                         log_dir=tmp_path_factory.mktemp("server")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A tiny random-weight Qwen3 with think tags whose greedy output follows scripts (tests/tiny_qwen3.py)."""
    from tests.tiny_qwen3 import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="session")
def qwen3_server(tiny_qwen3, tmp_path_factory):
    """`pagoda serve` on the tiny Qwen3 (no API key, reasoning parser detected from its chat template)."""
    from tests.servers import ServerProcess

    proc = ServerProcess(tiny_qwen3.directory, "--served-model-name", "tiny-qwen3", "--kv-cache-memory", "64MiB",
                         log_dir=tmp_path_factory.mktemp("qwen3-server")).start()
    yield proc
    proc.stop()
