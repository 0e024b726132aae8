"""The dataclasses that cross layers: scheduler → runner (SchedulerOutput), runner → scheduler
(ModelRunnerOutput), scheduler → engine (EngineCoreOutput). Nothing else is shared between them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.request import RequestStatus
from pagoda.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute tokens [start, start + num_tokens) of token_ids.

    token_ids, output_token_ids and block_ids are the request's own lists, passed by reference: the runner
    reads them during the step and never mutates them.
    """

    request_id: str
    token_ids: list[int]  # prompt + output so far
    start: int  # position of the first scheduled token (= tokens already in the KV cache)
    num_tokens: int
    block_ids: list[int]
    sample: bool  # the step reaches the end of the known tokens, so the next token is sampled
    params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    # Prompt logprobs this step computes: the logits at positions [start, stop) give the logprobs of the tokens
    # at [start + 1, stop + 1). A sub-range of the scheduled positions; empty (0, 0) for most requests.
    prompt_logprobs_start: int = 0
    prompt_logprobs_stop: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.requests


@dataclass
class TokenLogprobs:
    """A token's logprob and the top-k alternatives (token id, logprob), best first. `rank` (1 = most likely)
    is filled for prompt tokens, as vLLM reports it."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]  # only for requests whose ScheduledRequest.sample was set
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> one entry per position of its ScheduledRequest's prompt-logprobs range, in order
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What one step did for one request: the new token (if any) and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Set once, when the request first reaches the end of its prompt: the logprobs of prompt tokens 1..n-1.
    prompt_logprobs: list[TokenLogprobs] | None = None
    status: RequestStatus = RequestStatus.RUNNING
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.status.finished
