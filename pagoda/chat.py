"""`pagoda chat`: an interactive terminal chat that streams each answer, on a local engine or against a server.

Commands at the prompt: /reset starts a new conversation, /exit (or Ctrl-D) leaves. Ctrl-C stops an answer.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

Messages = list[dict[str, str]]


class ChatBackend(Protocol):
    def stream(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated; closing the iterator stops generation."""


class LocalChat:
    """Runs an LLMEngine in this process."""

    def __init__(self, config):
        from pagoda.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config, progress=True)
        self._count = 0

    def stream(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]:
        from pagoda.sampling_params import SamplingParams

        tokenizer = self.engine.tokenizer
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special_tokens=False)
        self._count += 1
        request_id = f"chat-{self._count}"
        self.engine.add_request(request_id, prompt, SamplingParams(temperature=temperature, max_tokens=max_tokens))
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.outputs[0].delta_text:
                        yield out.outputs[0].delta_text
        finally:
            self.engine.abort_request(request_id)  # no-op when finished; frees the blocks on Ctrl-C


class RemoteChat:
    """Streams from an OpenAI-compatible server's /v1/chat/completions."""

    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600, connect=10))

    def stream(self, messages: Messages, temperature: float, max_tokens: int) -> Iterator[str]:
        body: dict[str, Any] = {"messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                                "stream": True}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(_error_message(response))
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


def _error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - not our error shape
        return f"HTTP {response.status_code}: {response.text[:200]}"


def run_chat(backend: ChatBackend, *, system: str | None, temperature: float, max_tokens: int) -> int:
    messages: Messages = [{"role": "system", "content": system}] if system else []
    print("Type a message; /reset for a new conversation, /exit or Ctrl-D to leave, Ctrl-C stops an answer.",
          file=sys.stderr)
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            print("(new conversation)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply, start, pieces = "", time.monotonic(), 0
        stream = backend.stream(messages, temperature, max_tokens)
        try:
            for piece in stream:
                reply += piece
                pieces += 1
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except (RuntimeError, ValueError) as exc:  # the server's error, or the local engine's refusal
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        finally:
            stream.close()
        print(f"\n({pieces} chunks in {time.monotonic() - start:.1f} s)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
