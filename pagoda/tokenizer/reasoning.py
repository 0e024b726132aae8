"""Reasoning output of hybrid-thinking models (Qwen3 style): `<think>…</think>` split from the answer.

Owns three decisions: which parser a server uses (`--reasoning-parser`: qwen3, none, or auto = detected from the
chat template), where one request's generation starts (outside a think block, inside one the prompt opened, or
with reasoning off), and the incremental splitter that turns one sample's text deltas into (reasoning, content)
deltas.

The rules (those of vLLM's qwen3 parser, except that the start is read from the rendered prompt, not guessed):
- Outside: the output opens a think block only if it begins with the start tag (leading whitespace before the tag
  is dropped); otherwise every character is content, byte for byte, tags or not.
- Inside (the prompt ends in an unclosed start tag, as thinking-only templates do): the output is reasoning
  until the end tag; a repeated start tag at its very beginning is dropped.
- Off (`enable_thinking: false`, or the prompt already closed this turn's think block, as Qwen3's template does
  when thinking is disabled): nothing is parsed; all text is content.
- A think block ends at the first end tag; everything after it is content, verbatim. A block that never closes
  (e.g. cut by max_tokens) leaves all its text as reasoning.

Invariant of ThinkSplitter: however the text is cut into deltas, the concatenated reasoning and content deltas
(after `flush()`) are the same, and equal `split()` on the whole text. Only a possible prefix of a tag is held back.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

REASONING_PARSER_CHOICES = ("auto", "qwen3", "none")


class ReasoningStart(enum.Enum):
    OUTSIDE = "outside"  # the output may open a think block with its first characters
    INSIDE = "inside"  # the prompt opened a think block: the output is reasoning until the end tag
    OFF = "off"  # reasoning is off for this request: all text is content


@dataclass(frozen=True)
class ReasoningSplit:
    """A whole output, split. `reasoning` is None when the output had no think block."""

    reasoning: str | None
    content: str


@dataclass(frozen=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    start_tag: str
    end_tag: str

    def start_of(self, prompt: str, enable_thinking: object = None) -> ReasoningStart:
        """Where generation after `prompt` (the rendered chat prompt) starts. Only an explicit
        `enable_thinking=False` turns reasoning off by itself; templates treat anything else as "on"."""
        if enable_thinking is False:
            return ReasoningStart.OFF
        last_start, last_end = prompt.rfind(self.start_tag), prompt.rfind(self.end_tag)
        if last_start > last_end:
            return ReasoningStart.INSIDE
        if last_end >= 0 and not prompt[last_end + len(self.end_tag):].strip():
            return ReasoningStart.OFF  # the template closed this turn's (empty) think block
        return ReasoningStart.OUTSIDE

    def splitter(self, start: ReasoningStart) -> ThinkSplitter:
        return ThinkSplitter(self.start_tag, self.end_tag, start)

    def split(self, text: str, start: ReasoningStart) -> ReasoningSplit:
        splitter = self.splitter(start)
        splitter.feed(text)
        splitter.flush()
        return ReasoningSplit(splitter.reasoning, splitter.content)


QWEN3 = ReasoningParser("qwen3", "<think>", "</think>")
_PARSERS = {"qwen3": QWEN3}

# A template that writes or reads think blocks, or switches thinking on and off, belongs to a thinking model.
_THINKING_TEMPLATE = re.compile(r"</?think>|enable_thinking")


def resolve_reasoning_parser(name: str, chat_template: str | None) -> tuple[ReasoningParser | None, str]:
    """The parser for `--reasoning-parser name` and the model's chat template, with the reason (for the log)."""
    if name not in REASONING_PARSER_CHOICES:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSER_CHOICES)}")
    if name == "none":
        return None, "--reasoning-parser none"
    if name != "auto":
        return _PARSERS[name], f"--reasoning-parser {name}"
    match = _THINKING_TEMPLATE.search(chat_template or "")
    if match is None:
        return None, "auto: the chat template has no think tags or enable_thinking"
    return QWEN3, f"auto: the chat template mentions {match.group(0)}"


class _Phase(enum.Enum):
    OPENING = 0  # before the first non-whitespace text: is it a start tag?
    REASONING = 1
    CONTENT = 2


class ThinkSplitter:
    """Splits one sample's streamed text. `reasoning` and `content` hold everything emitted so far."""

    def __init__(self, start_tag: str, end_tag: str, start: ReasoningStart):
        self.start_tag, self.end_tag = start_tag, end_tag
        self._inside = start is ReasoningStart.INSIDE
        self._phase = _Phase.CONTENT if start is ReasoningStart.OFF else _Phase.OPENING
        self._held = ""  # invariant: only a possible start of a tag (OPENING: whitespace + a start-tag prefix)
        self.reasoning: str | None = "" if self._inside else None
        self.content = ""

    def feed(self, delta: str) -> ReasoningDelta:
        """The reasoning and content this delta completes."""
        buf, self._held = self._held + delta, ""
        reasoning = content = ""
        while buf:
            if self._phase is _Phase.OPENING:
                stripped = buf.lstrip()
                if stripped.startswith(self.start_tag):
                    buf = stripped[len(self.start_tag):]
                    self._enter_reasoning()
                elif self.start_tag.startswith(stripped):  # only whitespace, or part of a start tag, so far
                    self._held = buf
                    break
                elif self._inside:
                    self._enter_reasoning()
                else:
                    self._phase = _Phase.CONTENT
            elif self._phase is _Phase.REASONING:
                end = buf.find(self.end_tag)
                if end >= 0:
                    reasoning += buf[:end]
                    buf = buf[end + len(self.end_tag):]
                    self._phase = _Phase.CONTENT
                else:
                    keep = _partial_tag_suffix(buf, self.end_tag)
                    reasoning += buf[:len(buf) - keep]
                    self._held = buf[len(buf) - keep:]
                    break
            else:
                content += buf
                break
        return self._emit(reasoning, content)

    def flush(self) -> ReasoningDelta:
        """Held text, once the sample has ended: an unfinished tag is plain text of the phase it was held in."""
        held, self._held = self._held, ""
        if not held:
            return ReasoningDelta()
        if self._phase is _Phase.REASONING or (self._phase is _Phase.OPENING and self._inside):
            return self._emit(held, "")
        return self._emit("", held)

    def _enter_reasoning(self) -> None:
        self._phase = _Phase.REASONING
        if self.reasoning is None:
            self.reasoning = ""

    def _emit(self, reasoning: str, content: str) -> ReasoningDelta:
        if reasoning:
            self.reasoning = (self.reasoning or "") + reasoning
        self.content += content
        return ReasoningDelta(reasoning, content)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
