"""The field policy: every request field is honoured, accepted as metadata, or refused with a 400 naming it.

Never silently ignored. The three kinds:
- honoured: declared in protocol.py and used (sampling fields, vLLM's extras, ...);
- metadata: changes nothing about the result, so it is accepted and not used (`user`, `store`, `metadata`,
  `service_tier`, `parallel_tool_calls`, prompt-cache hints, ...): clients such as the openai SDK, LangChain and
  LiteLLM send these;
- refused: asks for something this server does not do (beam search, best-of ranking, guided decoding, audio,
  ...). Such a field is accepted only with a value that asks for nothing (unset, false, the default), otherwise
  the request gets a 400 whose `param` is the field.
A field that is none of these is unknown: 400 "unrecognized request field" (protocol.py forbids extra fields).

Each table below declares its fields (protocol.py builds them into the request models), so removing a line
removes the field and its refusal together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, create_model

from pagoda.sampling_params import SamplingParamsError


@dataclass(frozen=True)
class Refused:
    name: str
    reason: str
    # (value, request) -> True when the value asks for nothing this server lacks
    allowed: Callable[[Any, Any], bool] = lambda value, request: value is None
    annotation: Any = Any


def _off(value: Any, request: Any) -> bool:
    return value is None or value is False


def _empty(value: Any, request: Any) -> bool:
    return not value


_GUIDED = "structured output (guided decoding) is not supported by this server"

SAMPLING_REFUSED: tuple[Refused, ...] = (
    Refused("best_of", "best_of > n (generating best_of samples and returning the n best) is not supported; "
            "leave it unset or equal to n", lambda v, r: v is None or v == r.n, StrictInt | None),
    Refused("use_beam_search", "beam search is not supported", _off),
    Refused("length_penalty", "length_penalty applies to beam search, which is not supported",
            lambda v, r: v is None or v == 1.0),
    Refused("guided_json", _GUIDED),
    Refused("guided_regex", _GUIDED),
    Refused("guided_choice", _GUIDED),
    Refused("guided_grammar", _GUIDED),
    Refused("guided_decoding_backend", _GUIDED),
    Refused("guided_whitespace_pattern", _GUIDED),
    Refused("structured_outputs", _GUIDED),
    Refused("response_format", "structured output (response_format json_object / json_schema) is not supported "
            "by this server", lambda v, r: v is None or (isinstance(v, dict) and v.get("type") == "text")),
    Refused("allowed_token_ids", "allowed_token_ids is not supported; logit_bias can push tokens down", _empty),
    Refused("bad_words", "bad_words is not supported; logit_bias can forbid single tokens", _empty),
    Refused("logits_processors", "custom logits processors are not supported", _empty),
    Refused("spaces_between_special_tokens", "spaces_between_special_tokens=false is not supported",
            lambda v, r: v is None or v is True),
    Refused("priority", "priority scheduling is not supported (requests are served first come, first served)",
            lambda v, r: v is None or v == 0),
    Refused("return_tokens_as_token_ids", "return_tokens_as_token_ids is not supported", _off),
    Refused("return_token_ids", "return_token_ids is not supported", _off),
    Refused("cache_salt", "cache_salt (per-tenant prefix-cache isolation) is not supported"),
    Refused("kv_transfer_params", "KV transfer (disaggregated serving) is not supported"),
    Refused("vllm_xargs", "vllm_xargs is not supported"),
)

CHAT_REFUSED: tuple[Refused, ...] = (
    Refused("tools", "tool calling is not supported by this server; send tool results as 'tool' messages and "
            "leave 'tools' empty", lambda v, r: not v or r.tool_choice == "none"),
    Refused("tool_choice", "tool calling is not supported by this server: tool_choice may only be 'none' or "
            "'auto'", lambda v, r: v in (None, "none", "auto")),
    Refused("functions", "function calling is not supported by this server", _empty),
    Refused("function_call", "function calling is not supported by this server",
            lambda v, r: v is None or v == "none"),
    Refused("audio", "audio output is not supported by this text-only server"),
    Refused("modalities", "only the text modality is supported", lambda v, r: v is None or v == ["text"]),
    Refused("prediction", "predicted outputs are not supported"),
    Refused("web_search_options", "web search is not supported"),
    Refused("reasoning_effort", "reasoning_effort is not supported by this server"),
    Refused("verbosity", "verbosity is not supported by this server"),
    Refused("moderation", "moderation is not supported by this server"),
    Refused("continue_final_message", "continue_final_message is not supported", _off),
    Refused("echo", "echo is not supported on chat completions", _off),
    Refused("documents", "documents (retrieval-augmented templates) are not supported", _empty),
    Refused("chat_template", "a chat template sent with the request is not used: this server renders only the "
            "model's own template"),
    Refused("mm_processor_kwargs", "multimodal inputs are not supported by this text-only server", _empty),
)

COMPLETION_REFUSED: tuple[Refused, ...] = (
    Refused("suffix", "suffix (fill-in-the-middle) is not supported by this server", _empty),
)

TOKENIZE_REFUSED: tuple[Refused, ...] = (
    Refused("tools", "tool definitions are not supported by this server", _empty),
    Refused("continue_final_message", "continue_final_message is not supported", _off),
    Refused("chat_template", "a chat template sent with the request is not used: this server renders only the "
            "model's own template"),
    Refused("mm_processor_kwargs", "multimodal inputs are not supported by this text-only server", _empty),
)

_Text = str | None
# Accepted and unused: nothing about the answer depends on them here.
METADATA: dict[str, Any] = {
    "user": _Text,
    "store": StrictBool | None,
    "metadata": dict[str, str] | None,
    "service_tier": _Text,
    "parallel_tool_calls": StrictBool | None,
    "prompt_cache_key": _Text,
    "prompt_cache_retention": _Text,
    "prompt_cache_options": dict[str, Any] | None,
    "safety_identifier": _Text,
}


def policy_model(name: str, refused: Sequence[Refused], metadata: dict[str, Any] | None = None
                 ) -> type[BaseModel]:
    """A model declaring the refused and metadata fields (all optional), for request models to inherit."""
    fields: dict[str, Any] = {r.name: (r.annotation, None) for r in refused}
    fields.update({key: (annotation, None) for key, annotation in (metadata or {}).items()})
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def check_refused(request: BaseModel, refused: Sequence[Refused]) -> None:
    """Raise SamplingParamsError naming the first refused field that asks for something."""
    for rule in refused:
        if not rule.allowed(getattr(request, rule.name), request):
            raise SamplingParamsError(f"{rule.name}: {rule.reason}", rule.name)


def unrecognized_message(field: str) -> str:
    return (f"unrecognized request field {field!r}: this server refuses fields it does not know rather than "
            "ignore them (README.md, 'Field policy')")
