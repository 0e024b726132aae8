"""What the engine gives its users: RequestOutput with one CompletionOutput per sample (n of them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core.outputs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""  # everything so far (stop strings removed unless asked for)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or string, when a stop condition matched
    # What the latest step added, for streaming.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # With SamplingParams.prompt_logprobs: None for the first prompt token (nothing precedes it), then each
    # prompt token's logprob, rank and top-k alternatives. Set from the output that ends the prefill on.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
