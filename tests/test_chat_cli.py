"""`pagoda chat`'s loop: a refused turn (too long for the context, a server error) is reported and the
conversation goes on without it."""

from __future__ import annotations

import builtins

from pagoda.chat import run_chat


class Backend:
    def __init__(self):
        self.seen = []

    def stream(self, messages, temperature, max_tokens):
        self.seen.append([m["content"] for m in messages])
        if messages[-1]["content"] == "too long":
            raise ValueError("This model's maximum context length is 8 tokens.")
        if messages[-1]["content"] == "server down":
            raise RuntimeError("HTTP 503")
        yield "ok"


def test_a_refused_turn_is_reported_and_dropped(monkeypatch, capsys) -> None:
    lines = iter(["too long", "server down", "hello", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    backend = Backend()
    assert run_chat(backend, system=None, temperature=0.0, max_tokens=4) == 0
    err = capsys.readouterr().err
    assert "error: This model's maximum context length is 8 tokens." in err and "error: HTTP 503" in err
    assert backend.seen[-1] == ["hello"]  # the refused turns were not kept in the conversation
