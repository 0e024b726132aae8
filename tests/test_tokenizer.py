"""Tokenizer vs transformers (the oracle) on the default model's GGUF, on an HF directory, and on Gemma 3's
SentencePiece-style GGUF vocabulary (when pulled)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from pagoda.loader.gguf_file import GGUFFile
from pagoda.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "Café naïve résumé façade Ångström",
    "日本語のテキストです。中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 and ZWJ sequences 👩‍👩‍👧‍👦 🏳️‍🌈",
    "def f(x):\n\tif x:\n\t\treturn x  # comment\n    else:\n        pass\n",
    "a    b\t\tc\n\n\nd\r\n e \n \n  ",
    "   ",
    "\n",
    "\n\n\n\n",
    "\t",
    "12345 3.14159 1,000,000 2024-01-01 x1y22z333",
    " 123 4567 89",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos><eos>",
    "<think>reason</think> answer",
    "I'm sure they'll say we've done it, didn't we? I'D SAY YOU'RE",
    "URL: https://example.com/a?b=c&d=e#f",
    "Mixed: Ελληνικά русский عربى עברית हिन्दी ไทย",
    "\u00a0nbsp\u2009thin\u3000ideographic",
    "a\u0301 combining; \ufb01 ligature",
    "<html><body><table><tr><td>x</td></tr></table></body></html>",
    "\u2581literal\u2581marker and \u0120byte-level marker",
    "lots of !!!??? ... --- ___ *** ```python```",
]
# Numerals outside ASCII after a space: SmolLM2 splits every \p{N} character off (its tokenizer.json has
# Digits(individual_digits=True), llama.cpp's "smollm" pre-tokenizer splits \p{N}); transformers' GGUF loader
# has no "smollm" entry and keeps the space attached (" ½" instead of " ", "½").
NUMERAL_TEXTS = ["Arabic-Indic ٣٤٥ and \u0661\u0662", "fractions ½ ¾ and powers x² y³", "roman Ⅻ ⅷ 10½"]


@pytest.fixture(scope="module")
def smol_metadata(smollm_gguf):
    return GGUFFile(smollm_gguf).metadata


@pytest.fixture(scope="module")
def smol(smol_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_metadata)


@pytest.fixture(scope="module")
def smol_ref(smollm_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def smol_ref_digits(smol_ref) -> HFTokenizer:
    """transformers' SmolLM2 tokenizer with the text split of the model's own tokenizer.json."""
    fixed = HFTokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return fixed


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE, pre="smollm")


@pytest.mark.parametrize("add_special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_smol_ids_match_transformers(smol, smol_ref, text, add_special):
    assert smol.encode(text, add_special_tokens=add_special) == smol_ref(text, add_special_tokens=add_special)[
        "input_ids"
    ]


@pytest.mark.parametrize("text", TEXTS + NUMERAL_TEXTS)
def test_smol_ids_match_models_own_digit_split(smol, smol_ref_digits, text):
    assert smol.encode(text) == smol_ref_digits.encode(text).ids


def test_smol_numerals_are_split_like_llama_cpp(smol):
    space, half = smol.token_to_id("\u0120"), smol.encode("½", add_special_tokens=False)
    assert smol.encode(" ½", add_special_tokens=False) == [space, *half]


@pytest.mark.parametrize("text", TEXTS + NUMERAL_TEXTS)
def test_smol_decode_matches_transformers_and_round_trips(smol, smol_ref, text):
    ids = smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    for skip in (True, False):
        assert smol.decode(ids, skip_special_tokens=skip) == smol_ref.decode(ids, skip_special_tokens=skip)


def test_smol_special_tokens(smol, smol_ref, smol_metadata):
    assert smol.vocab_size == len(smol_ref) == 49152
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert smol.eos_token_ids == frozenset({2})
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert set(smol_ref.all_special_ids) <= set(smol.all_special_ids)
    assert set(smol.all_special_ids) == set(range(17))  # the 17 CONTROL tokens of the file
    assert smol.id_to_token(1) == "<|im_start|>" and smol.token_to_id("<|im_end|>") == 2
    assert smol.chat_template == smol_metadata["tokenizer.chat_template"]
    assert smol.hf_tokenizer.get_vocab_size() == 49152
    # add_bos_token is False in this file: nothing is added.
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)


def test_special_tokens_in_text_are_single_ids(smol):
    assert smol.encode("<|im_start|>user<|im_end|>") == [1, smol.encode("user")[0], 2]
    assert smol.decode([1, 9519, 2]) == smol.decode([9519])


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_warning(smol_metadata, smol, caplog):
    meta = dict(smol_metadata, **{"tokenizer.ggml.pre": "no-such-pre"})
    with caplog.at_level(logging.WARNING, logger="pagoda.tokenizer.split_regex"):
        tok = Tokenizer.from_gguf_metadata(meta)
    assert "no-such-pre" in caplog.text
    assert tok.encode("Hello world") == smol.encode("Hello world")


def test_add_bos_and_eos_flags(smol_metadata):
    meta = dict(smol_metadata, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    body = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [1, *body, 2]


def test_declared_eot_and_caller_eos_join_eos_ids(smol_metadata):
    tok = Tokenizer.from_gguf_metadata(dict(smol_metadata, **{"tokenizer.ggml.eot_token_id": 0}), [5, 10**9])
    assert tok.eos_token_ids == frozenset({2, 0, 5})  # out-of-vocabulary ids are dropped
    assert tok.eos_token_id == 2


def test_no_chat_template_is_a_clear_error(smol_metadata):
    meta = {k: v for k, v in smol_metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- SentencePiece-style ("llama") without a file


def sentencepiece_metadata() -> dict:
    """A tiny SentencePiece-style ("llama") vocabulary: byte fallback, ▁ for spaces, leading space added and
    stripped again on decode (Metaspace + Strip: the case where decoding a window can differ from the whole)."""
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyzHTé", "\u2581t", "\u2581h", "\u2581he", "he", "ll", "lo", "llo",
              "\u2581the", "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world", "日", "本"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def test_sentencepiece_vocab_matches_transformers_conversion():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = sentencepiece_metadata()
    names = GGUF_TOKENIZER_MAPPING["tokenizer"]
    ref, _ = convert_gguf_tokenizer("llama", {n: meta[f"tokenizer.{k}"] for k, n in names.items()
                                              if f"tokenizer.{k}" in meta})
    tok = Tokenizer.from_gguf_metadata(meta)
    for text in ["hello world", " hello  world", "the world 日本 😀", "Hello", "", "  ", "héllo\nworld", "<s>x</s>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids) and tok.decode(ids, False) == ref.decode(ids, False)
    assert tok.encode("hello")[0] == 1  # "llama" vocabularies add BOS unless the file says otherwise
    assert tok.decode(tok.encode("hello world")) == "hello world"  # the added leading space is stripped again


# ---------------------------------------------------------------- Hugging Face directory

HF_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _write_hf_dir(ref, directory: Path, config_updates: dict, jinja: str | None) -> None:
    ref.save_pretrained(str(directory))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(config_updates)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))


def test_hf_dir_matches_transformers(smol_ref, tmp_path):
    from transformers import AutoTokenizer

    _write_hf_dir(smol_ref, tmp_path, {"chat_template": HF_TEMPLATE}, jinja=None)
    tok, ref = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + NUMERAL_TEXTS:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == ref(text, add_special_tokens=add)["input_ids"]
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({2, 0})
    assert (tok.bos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, len(ref))
    assert tok.chat_template == HF_TEMPLATE == ref.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


def test_hf_dir_template_sources_and_bos_flag(smol_ref, tmp_path):
    from transformers import AutoTokenizer

    named = [{"name": "default", "template": "DEFAULT"}, {"name": "tool_use", "template": "TOOLS"}]
    _write_hf_dir(smol_ref, tmp_path, {"chat_template": named, "add_bos_token": True}, jinja=None)
    tok, ref = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == "DEFAULT" and tok.chat_templates["tool_use"] == "TOOLS"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[]) == "TOOLS"
    # tokenizer.json decides BOS; transformers 5 ignores the config's add_bos_token flag, and so do we
    assert tok.encode("Hello") == ref("Hello")["input_ids"] == tok.encode("Hello", add_special_tokens=False)

    _write_hf_dir(smol_ref, tmp_path, {"chat_template": named}, jinja="FROM JINJA FILE")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "FROM JINJA FILE"


def test_hf_dir_special_tokens_map_and_missing_tokenizer_json(smol_ref, tmp_path):
    _write_hf_dir(smol_ref, tmp_path, {}, jinja=None)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_id == 0 and tok.eos_token_ids == frozenset({0, 2})
    assert tok.chat_template is None
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------- Gemma 3 (SentencePiece-style BPE, "llama")


@pytest.fixture(scope="module")
def gemma(gemma_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(gemma_gguf).metadata)


@pytest.fixture(scope="module")
def gemma_ref(gemma_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)


def test_gemma_ids_and_decode_match_transformers(gemma, gemma_ref):
    for text in TEXTS + NUMERAL_TEXTS + ["   three", "a  b   c    d", "x" * 300, "word " * 100]:
        for add in (True, False):
            assert gemma.encode(text, add_special_tokens=add) == gemma_ref(text, add_special_tokens=add)[
                "input_ids"
            ], (text, add)
        ids = gemma.encode(text)
        for skip in (True, False):
            assert gemma.decode(ids, skip_special_tokens=skip) == gemma_ref.decode(ids, skip_special_tokens=skip)


def test_gemma_special_tokens(gemma, gemma_ref):
    assert gemma.vocab_size == len(gemma_ref) == 262144
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id, gemma.unk_token_id) == (2, 1, 0, 3)
    assert gemma.eos_token_ids == frozenset({1})  # the file declares no end-of-turn id; none is invented
    assert gemma.encode("")[0] == 2 and gemma.encode("", add_special_tokens=False) == []
    assert set(gemma_ref.all_special_ids) <= set(gemma.all_special_ids)
    # multi-space tokens are stored with real spaces in the file and must still be used
    assert gemma.encode("  two", add_special_tokens=False)[0] == 138
    assert gemma.encode("<start_of_turn>user\n", add_special_tokens=False)[0] == 105


# ---------------------------------------------------------------- random text

PIECES = [*"abcXYZ  \t\n\r0123456789'.,!?-_<>|/", "é", "ß", "日", "本", "😀", "👍🏽", "\u200d", "½", "٣", "\u2581",
          "\u0120", "\u00a0", "ꙮ", "𓀀", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<eos>", "<bos>", "'s", "'LL",
          " the", "\n\n", "  ", "\t\t", "<table>", "ſ", "\u212a"]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40))) for _ in range(n)]


def test_random_text_smol(smol, smol_ref, smol_ref_digits):
    for text in _random_texts(400, seed=1):
        ids = smol.encode(text)
        assert ids == smol_ref_digits.encode(text).ids, text
        assert smol.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)


def test_random_text_gemma(gemma, gemma_ref):
    for text in _random_texts(400, seed=2):
        ids = gemma.encode(text)
        assert ids == gemma_ref(text)["input_ids"], text
        for skip in (True, False):
            assert gemma.decode(ids, skip_special_tokens=skip) == gemma_ref.decode(ids, skip_special_tokens=skip)


def test_encode_bounded_refuses_by_count(smol):
    from pagoda.tokenizer.tokenizer import TooManyTokensError

    text = "The quick brown fox jumps over the lazy dog. " * 50
    ids = smol.encode(text)
    assert smol.encode_bounded(text, max_tokens=len(ids)) == ids
    with pytest.raises(TooManyTokensError) as info:
        smol.encode_bounded(text, max_tokens=len(ids) - 1)
    assert info.value.count == len(ids)
