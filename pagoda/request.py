"""Request: one sequence's tokens and progress as the scheduler sees them. No torch.

Invariant: the KV cache holds tokens [0, num_computed_tokens); each step schedules some of the remaining
[num_computed_tokens, num_tokens). A request samples a token when a step brings num_computed_tokens to
num_tokens. There is no prefill or decode phase: a long prompt is simply a big gap, a resumed (preempted)
request has its whole history as the gap.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.core.outputs import TokenLogprobs


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting again after its blocks were taken; recomputes its history when resumed
    # Everything from here on is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # resolved limit on generated tokens (params.max_tokens capped by the context length)
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        # One list for prompt + output: the runner reads slices of it, the scheduler appends to it.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        # Logprobs of prompt tokens 1, 2, ... computed so far (entry i comes from position i's logits), None when
        # not asked for. They survive preemption: a recompute skips the positions already here. Invariant: they
        # cover every computed prompt position, so their count is >= min(num_computed_tokens, prompt - 1).
        self.prompt_logprobs: list[TokenLogprobs] | None = (
            [] if self.sampling_params.prompt_logprobs is not None else None)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def prompt_logprobs_range(self, start: int, end: int) -> tuple[int, int]:
        """The positions among [start, end) whose logits still have to give prompt logprobs; (0, 0) if none."""
        if self.prompt_logprobs is None:
            return 0, 0
        lo, hi = max(start, len(self.prompt_logprobs)), min(end, self.num_prompt_tokens - 1)
        assert lo == len(self.prompt_logprobs) or lo >= hi, "prompt logprobs would skip positions"
        return (lo, hi) if lo < hi else (0, 0)

    @property
    def max_prefix_hit_tokens(self) -> int | None:
        """How many leading tokens may come from the prefix cache: a hit skips computing those positions, so
        only ones whose prompt logprobs are already known (None: no limit)."""
        return None if self.prompt_logprobs is None else len(self.prompt_logprobs)

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)

    @property
    def finished(self) -> bool:
        return self.status.finished
