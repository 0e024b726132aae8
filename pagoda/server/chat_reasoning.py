"""The reasoning split of one chat completion request: a whole message's reasoning and content, or the stream
deltas of each choice (one splitter per choice, so n > 1 samples never mix).

The split runs on the text the engine returns, i.e. after stop strings: a stop string found inside the
reasoning ends generation there, and the choice has reasoning and no content. Token logprobs are not split.
"""

from __future__ import annotations

from typing import Any

from pagoda.tokenizer.reasoning import ReasoningParser, ReasoningStart, ThinkSplitter


class ChatReasoning:
    def __init__(self, parser: ReasoningParser, start: ReasoningStart):
        self.parser = parser
        self.start = start
        self._splitters: dict[int, ThinkSplitter] = {}
        self._flushed: set[int] = set()

    def message(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) of a finished choice's text."""
        split = self.parser.split(text, self.start)
        return split.reasoning, split.content

    def delta(self, index: int, text: str, finished: bool) -> dict[str, Any]:
        """The stream delta for choice `index`'s new text ({} while everything is held back). Once `finished`,
        the held text is released; later calls return {}."""
        if index in self._flushed:
            return {}
        splitter = self._splitters.get(index)
        if splitter is None:
            splitter = self._splitters[index] = self.parser.splitter(self.start)
        reasoning, content = "", ""
        if text:
            part = splitter.feed(text)
            reasoning, content = part.reasoning, part.content
        if finished:
            self._flushed.add(index)
            part = splitter.flush()
            reasoning, content = reasoning + part.reasoning, content + part.content
        return reasoning_delta(reasoning, content)


def reasoning_delta(reasoning: str, content: str) -> dict[str, Any]:
    """A chat delta: vLLM's two names for the reasoning (`reasoning_content`, and the newer `reasoning`)."""
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta
