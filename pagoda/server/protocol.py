"""Request schemas of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Types are checked by pydantic; value ranges by SamplingParams (one set of rules for the API and the offline
engine). Unknown fields are ignored, as OpenAI's newer fields arrive in clients before servers know them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from pagoda.sampling_params import SamplingParams, SamplingParamsError

# Template kwargs a client may pass through `chat_template_kwargs`; anything else could change what a
# template does in ways the server does not vouch for.
ALLOWED_CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking"})

TokenIds = list[Annotated[int, Field(strict=True)]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions, including vLLM's extra sampling fields."""

    model: str | None = None
    n: StrictInt = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    prompt_logprobs: StrictInt | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises SamplingParamsError naming the offending field. `prompt_logprobs` is what the engine computes
        (a route may need more than the field asks for, e.g. for echo)."""
        logit_bias = None
        if self.logit_bias:
            logit_bias = {}
            for key, value in self.logit_bias.items():
                try:
                    logit_bias[int(key)] = float(value)
                except ValueError:
                    raise SamplingParamsError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
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


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None

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


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ContentPart(_Request):
    """Any content part; only text is understood by a text model, so others are refused with a clear error."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content, as our responses carry both

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise SamplingParamsError(
                        f"content part type {part.type!r} is not supported by this text-only model; "
                        "send text parts", f"messages[{index}].content[{j}]")
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


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise SamplingParamsError("messages must contain at least one message", "messages")
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        unknown = sorted(set(kwargs) - ALLOWED_CHAT_TEMPLATE_KWARGS)
        if unknown:
            raise SamplingParamsError(
                f"chat_template_kwargs may only contain {sorted(ALLOWED_CHAT_TEMPLATE_KWARGS)}; got {unknown}",
                "chat_template_kwargs")
        return kwargs

    def check_supported(self) -> None:
        """Refuse, rather than silently ignore, features whose output this server would not honour."""
        if self.tools and self.tool_choice != "none":
            raise SamplingParamsError("tool calling is not supported by this server; send tool results as "
                                      "'tool' messages and leave 'tools' empty", "tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise SamplingParamsError("structured output (response_format json_object / json_schema) is not "
                                      "supported by this server", "response_format")

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs requires logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds
