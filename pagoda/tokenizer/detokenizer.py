"""Streaming text for generated tokens: IncrementalDetokenizer (ids → text deltas) and StopStringMatcher
(text deltas → the part safe to emit, and whether a stop string ended generation).

Invariant of IncrementalDetokenizer: the concatenation of everything `push` returned, followed by `flush()`,
equals `tokenizer.decode(all pushed ids)`; and `push` never returns a U+FFFD that stands for an incomplete UTF-8
sequence (a character whose bytes are split over tokens is emitted once its last byte arrives).
"""

from __future__ import annotations

from pagoda.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Per-sequence decoding state, using the prefix-offset/read-offset method: each push decodes only the
    tokens of the last emitted chunk plus the new ones (O(window), not O(sequence)) and emits the difference.

    Why not tokenizers' DecodeStream: it emits a byte-fallback token (<0x41> → "A") as soon as it decodes,
    but decode() turns a whole run of byte tokens into U+FFFD when the run turns out invalid (<0x41><0xF0>a
    → "\ufffd\ufffda"), after which DecodeStream raises "Invalid prefix". Here a run of byte tokens is held
    until a non-byte token ends it (text before the run is emitted at once).

    Windows start right after an emitted chunk, so they never cut a character or a byte run; and the window's
    first tokens are decoded in both halves of the difference, so a decoder that strips the leading space of a
    sequence (SentencePiece) strips the same space in both.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._byte_ids = _byte_fallback_ids(tokenizer)
        # decode() drops these before its decoder runs, so they neither produce text nor end a byte run
        self._skipped = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window: the first token of the last emitted chunk
        self._read_offset = 0  # end of what has been emitted; tokens after it are pending
        self._emitted = 0  # characters returned so far; always a prefix of decode(token_ids)

    def push(self, token_ids: list[int]) -> str:
        """The new text these tokens complete ("" while a character is still incomplete)."""
        ids = self.token_ids
        ids.extend(token_ids)
        end = self._final_end()
        if end <= self._read_offset:
            return ""
        decode = self._tokenizer.hf_tokenizer.decode
        prefix = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
        text = decode(ids[self._prefix_offset : end], skip_special_tokens=self._skip)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or the text ends inside a character: wait for more bytes
        if text.startswith(prefix):
            delta = text[len(prefix) :]
        else:  # a decoder that is not local over this window (never seen): diff against a full decode
            delta = self._tokenizer.decode(ids[:end], skip_special_tokens=self._skip)[self._emitted :]
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._emitted += len(delta)
        return delta

    def flush(self) -> str:
        """Text still held back when the sequence ends (an incomplete character decodes to U+FFFD, as in
        decode()). Call once, when generation stops."""
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=self._skip)
        rest = full[self._emitted :]
        self._emitted = len(full)
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return rest

    def _final_end(self) -> int:
        """End of the tokens whose text is final: all of them, unless they end in an open run of byte tokens
        (possibly with skipped specials inside it, which decode() removes before joining the bytes)."""
        ids, j = self.token_ids, len(self.token_ids)
        if not self._byte_ids:
            return j
        while j > self._read_offset and (ids[j - 1] in self._byte_ids or ids[j - 1] in self._skipped):
            j -= 1
        return j if any(i in self._byte_ids for i in ids[j:]) else len(ids)

    @property
    def text_length(self) -> int:
        """Characters emitted so far."""
        return self._emitted


def _byte_fallback_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of <0xNN> tokens if the decoder turns them into bytes (SentencePiece byte fallback), else empty."""
    hf = tokenizer.hf_tokenizer
    if "ByteFallback" not in repr(hf.decoder):
        return frozenset()
    ids = (hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class StopStringMatcher:
    """Finds stop strings in streamed text. Text that might be the start of a stop string is held back until
    the following deltas decide; once a stop string is found, `feed` returns the text before it (or through it,
    with include_stop_str_in_output) and `stopped` turns True. When several stop strings occur, the one completed
    first in the text wins (then the longer one): the result never depends on how the text was split in deltas."""

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        self.stops = [s for s in dict.fromkeys(stops) if s]  # an empty stop string would match everywhere
        self.include = include_stop_str_in_output
        self.matched: str | None = None
        self.stopped = False
        self._held = ""  # invariant: never contains a whole stop string; only a possible start of one
        self._hold_max = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached). Nothing is emitted after a stop."""
        if self.stopped:
            return "", True
        buf = self._held + delta
        hit = self._earliest(buf)
        if hit is not None:
            start, stop = hit
            self.matched, self.stopped, self._held = stop, True, ""
            return buf[: start + len(stop)] if self.include else buf[:start], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Held text, released when generation ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _earliest(self, buf: str) -> tuple[int, str] | None:
        found = [(i + len(s), i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if not found:
            return None
        _, start, stop = min(found)  # earliest end, then earliest start (the longer of two ending together)
        return start, stop

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(self._hold_max, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
