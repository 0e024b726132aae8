"""Pre-tokenizer split patterns for byte-level BPE vocabularies, keyed by GGUF's `tokenizer.ggml.pre`.

A byte-level BPE vocabulary only reproduces its training-time tokens if text is cut into words the same way
it was cut during training. GGUF files name that way (`tokenizer.ggml.pre`) instead of storing it; this module
owns the name → pattern table, following llama.cpp's `llama-vocab.cpp` (the reference for what a GGUF means).

Each entry is a list of regexes applied in order, each as an "isolated" split (matches become pieces of their
own, the rest stays in between), exactly as llama.cpp's `regex_exprs` lists are applied.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# GPT-2's pattern, as tokenizers' ByteLevel(use_regex=True) spells it. llama.cpp omits the final `|\s+`,
# but its hand-written matcher for this pattern behaves as if it were there.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Same as LLAMA3 except digits are split one by one.
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Every digit becomes its own piece first, then GPT-2's pattern runs on what remains
# (the HF tokenizers of these models use Digits(individual_digits=True) + ByteLevel, which is the same).
DIGITS_THEN_GPT2 = [r"\p{N}", GPT2]

SPLITS: dict[str, list[str]] = {
    "default": [GPT2],
    "gpt2": [GPT2],
    "smollm": DIGITS_THEN_GPT2,
    "starcoder": DIGITS_THEN_GPT2,
    "refact": DIGITS_THEN_GPT2,
    "command-r": DIGITS_THEN_GPT2,
    "codeshell": DIGITS_THEN_GPT2,
    "exaone": DIGITS_THEN_GPT2,
    "minerva-7b": DIGITS_THEN_GPT2,
    "llama3": [LLAMA3],
    "llama-v3": [LLAMA3],
    "llama-bpe": [LLAMA3],
    "falcon3": [LLAMA3],
    "smaug-bpe": [LLAMA3],
    "dbrx": [LLAMA3],
    "qwen2": [QWEN2],
    "deepseek-r1-qwen": [QWEN2],
    "megrez": [QWEN2],
}


def split_patterns(pre: str | None) -> list[str]:
    """The regexes for a `tokenizer.ggml.pre` value; GPT-2's (with a warning) for a name we do not know."""
    if pre is None:
        return [GPT2]
    patterns = SPLITS.get(pre)
    if patterns is None:
        logger.warning(
            "GGUF tokenizer.ggml.pre=%r is not known to pagoda; splitting text with the GPT-2 pattern, "
            "which may give token ids different from llama.cpp's for this model.",
            pre,
        )
        return [GPT2]
    return patterns
