"""Response bodies in OpenAI's shapes: completions and chat completions, whole or as stream chunks, with usage
and logprobs. Plain dicts (one per chunk, serialized once), built from the engine's RequestOutputs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from pagoda.core.outputs import TokenLogprobs
from pagoda.engine.outputs import RequestOutput
from pagoda.tokenizer.tokenizer import Tokenizer

# Characters that Python's str.splitlines() and some JavaScript line readers treat as line ends although SSE does
# not (NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR): escaped in the JSON (still the same string), so a client that
# splits a stream on them never cuts an event in two.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


SSE_DONE = sse("[DONE]")


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def usage_of(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    return usage(sum(len(o.prompt_token_ids) for o in outputs), sum(o.num_generated_tokens for o in outputs),
                 sum(o.num_cached_tokens for o in outputs))


class LogprobsFormatter:
    """OpenAI's two logprobs shapes: chat's `content` list and the legacy completions table."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def chat(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self._text(token_id), "logprob": _finite(logprob),
                    "bytes": list(self.tokenizer.token_bytes(token_id))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs],
                "refusal": None}

    def completion(self, logprobs: Sequence[TokenLogprobs], text_offset: int, num_top: int) -> dict[str, Any]:
        """The legacy table of generated tokens; text_offset is where the first one starts in the choice's text."""
        return self._table([lp.token_id for lp in logprobs], logprobs, text_offset, num_top)

    def echoed_prompt(self, prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprobs | None],
                      num_top: int) -> dict[str, Any]:
        """The legacy table of an echoed prompt: the first token has no logprob (null), as in OpenAI's."""
        return self._table(prompt_ids, prompt_logprobs, 0, num_top)

    @staticmethod
    def joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        return {key: first[key] + second[key] for key in first}

    def _table(self, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], text_offset: int,
               num_top: int) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, lp in zip(token_ids, entries):
            text = self._text(token_id)
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            if lp is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(_finite(lp.logprob))
            alternatives = {self._text(t): _finite(v) for t, v in lp.top[:num_top]}
            alternatives.setdefault(text, _finite(lp.logprob))  # OpenAI's dicts hold the chosen token too
            top.append(alternatives)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def vllm_prompt_logprobs(self, prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprobs | None],
                             num_top: int) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} holding the prompt token itself, then its top num_top alternatives (the engine may have
        computed more, for an echo's larger `logprobs`)."""
        out: list[dict[str, Any] | None] = []
        for token_id, lp in zip(prompt_ids, prompt_logprobs):
            if lp is None:
                out.append(None)
                continue
            entry = {str(token_id): self._vllm_logprob(token_id, lp.logprob, lp.rank)}
            for rank, (t, v) in enumerate(lp.top[:num_top], 1):
                entry.setdefault(str(t), self._vllm_logprob(t, v, rank))
            out.append(entry)
        return out

    def _vllm_logprob(self, token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": self._text(token_id)}


def _finite(value: float) -> float:
    """JSON has no -inf; OpenAI reports impossible tokens with a very large negative number."""
    return max(float(value), -9999.0)


class ResponseIds:
    def __init__(self, request_id: str, model: str):
        self.id = request_id
        self.model = model
        self.created = int(time.time())

    def base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
                      stop_reason: int | str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
                stop_reason: int | str | None, reasoning: str | None = None) -> dict[str, Any]:
    """With `reasoning` (a think block was found), the message carries it under vLLM's two names, and an empty
    answer (e.g. generation ended inside the think block) is null, as in vLLM."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "tool_calls": []}
    if reasoning is not None:
        message["content"] = content or None
        message["reasoning_content"] = message["reasoning"] = reasoning
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_chunk(ids: ResponseIds, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**ids.base("chat.completion.chunk"),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_chunk(ids: ResponseIds, index: int, text: str, finish_reason: str | None = None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**ids.base("text_completion"),
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
