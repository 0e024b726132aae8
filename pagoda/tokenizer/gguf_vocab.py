"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file embeds (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF carries no tokenizer.json: only tokens, their types, scores or merges, and a few flags. This module owns
turning those into a working tokenizer whose ids equal the reference ones (transformers' GGUF loader, which
matches the models' own tokenizer.json files):

- `gpt2`: byte-level BPE. Tokens are already spelled in the byte alphabet; merges are in the file; the text
  split comes from `tokenizer.ggml.pre` (see split_regex.py).
- `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens). The file has scores but no merges, so
  merges are derived from the vocabulary. Gemma files need two fixes: multi-space tokens are respelled with
  "▁", and merges follow the file order instead of the scores (see `_gemma_bpe`).

Token types (llama.cpp's enum): CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens,
so both are matched whole in text instead of being cut into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from pagoda.tokenizer.split_regex import split_patterns

CONTROL = 3
USER_DEFINED = 4
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})


def build_gguf_tokenizer(metadata: dict) -> Tokenizer:
    """A ready tokenizer (model, text pipeline, added tokens, BOS/EOS post-processor) from GGUF metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    original: list[str] = metadata["tokenizer.ggml.tokens"]
    types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or ()
    if kind == "gpt2":
        tokens = _byte_level_spelling(original)
        tok = _byte_level_bpe(tokens, metadata)
    elif kind == "llama":
        if metadata.get("general.architecture") in GEMMA_ARCHITECTURES:
            tokens = _gemma_respell(original)
            tok = _gemma_bpe(tokens, metadata)
        else:
            tokens = original
            tok = _sentencepiece_bpe(tokens, metadata)
    else:
        raise ValueError(
            f"GGUF tokenizer type {kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' "
            "SentencePiece BPE). Use a GGUF of a model with one of those tokenizers, or its HF directory."
        )
    _add_typed_tokens(tok, original, frozenset(tokens), types, byte_level=(kind == "gpt2"))
    tok.post_processor = _bos_eos_processor(tokens, metadata, default_add_bos=(kind == "llama"))
    return tok


# ---------------------------------------------------------------- byte-level BPE (gpt2)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_bytes_to_unicode().values())


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    """Tokens as byte-level BPE expects them; the rare one stored as plain text is respelled byte by byte."""
    alphabet, table = _byte_alphabet(), _bytes_to_unicode()
    out = list(tokens)
    for i, t in enumerate(tokens):
        if not alphabet.issuperset(t):
            out[i] = "".join(table[b] for b in t.encode("utf-8"))
    return out


def _byte_level_bpe(tokens: list[str], metadata: dict) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" not in metadata:  # llama.cpp refuses such a file too
        raise ValueError("GGUF byte-level BPE vocabulary has no tokenizer.ggml.merges; the file is incomplete")
    # Byte-level tokens never contain a real space, so the first space separates the pair.
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    patterns = split_patterns(metadata.get("tokenizer.ggml.pre"))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------- SentencePiece-style BPE (llama)


def derive_merges(tokens: list[str], scores: Sequence[float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every way to cut a token into two tokens, best score first.

    Same order as transformers' `generate_merges(vocab, vocab_scores)`: by (score, len(left), len(right)),
    highest first, ties kept in vocabulary order. `scores=None` means the file order is the merge order
    (the first token is the best), which needs no sort: this is the hot path for Gemma's 262k tokens.
    """
    vocab = frozenset(tokens)
    if scores is None and len(vocab) == len(tokens):
        merges: list[tuple[str, str]] = []
        add = merges.append
        for t in tokens:
            for k in range(len(t) - 1, 0, -1):  # longest left piece first, as the (len(left), ...) key orders
                left = t[:k]
                if left in vocab:
                    right = t[k:]
                    if right in vocab:
                        add((left, right))
        return merges
    if scores is None:
        scores = range(0, -len(tokens), -1)
    best: dict[str, float] = {}
    for t, s in zip(tokens, scores):
        best[t] = s  # a duplicated token keeps its first place and its last score, like dict(zip(tokens, scores))
    scored = [
        (t[:k], t[k:], s)
        for t, s in best.items()
        for k in range(len(t) - 1, 0, -1)
        if t[:k] in vocab and t[k:] in vocab
    ]
    scored.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties stay in vocabulary order
    return [(left, right) for left, right, _ in scored]


def _gemma_respell(tokens: list[str]) -> list[str]:
    """Gemma files store multi-space tokens with real spaces ("  "); the normalizer produces "▁▁", so respell."""
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _gemma_bpe(tokens: list[str], metadata: dict) -> Tokenizer:
    # Gemma's scores do not follow its merge order; the order tokens appear in the file does.
    merges = derive_merges(tokens)
    tok = Tokenizer(_byte_fallback_bpe(tokens, merges, metadata))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece_bpe(tokens: list[str], metadata: dict) -> Tokenizer:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    tok = Tokenizer(_byte_fallback_bpe(tokens, derive_merges(tokens, scores), metadata))
    # llama.cpp's default for SentencePiece vocabularies is to add a space before the text.
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # undo the added space at the start of the decoded text
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _byte_fallback_bpe(tokens: list[str], merges: list[tuple[str, str]], metadata: dict) -> BPE:
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    vocab = {t: i for i, t in enumerate(tokens)}
    return BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)


# ---------------------------------------------------------------- added tokens and BOS/EOS


def _add_typed_tokens(
    tok: Tokenizer, original: list[str], vocab: frozenset[str], types: Sequence[int], byte_level: bool
) -> None:
    """Added tokens, chosen as transformers chooses them (by the file's own spelling of each token)."""
    alphabet = _byte_alphabet()
    # A byte-level control token spelled outside the byte alphabet is a llama.cpp mislabel; skipping it keeps
    # the vocabulary at the size the model's embedding expects.
    control = [t for t, ty in zip(original, types) if ty == CONTROL and (not byte_level or alphabet.issuperset(t))]
    # A user-defined token only stays whole if the model's vocabulary spells it as the file does (Gemma's
    # multi-space tokens, respelled with "▁", are left to the merges instead).
    user = [t for t, ty in zip(original, types) if ty == USER_DEFINED and t in vocab]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _bos_eos_processor(tokens: list[str], metadata: dict, default_add_bos: bool):
    """A post-processor adding BOS/EOS as the file asks (`add_bos_token`/`add_eos_token`), or None."""
    specials: list[tuple[str, int]] = []

    def wanted(flag: str, default: bool, id_key: str) -> str | None:
        token_id = metadata.get(id_key)
        if not metadata.get(flag, default) or token_id is None or not 0 <= token_id < len(tokens):
            return None
        specials.append((tokens[token_id], token_id))
        return tokens[token_id]

    bos = wanted("tokenizer.ggml.add_bos_token", default_add_bos, "tokenizer.ggml.bos_token_id")
    eos = wanted("tokenizer.ggml.add_eos_token", False, "tokenizer.ggml.eos_token_id")
    if not specials:
        return None

    def seq(type_id: int, piece: str) -> list[str]:
        return [*([f"{bos}:{type_id}"] if bos else []), f"{piece}:{type_id}", *([f"{eos}:{type_id}"] if eos else [])]

    single, pair = seq(0, "$A"), seq(0, "$A") + seq(1, "$B")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))
