"""OutputProcessor: turns the scheduler's per-step token outputs into text, applies stop strings, and groups
the n samples of a request into one RequestOutput.

Each sample of a request is its own scheduler request, with id "<request id>#<index>"; stop strings are
found here (they need text), and the engine then finishes the matching scheduler request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from pagoda.core.outputs import EngineCoreOutput, TokenLogprobs
from pagoda.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.request import RequestStatus
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pagoda.tokenizer.tokenizer import Tokenizer


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def parent_of(child: str) -> tuple[str, int]:
    parent, _, index = child.rpartition("#")
    return parent, int(index)


@dataclass
class _SampleState:
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher | None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # never mutated once set
    error: str | None = field(default=None)

    def snapshot(self) -> RequestOutput:
        """A copy the caller may keep: later steps keep mutating the live CompletionOutputs."""
        outputs = [replace(s.output, token_ids=list(s.output.token_ids),
                           logprobs=None if s.output.logprobs is None else list(s.output.logprobs),
                           delta_token_ids=list(s.output.delta_token_ids),
                           delta_logprobs=list(s.output.delta_logprobs))
                   for s in self.samples]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             finished=all(s.output.finished for s in self.samples),
                             prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
                             metrics=self.metrics, error=self.error)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        samples = [
            _SampleState(
                CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None),
                IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None,
            )
            for i in range(params.n)
        ]
        self.requests[request_id] = _RequestState(request_id, prompt, prompt_token_ids, params, samples,
                                                  RequestMetrics(arrival_time))

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of requests that changed, and the scheduler ids that a stop string ended."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        stopped_by_string: list[str] = []
        for state in self.requests.values():  # clear the previous step's deltas
            for s in state.samples:
                if s.output.delta_token_ids or s.output.delta_text:
                    s.output.delta_text, s.output.delta_token_ids, s.output.delta_logprobs = "", [], []
        for core in core_outputs:
            parent, index = parent_of(core.request_id)
            state = self.requests.get(parent)
            if state is None:
                continue
            sample = state.samples[index]
            out = sample.output
            if out.finished:
                continue
            if core.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [None, *core.prompt_logprobs]
            if core.new_token_ids:  # none when max_tokens is 0 (prompt logprobs only)
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                state.metrics.last_token_time = now
            out.token_ids.extend(core.new_token_ids)
            out.delta_token_ids.extend(core.new_token_ids)
            if out.logprobs is not None:
                out.logprobs.extend(core.new_logprobs)
                out.delta_logprobs.extend(core.new_logprobs)
            text = sample.detokenizer.push(core.new_token_ids)
            status = core.status
            if status.finished:  # text held back for an unfinished character has nothing more to wait for
                text += sample.detokenizer.flush()
            if sample.stops is not None:
                text, hit = sample.stops.feed(text)
                if hit and not status.finished:
                    status = RequestStatus.FINISHED_STOPPED
                    out.stop_reason = sample.stops.matched
                    stopped_by_string.append(core.request_id)
                elif hit:  # the same token also ended it another way: the stop string wins the reason
                    status, out.stop_reason = RequestStatus.FINISHED_STOPPED, sample.stops.matched
                elif status.finished:
                    text += sample.stops.flush()
            if status.finished and out.stop_reason is None:
                out.stop_reason = core.stop_reason
            out.text += text
            out.delta_text += text
            if status.finished:
                out.finish_reason = status.finish_reason
            touched[parent] = state
        return self._emit(touched, now), stopped_by_string

    def finish(self, request_id: str, status: RequestStatus, error: str | None = None) -> RequestOutput | None:
        """End every unfinished sample of a request (abort or engine error)."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for s in state.samples:
            if not s.output.finished:
                s.output.delta_text, s.output.delta_token_ids, s.output.delta_logprobs = "", [], []
                s.output.finish_reason = status.finish_reason
        state.error = error
        [out] = self._emit({request_id: state}, time.monotonic())
        return out

    def mark_scheduled(self, request_id: str, num_cached_tokens: int) -> None:
        state = self.requests.get(request_id)
        if state is not None and state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = time.monotonic()
            state.num_cached_tokens = num_cached_tokens

    def _emit(self, touched: dict[str, _RequestState], now: float) -> list[RequestOutput]:
        outputs = []
        for request_id, state in touched.items():
            out = state.snapshot()
            if out.finished:
                state.metrics.finished_time = now
                del self.requests[request_id]
            outputs.append(out)
        return outputs

    def has(self, request_id: str) -> bool:
        return request_id in self.requests
