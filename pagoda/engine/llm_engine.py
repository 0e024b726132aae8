"""LLMEngine: the synchronous core. add_request / abort_request / step; one step = schedule → execute → update.

Everything that can be wrong with a request is found in add_request, before any work starts. A failure
while executing a step fails the requests of that step, not the engine.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pagoda.config import EngineConfig
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.core.scheduler import Scheduler, SchedulerConfig
from pagoda.engine.output_processor import OutputProcessor, child_id, parent_of
from pagoda.engine.outputs import RequestOutput
from pagoda.parallel.executor import DistributedExecutor, Launch
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.worker.model_loader import load_model
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger("pagoda")

@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step, for metrics. Counts are of scheduler requests (n samples = n)."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int  # includes free blocks that still hold a reusable cached prefix
    kv_cache_usage: float  # fraction of blocks held by requests
    num_preemptions_total: int
    prefix_cache_queries_total: int  # prompt tokens looked up in the prefix cache on admission
    prefix_cache_hits_total: int  # of which found cached
    num_steps_total: int  # steps that computed something
    last_step_num_tokens: int  # tokens the latest such step computed


class PromptTooLongError(SamplingParamsError):
    """The prompt cannot fit the context window (OpenAI code: context_length_exceeded)."""

    code = "context_length_exceeded"


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = False, launch: Launch | None = None):
        """`launch`: how to meet the other ranks when the config asks for several (default: spawn them here)."""
        from pagoda.model_store import resolve_model

        self.config = config
        start = time.monotonic()
        device = torch.device(config.device)
        path = resolve_model(config.model, progress=progress)
        self.executor: DistributedExecutor | None = None
        self.dead_listeners: list[Callable[[BaseException], None]] = []  # told when a rank dies
        if config.parallel.world_size > 1:
            from pagoda.loader import open_checkpoint

            num_layers = open_checkpoint(path).config.num_hidden_layers
            self.executor = DistributedExecutor(config, path, launch or Launch.local(), num_layers,
                                                on_dead=self._on_rank_dead, progress=progress)
            loaded = self.executor.loaded
            self.runner = self.executor.runner
            self.plans = self.executor.plans
        else:
            loaded = load_model(path, config, progress=progress)
            self.runner = ModelRunner(loaded.model, loaded.config, loaded.kv_caches, config.block_size,
                                      loaded.backend, device, loaded.native_stack)
            self.plans = [loaded.plan]
        self._in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput | None]] = deque()
        self._busy: set[str] = set()  # scheduler ids in a step in flight
        self.model_path = path
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.kv_layout = loaded.kv_layout
        self.plan = loaded.plan
        context = config.context_for(loaded.config)
        self.max_model_len = min(context, loaded.kv_layout.num_tokens)
        if self.max_model_len < context:
            logger.warning("max_model_len lowered from %d to %d: the KV cache holds only %d tokens",
                           context, self.max_model_len, loaded.kv_layout.num_tokens)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_prefill_tokens, self.max_model_len),
            KVCacheManager(loaded.kv_layout.num_blocks, config.block_size, config.enable_prefix_caching))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_steps_total = 0
        self.last_step_num_tokens = 0
        self.max_concurrency = loaded.kv_layout.max_concurrency(self.max_model_len)  # requests of max_model_len
        logger.info(
            "memory per rank: weights %.2f GiB, KV cache %.2f GiB (%s: %d blocks of %d tokens = %d tokens, %d "
            "B/token, %s), activations %.0f MiB reserved (largest step: %s measured, %.0f MiB by the formula); max "
            "concurrency at %d tokens: %.1f",
            self.plan.weight_bytes / 1024**3, loaded.kv_layout.num_bytes / 1024**3, self.plan.kv_cache_dtype,
            loaded.kv_layout.num_blocks, config.block_size, loaded.kv_layout.num_tokens,
            loaded.kv_layout.bytes_per_token, self.plan.kv_cache_sizing, self.plan.activation_reserve_bytes / 2**20,
            "not" if self.plan.activation_measured_bytes is None
            else f"{self.plan.activation_measured_bytes / 2**20:.0f} MiB",
            self.plan.activation_formula_bytes / 2**20, self.max_model_len, self.max_concurrency)
        logger.info("model %s (%s) ready in %.1f s", path.name, loaded.config.model_type, time.monotonic() - start)

    # ---- requests -----------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                    arrival_time: float | None = None) -> list[int]:
        """Validate and queue a request (n samples). Returns the prompt token ids. Raises ValueError subclasses
        (SamplingParamsError with .param) for anything wrong, having changed nothing."""
        if self.output_processor.has(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.process_prompt(prompt)
        self.validate_prompt(prompt_ids, params)
        # validated: max_tokens fits after the prompt; without it the request may fill the context
        max_tokens = self.max_model_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.output_processor.add_request(request_id, text, prompt_ids, params, arrival)
        eos = frozenset(self.tokenizer.eos_token_ids)
        for i in range(params.n):
            self.scheduler.add_request(Request(child_id(request_id, i), prompt_ids, params.child(i) if params.n > 1
                                               else params, eos, max_tokens, arrival_time=arrival))
        return prompt_ids

    def process_prompt(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids). Reads only immutable state: safe to call from any thread."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def prompt_too_long(self, num_prompt_tokens: int) -> PromptTooLongError:
        return PromptTooLongError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for a completion.", "prompt")

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise SamplingParamsError("the prompt is empty: give at least one token", "prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SamplingParamsError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise self.prompt_too_long(len(prompt_ids))
        # Nothing is cut silently: a max_tokens the context cannot hold after this prompt is refused, as OpenAI and
        # vLLM do (without max_tokens a request may use the rest of the context).
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the length of the prompt or max_tokens "
                f"(at most {room} here).", "max_tokens")
        if params.min_tokens > room:
            raise SamplingParamsError(f"min_tokens is {params.min_tokens}, but after the {len(prompt_ids)} prompt "
                                      f"tokens the context has room for {room}", "min_tokens")
        params.validate_token_ids(vocab)

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks. Returns their final outputs (finish_reason "abort")."""
        return self._finish_parents([request_ids] if isinstance(request_ids, str) else request_ids,
                                    RequestStatus.FINISHED_ABORTED)

    def _finish_parents(self, request_ids: Sequence[str], status: RequestStatus, error: str | None = None
                        ) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            state = self.output_processor.requests.get(request_id)
            if state is None:
                continue
            self.scheduler.finish_requests([child_id(request_id, i) for i in range(state.params.n)], status)
            out = self.output_processor.finish(request_id, status, error)
            if out is not None:
                outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        kv, s = self.scheduler.kv_cache, self.scheduler
        return EngineStats(s.num_running, s.num_waiting, kv.num_blocks, kv.pool.num_free_blocks, kv.usage,
                           s.num_preemptions_total, s.prefix_cache_queries_total, s.prefix_cache_hits_total,
                           self.num_steps_total, self.last_step_num_tokens)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.executor is not None:
            return self._parallel_step()
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return []
        self._mark_scheduled(scheduled)
        try:
            runner_output = self.runner.execute(scheduled)
        except Exception as exc:  # one bad step must not take the engine down
            logger.exception("step failed; failing its %d requests", len(scheduled.requests))
            parents = list(dict.fromkeys(parent_of(r.request_id)[0] for r in scheduled.requests))
            return self._finish_parents(parents, RequestStatus.FINISHED_ERROR, f"{type(exc).__name__}: {exc}")
        return self._update(scheduled, runner_output)

    def _parallel_step(self) -> list[RequestOutput]:
        """Fill the pipeline (up to one step in flight per stage), then finish the oldest step. Any failure
        here is fatal (DistributedError): the ranks are out of step with each other."""
        stages = self.executor.max_in_flight
        # Each step in flight takes its share of the requests, so the stages have work at the same time.
        share = max(1, -(-(self.scheduler.num_running + self.scheduler.num_waiting) // stages))
        while len(self._in_flight) < stages:
            scheduled = self.scheduler.schedule(self._busy, share if stages > 1 else None)
            if scheduled.empty:
                break
            self._mark_scheduled(scheduled)
            result = self.executor.submit(scheduled)
            self._in_flight.append((scheduled, result))
            self._busy.update(r.request_id for r in scheduled.requests)
            if result is not None:  # the driver sampled (one stage): nothing to overlap
                break
        if not self._in_flight:
            return []
        scheduled, result = self._in_flight.popleft()
        if result is None:
            result = self.executor.collect()
        self._busy.difference_update(r.request_id for r in scheduled.requests)
        return self._update(scheduled, result)

    def _mark_scheduled(self, scheduled: SchedulerOutput) -> None:
        self.num_steps_total += 1
        self.last_step_num_tokens = scheduled.num_batched_tokens
        for r in scheduled.requests:
            self.output_processor.mark_scheduled(parent_of(r.request_id)[0],
                                                 self.scheduler.requests[r.request_id].num_cached_tokens)

    def _update(self, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        core_outputs = self.scheduler.update_from_output(scheduled, runner_output)
        outputs, stopped = self.output_processor.process(core_outputs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    # ---- parallel ranks -----------------------------------------------------------------------------------

    def _on_rank_dead(self, error: BaseException) -> None:
        for listener in list(self.dead_listeners):
            listener(error)

    def shutdown(self) -> None:
        """Stop the worker ranks (parallel engines); the engine serves no more steps."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
