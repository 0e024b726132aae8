"""Tiny random-weight models saved as Hugging Face directories with a word-level tokenizer ("t0" ... "tN"), so a
full engine (LLM, `pagoda serve`) can load them: for tests that need an engine but no real vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_model(directory: Path, config, seed: int = 0) -> Path:
    """A random model of `config` (a transformers config) and its tokenizer, in `directory`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{config.vocab_size - 1}"}))
    return directory
