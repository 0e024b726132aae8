"""Server-sent events as the server writes them: one `data:` line per event whatever the text holds."""

from __future__ import annotations

import json

import pytest

from pagoda.server.responses import SSE_DONE, sse


@pytest.mark.parametrize("text", ["plain", "a\nb\r\nc", "nel\x85here", "line\u2028sep", "para\u2029sep",
                                  "\x1c\x1d\x1e\x0b\x0c", "café ☕ 日本"])
def test_an_event_is_one_line_for_every_splitter(text) -> None:
    event = sse({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and event.startswith("data: ")
    body = event[len("data: "):-2]
    # str.splitlines() also breaks at NEL, U+2028 and U+2029 (some clients read streams that way): none survive raw
    assert body.splitlines() == [body] and "\n" not in body and "\r" not in body
    assert json.loads(body)["choices"][0]["text"] == text
    assert "é" in sse({"t": "é"})  # other characters stay readable (not \\u-escaped)


def test_done() -> None:
    assert SSE_DONE == "data: [DONE]\n\n"
