"""Scheduler: one token-budget loop deciding, each step, which requests run and how many tokens each.

Every running request that is decoding (one token to compute) runs each step. Prompt tokens share a budget of
max_prefill_tokens per step: running requests in admission order close as much of their gap (num_tokens -
num_computed_tokens) as the budget allows (each at most half of it while requests wait, so a long prompt's chunked
prefill does not hold new requests back until it ends), then waiting requests are admitted first-come-first-served.
This gives chunked prefill and mixed prefill/decode batches, and a prompt rate that does not depend on how many
requests are decoding (when decode tokens came out of the same budget, a full batch of decodes left less than one
prompt per step, and prompts arriving as fast as requests finished queued up for seconds). When the KV cache runs
out, the most recently admitted running request is preempted: its blocks are freed and it goes back to the front of
the queue, to recompute its history later (same tokens, so the same output). No torch here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import EngineCoreOutput, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagoda.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    # Prompt tokens computed per step; with one token per decoding request on top, a step computes at most
    # max_prefill_tokens + max_num_seqs tokens: this bounds the step time, hence decode latency.
    max_prefill_tokens: int = 512
    max_model_len: int = 8192
    # While requests wait for admission, a running request's prompt chunk takes at most this many tokens (default:
    # half of max_prefill_tokens), so new requests start beside a long prefill instead of after it.
    shared_prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_prefill_tokens < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler limits: {self}")
        if self.shared_prefill_chunk is not None and self.shared_prefill_chunk < 1:
            raise ValueError(f"shared_prefill_chunk must be at least 1, got {self.shared_prefill_chunk}")

    @property
    def prefill_chunk_while_waiting(self) -> int:
        return self.shared_prefill_chunk or max(1, self.max_prefill_tokens // 2)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        # A request of max_model_len tokens must fit the whole cache alone, or preemption could never end.
        if config.max_model_len > kv_cache.num_blocks * kv_cache.block_size:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the KV cache's "
                             f"{kv_cache.num_blocks * kv_cache.block_size} tokens")
        self.config = config
        self.kv_cache = kv_cache
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0
        # Prefix-cache lookups of admitted requests, in tokens (vLLM's vllm:prefix_cache_queries / _hits).
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0

    # ---- intake -------------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens; the context holds "
                             f"{self.config.max_model_len}, including at least one generated token")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, stop string, error); their blocks are freed now."""
        assert status.finished
        ended = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            ended.append(request)
        return ended

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -----------------------------------------------------------------------------------------

    def schedule(self, busy: set[str] | frozenset[str] = frozenset(), max_requests: int | None = None
                 ) -> SchedulerOutput:
        """`busy`: requests in a step still in flight (pipeline parallelism). They are neither scheduled nor
        preempted: their next tokens are not known yet, and the step in flight writes their KV blocks.
        `max_requests`: schedule at most this many (so the requests spread over the steps in flight)."""
        limit = max_requests if max_requests is not None else len(self.running) + len(self.waiting)
        prompt_budget = self.config.max_prefill_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        # Fairness: with requests waiting that could be admitted, no running prompt takes the whole budget.
        admissible = bool(self.waiting) and len(self.running) < self.config.max_num_seqs
        chunk = self.config.prefill_chunk_while_waiting if admissible else prompt_budget
        index = 0
        while index < len(self.running) and len(scheduled) < limit:
            request = self.running[index]
            gap = request.num_tokens - request.num_computed_tokens
            num_new = 1 if gap == 1 else min(gap, prompt_budget, chunk)  # decodes never wait for the prompt budget
            if num_new == 0 or request.request_id in busy:
                index += 1
                continue
            fits = True
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self._victim(busy)
                if victim is None:  # only requests in flight could make room: try again next step
                    fits = False
                    break
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    fits = False
                    break
            if fits:
                scheduled.append((request, num_new))
                if gap > 1:
                    prompt_budget -= num_new
                index += 1
            elif request in self.running:
                index += 1

        # Admit waiting requests only when nothing was preempted: the cache is already too full.
        while (not preempted and self.waiting and prompt_budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(scheduled) < limit):
            request = self.waiting[0]
            hits = self.kv_cache.find_cached_prefix(request)
            num_hit_tokens = len(hits) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_hit_tokens, prompt_budget)
            if not self.kv_cache.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            if self.kv_cache.pool.enable_caching:
                self.prefix_cache_queries_total += request.num_tokens
                self.prefix_cache_hits_total += num_hit_tokens
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            prompt_budget -= num_new

        return SchedulerOutput(
            requests=[self._to_scheduled(request, n) for request, n in scheduled],
            num_batched_tokens=sum(n for _, n in scheduled),
            preempted_ids=[r.request_id for r in preempted],
        )

    def _to_scheduled(self, request: Request, num_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_tokens
        logprobs_start, logprobs_stop = request.prompt_logprobs_range(start, end)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids,
            start=start,
            num_tokens=num_tokens,
            block_ids=self.kv_cache.block_ids(request.request_id),
            # max_tokens 0 (prompt logprobs only): the request ends at its prompt's end without sampling
            sample=end == request.num_tokens and request.max_tokens > 0,
            params=request.sampling_params,
            num_prompt_tokens=request.num_prompt_tokens,
            output_token_ids=request.output_token_ids,
            eos_token_ids=request.eos_token_ids,
            prompt_logprobs_start=logprobs_start,
            prompt_logprobs_stop=logprobs_stop,
        )

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
                           ) -> list[EngineCoreOutput]:
        """Advance each scheduled request by what the step computed; append sampled tokens; apply stops."""
        outputs = []
        for scheduled in scheduler_output.requests:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # ended while the step ran
            request.num_computed_tokens += scheduled.num_tokens
            self.kv_cache.cache_computed_blocks(request)
            new_prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
            if new_prompt_logprobs:
                request.prompt_logprobs.extend(new_prompt_logprobs)
            # The prompt's end reached for the first time (a recompute after preemption comes back with output
            # tokens): its logprobs are complete and go out with this step's output.
            prompt_done = request.num_output_tokens == 0 and request.num_computed_tokens == request.num_tokens
            prompt_logprobs = request.prompt_logprobs if prompt_done else None
            if not scheduled.sample:
                if prompt_done:  # max_tokens 0: nothing to sample, the request is complete
                    outputs.append(EngineCoreOutput(request.request_id, [], prompt_logprobs=prompt_logprobs,
                                                    status=RequestStatus.FINISHED_LENGTH))
                    self._finish(request, RequestStatus.FINISHED_LENGTH)
                continue
            token_id = runner_output.sampled_token_ids[request.request_id]
            request.append_output_token(token_id)
            status = self._stop_status(request, token_id)
            logprobs = runner_output.logprobs.get(request.request_id)
            outputs.append(EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[token_id],
                new_logprobs=[logprobs] if logprobs is not None else [],
                prompt_logprobs=prompt_logprobs,
                status=status,
                stop_reason=request.stop_reason,
            ))
            if status.finished:
                self._finish(request, status)
        return outputs

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.running.remove(request)
        request.status = status
        self._free(request)

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return RequestStatus.RUNNING

    def _victim(self, busy: set[str] | frozenset[str]) -> Request | None:
        """The most recently admitted running request that is not in flight."""
        return next((r for r in reversed(self.running) if r.request_id not in busy), None)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _free(self, request: Request) -> None:
        self.kv_cache.free(request)
        del self.requests[request.request_id]
