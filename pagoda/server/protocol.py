"""Request schemas of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Types are checked by pydantic, strictly: numbers are JSON numbers (finite, integers within int64), strings are
strings; value ranges by SamplingParams (one set of rules for the API and the offline engine). Unknown fields
are refused, and every known field is honoured, accepted as metadata or refused when it asks for something this
server does not do: field_policy.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag

from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.server.field_policy import (
    CHAT_REFUSED,
    COMPLETION_REFUSED,
    METADATA,
    SAMPLING_REFUSED,
    TOKENIZE_REFUSED,
    check_refused,
    policy_model,
)
from pagoda.server.middleware import REQUEST_ID_PATTERN

# Template kwargs a client may pass through `chat_template_kwargs`; anything else could change what a
# template does in ways the server does not vouch for.
ALLOWED_CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking"})

# An integer the engine can hold (JSON allows any size; 2**64 would overflow every consumer downstream).
Int = Annotated[int, Field(strict=True, ge=-(2**63), lt=2**63)]
# A finite JSON number (Python's JSON parser turns 1e400 into inf).
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Token ids are range-checked against the vocabulary later; no per-element bound here, as it triples the cost of
# validating a long prompt (validation holds the GIL).
TokenIds = list[StrictInt]

_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take "1_0", " 1", "+1" and "٥"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # OpenAI's side-channel padding: accepted, no padding sent
    continuous_usage_stats: StrictBool = False

    def check_supported(self) -> None:
        if self.continuous_usage_stats:
            raise SamplingParamsError("stream_options.continuous_usage_stats is not supported; usage comes in the "
                                      "last chunk with include_usage", "stream_options.continuous_usage_stats")


_SamplingPolicy = policy_model("_SamplingPolicy", SAMPLING_REFUSED, METADATA)


class _SamplingFields(_Request, _SamplingPolicy):
    """Fields shared by /v1/completions and /v1/chat/completions, including vLLM's extra sampling fields."""

    model: str | None = None
    n: Int = 1
    temperature: Float | None = None
    top_p: Float | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: Int = 0
    ignore_eos: StrictBool = False
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None
    truncate_prompt_tokens: Int | None = None  # keep only the last k prompt tokens; -1: as many as fit
    # vLLM's: the request's id, as an X-Request-Id header would give it (the header wins)
    request_id: Annotated[str, Field(pattern=REQUEST_ID_PATTERN)] | None = None

    def check_sampling_supported(self) -> None:
        check_refused(self, SAMPLING_REFUSED)
        if self.stream_options is not None:
            self.stream_options.check_supported()
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1 \
                and self.truncate_prompt_tokens != -1:
            raise SamplingParamsError(f"truncate_prompt_tokens must be -1 or at least 1, got "
                                      f"{self.truncate_prompt_tokens}", "truncate_prompt_tokens")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises SamplingParamsError naming the offending field. `prompt_logprobs` is what the engine computes
        (a route may need more than the field asks for, e.g. for echo)."""
        logit_bias = None
        if self.logit_bias:
            logit_bias = {}
            for key, value in self.logit_bias.items():
                if not _TOKEN_ID_KEY.fullmatch(key):
                    raise SamplingParamsError(f"logit_bias keys must be token ids written in decimal digits, got "
                                              f"{key!r}", "logit_bias")
                logit_bias[int(key)] = value
        if self.stream_options is not None and not self.stream:
            raise SamplingParamsError("stream_options is only allowed when stream is true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:  # as in vLLM: they belong to the whole response
            raise SamplingParamsError("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=logit_bias,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    return "texts" if isinstance(first, str) else "token_lists" if isinstance(first, list) else "tokens"


# One branch validated, chosen by the shape (a plain union would try every branch on a long list of ids).
Prompt = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[str], Tag("texts")] | Annotated[TokenIds, Tag("tokens")]
    | Annotated[list[TokenIds], Tag("token_lists")],
    Discriminator(_prompt_kind, custom_error_type="prompt_type", custom_error_message=(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids")),
]
# pydantic's labels of those branches in error locations, which are not field names
PROMPT_TAGS = frozenset({"text", "texts", "tokens", "token_lists"})


class CompletionRequest(_SamplingFields, policy_model("_CompletionPolicy", COMPLETION_REFUSED)):
    prompt: Prompt
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: StrictBool = False
    add_special_tokens: StrictBool = True

    def check_supported(self) -> None:
        """Refuse, rather than silently ignore, fields whose output this server would not honour."""
        self.check_sampling_supported()
        check_refused(self, COMPLETION_REFUSED)

    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes: vLLM's prompt_logprobs field, and with echo the `logprobs`
        of the echoed prompt. Echo with max_tokens 0 and no logprobs still runs the prompt (k = 0), so the
        request is served, counted and timed like any other."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if not wanted and self.echo and self.max_tokens == 0:
            wanted = [0]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids). Raises SamplingParamsError if empty."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif not p:
            prompts = []
        elif isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise SamplingParamsError("the prompt is empty: give at least one token or character", "prompt")
        return prompts


class ContentPart(_Request):
    """Any content part; only text is understood by a text model, so others are refused with a clear error."""

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    video_url: Any = None
    refusal: str | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint (Anthropic-style, sent by LiteLLM): metadata


_MEDIA_KEYS = ("image_url", "input_audio", "file", "video_url", "refusal")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content, as our responses carry both
    # What the openai SDK's ChatCompletionMessage.model_dump() carries when an answer is sent back as history.
    annotations: list[dict[str, Any]] | None = None  # citations of an earlier answer: metadata
    refusal: str | None = None
    audio: Any = None
    function_call: Any = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        for key in ("refusal", "audio", "function_call"):
            if getattr(self, key) is not None:
                raise SamplingParamsError(f"messages with {key} are not supported by this text-only server; send "
                                          "the text as content", f"messages[{index}].{key}")
        content = self.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise SamplingParamsError(
                        f"content part type {part.type[:64]!r} is not supported by this text-only model; "
                        "send text parts", f"messages[{index}].content[{j}]")
                media = next((k for k in _MEDIA_KEYS if getattr(part, k) is not None), None)
                if media is not None:
                    raise SamplingParamsError(f"a text part carries only text, not {media}",
                                              f"messages[{index}].content[{j}].{media}")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and self.role != "assistant":
            raise SamplingParamsError(f"a {self.role} message needs content", f"messages[{index}].content")
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        for key in ("name", "tool_call_id", "tool_calls", "reasoning_content", "reasoning"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        return message


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - ALLOWED_CHAT_TEMPLATE_KWARGS)
    if unknown:
        raise SamplingParamsError(
            f"chat_template_kwargs may only contain {sorted(ALLOWED_CHAT_TEMPLATE_KWARGS)}; got {unknown}",
            "chat_template_kwargs")
    if not all(isinstance(v, bool) for v in kwargs.values()):
        raise SamplingParamsError("chat_template_kwargs.enable_thinking must be true or false",
                                  "chat_template_kwargs.enable_thinking")
    return kwargs


class ChatCompletionRequest(_SamplingFields, policy_model("_ChatPolicy", CHAT_REFUSED)):
    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False  # the template writes BOS itself
    chat_template_kwargs: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise SamplingParamsError("messages must contain at least one message", "messages")
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def template_kwargs(self) -> dict[str, Any]:
        return _template_kwargs(self.chat_template_kwargs)

    def check_supported(self) -> None:
        """Refuse, rather than silently ignore, fields whose output this server would not honour."""
        self.check_sampling_supported()
        check_refused(self, CHAT_REFUSED)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return super().sampling_params(max_tokens, logprobs)
        except SamplingParamsError as exc:
            raise self.in_chat_terms(exc) from None

    def in_chat_terms(self, exc: SamplingParamsError) -> SamplingParamsError:
        """An error about the prompt or max_tokens, naming the field this request used for it."""
        if exc.param == "prompt":  # a chat request's prompt is its messages
            exc.param = "messages"
        elif exc.param == "max_tokens" and self.max_completion_tokens is not None:
            exc.param = "max_completion_tokens"
        return exc

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs requires logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Request, policy_model("_TokenizePolicy", TOKENIZE_REFUSED)):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: true for a prompt, false for messages (as chat)
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: StrictBool = False

    def check_supported(self) -> None:
        check_refused(self, TOKENIZE_REFUSED)
        if (self.prompt is None) == (self.messages is None):
            raise SamplingParamsError("give exactly one of 'prompt' and 'messages'", "prompt")

    def template_kwargs(self) -> dict[str, Any]:
        return _template_kwargs(self.chat_template_kwargs)


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds
