"""GET /tokenizer_info: the served tokenizer's configuration, in the shape of vLLM's route (the keys of a
tokenizer_config.json). Clients such as lm-eval's `local-completions` (tokenizer_backend "remote", or "auto",
which probes this route) read it and then tokenize through /tokenize and /detokenize, so they need no copy of
the tokenizer from a model hub."""

from __future__ import annotations

from typing import Any

from pagoda.tokenizer.tokenizer import Tokenizer


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict[str, Any]:
    # What encode(..., add_special_tokens=True) adds, found by asking it (the tokenizer's post-processor
    # decides, whatever a config file says).
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a", add_special_tokens=True)
    extra = len(special) - len(plain)
    info: dict[str, Any] = {
        # The tokenizer is a Rust `tokenizers` one, as transformers' PreTrainedTokenizerFast wraps.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(tokenizer, tokenizer.bos_token_id),
        "eos_token": _token(tokenizer, tokenizer.eos_token_id),
        "pad_token": _token(tokenizer, tokenizer.pad_token_id),
        "unk_token": _token(tokenizer, tokenizer.unk_token_id),
        "add_bos_token": extra > 0 and special[0] == tokenizer.bos_token_id,
        "add_eos_token": extra > 0 and special[-1] == tokenizer.eos_token_id,
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.vocab_size,
    }
    if tokenizer.chat_template is not None:
        info["chat_template"] = tokenizer.chat_template
    return info


def _token(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tokenizer.id_to_token(token_id)
