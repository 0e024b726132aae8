"""IncrementalDetokenizer (streamed text == full decode, no premature U+FFFD) and StopStringMatcher."""

from __future__ import annotations

import random

import pytest
from test_tokenizer import sentencepiece_metadata

from pagoda.loader.gguf_file import GGUFFile
from pagoda.tokenizer.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pagoda.tokenizer.tokenizer import Tokenizer

SAMPLES = [
    "Hello world, this is a test.",
    "emoji 😀🎉👍🏽 ZWJ 👩‍👩‍👧‍👦 flag 🏳️‍🌈",
    "日本語のテキスト、中文文本，한국어",
    "  spaced\tout\n\n  lines  ",
    "Café naïve — “quotes” ½",
    "<|im_start|>assistant\nhi<|im_end|>",
    "<start_of_turn>model\nok<end_of_turn>",
]


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(smollm_gguf).metadata)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(sentencepiece_metadata())


@pytest.fixture(scope="module")
def gemma(gemma_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(gemma_gguf).metadata)


@pytest.fixture(params=["smol", "spm", "gemma"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _stream(tok: Tokenizer, ids: list[int], skip: bool, rng: random.Random) -> tuple[list[str], str]:
    detok, pieces, i = IncrementalDetokenizer(tok, skip_special_tokens=skip), [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    return pieces, detok.flush()


def _assert_no_premature_replacement(pieces: list[str], full: str) -> None:
    """Every emitted prefix is a prefix of the full decode: no U+FFFD stood in for a character still arriving."""
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert full.startswith(emitted), (emitted, full)


def test_sentencepiece_fixture_strips_leading_space(spm):
    ids = spm.encode("hello world", add_special_tokens=False)
    assert spm.id_to_token(ids[0]) == "\u2581hello" and spm.decode(ids) == "hello world"
    assert spm.encode("hello")[0] == 1  # "llama" vocabularies add BOS by default


def test_streamed_text_equals_full_decode(tok):
    rng = random.Random(1234)
    specials = tok.all_special_ids[:20]
    for trial in range(300):
        if trial % 3 == 0:  # arbitrary ids: partial byte sequences, lone continuation bytes, specials
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        else:
            ids = tok.encode(rng.choice(SAMPLES) + rng.choice(SAMPLES), add_special_tokens=rng.random() < 0.5)
            for _ in range(rng.randrange(3) if trial % 3 == 2 else 0):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        for skip in (True, False):
            full = tok.decode(ids, skip_special_tokens=skip)
            pieces, tail = _stream(tok, ids, skip, rng)
            assert "".join(pieces) + tail == full, (ids, skip)
            _assert_no_premature_replacement(pieces, full)


@pytest.mark.parametrize("text", ["👩‍👩‍👧‍👦", "日本語", "x🏳️‍🌈y", "é😀", "ꙮ 𓀀 end"])
def test_multibyte_characters_split_across_tokens(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids]
    # a trailing run of byte-fallback tokens is only final once the sequence ends (or a normal token follows)
    assert "".join(pieces) + detok.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    if any("\ufffd" in tok.decode([i]) for i in ids):  # some token holds only part of a character
        assert "" in pieces


def test_byte_fallback_run_released_by_next_token(spm):
    emoji = spm.encode("😀", add_special_tokens=False)  # not in the vocabulary: byte fallback
    assert [spm.id_to_token(i) for i in emoji] == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detok = IncrementalDetokenizer(spm)
    ids = [spm.token_to_id("a"), *emoji, spm.token_to_id("a")]
    assert [detok.push([i]) for i in ids] == ["a", " ", "", "", "", "", "😀a"] and spm.decode(ids) == "a 😀a"


def test_emoji_bytes_one_at_a_time_smol(smol):
    ids = smol.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's 4 bytes are split over tokens in this vocabulary
    detok = IncrementalDetokenizer(smol)
    assert [detok.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "😀"


def test_incomplete_character_at_end_is_flushed_as_replacement(spm):
    first_byte = spm.token_to_id("<0xF0>")  # first byte of a 4-byte character
    detok = IncrementalDetokenizer(spm)
    assert detok.push([spm.token_to_id("\u2581hello"), first_byte]) == "hello"
    assert detok.flush() == spm.decode([spm.token_to_id("\u2581hello"), first_byte])[len("hello"):] == "\ufffd"


def test_invalid_byte_is_emitted_once_followed(spm):
    stray, a = spm.token_to_id("<0x80>"), spm.token_to_id("a")  # a lone continuation byte can never complete
    detok = IncrementalDetokenizer(spm)
    assert detok.push([stray]) == ""  # undecidable yet: held, not emitted as U+FFFD
    assert detok.push([a]) == "\ufffda" == spm.decode([stray, a])


def test_skip_special_tokens(smol, spm):
    hi = smol.encode("Hi", add_special_tokens=False)
    for skip, expected in ((True, "Hi"), (False, "<|im_start|>Hi<|im_end|>")):
        detok = IncrementalDetokenizer(smol, skip_special_tokens=skip)
        assert detok.push([1]) + detok.push(hi) + detok.push([2]) == expected
    # SentencePiece: a skipped special token first must not change which space gets stripped
    world = spm.token_to_id("\u2581world")
    for ids in ([1, world, world], [world, 1, world], [world, 2, 2, world]):
        detok = IncrementalDetokenizer(spm)
        assert "".join(detok.push([i]) for i in ids) == spm.decode(ids)


# ---------------------------------------------------------------- StopStringMatcher


def test_stop_string_spanning_deltas():
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("OP and more") == ("", True)
    assert m.matched == "STOP" and m.stopped
    assert m.feed("ignored") == ("", True) and m.flush() == ""


def test_partial_prefix_held_then_released():
    m = StopStringMatcher(["</answer>"], include_stop_str_in_output=False)
    assert m.feed("x </ans") == ("x ", False)
    assert m.feed("wer") == ("", False)
    assert m.feed("s are") == ("</answers are", False)
    assert m.matched is None and not m.stopped


def test_include_stop_str_in_output():
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("OP tail") == ("STOP", True)


def test_multiple_stop_strings_first_completed_wins():
    m = StopStringMatcher(["world", "lo w"], include_stop_str_in_output=False)
    assert m.feed("hello world") == ("hel", True) and m.matched == "lo w"
    m = StopStringMatcher(["abcd", "bc"], include_stop_str_in_output=True)
    assert m.feed("xabcd") == ("xabc", True) and m.matched == "bc"  # "bc" is complete before "abcd" is


def test_flush_releases_held_text():
    m = StopStringMatcher(["<|end|>"], include_stop_str_in_output=False)
    assert m.feed("answer <|e") == ("answer ", False)
    assert m.flush() == "<|e"
    assert StopStringMatcher([], False).feed("anything") == ("anything", False)


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, start, stop = min(hits)
    return text[:end] if include else text[:start], stop


def test_result_does_not_depend_on_delta_boundaries():
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        include = rng.random() < 0.5
        m, out, cut = StopStringMatcher(stops, include), "", 0
        while cut < len(text) and not m.stopped:
            step = rng.randrange(1, 5)
            emitted, _ = m.feed(text[cut : cut + step])
            out += emitted
            cut += step
        if not m.stopped:
            out += m.flush()
        assert (out, m.matched) == _reference_stop(text, stops, include), (text, stops, include)
