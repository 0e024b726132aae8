"""LLMEngine: the synchronous core. add_request / abort_request / step; one step = schedule → execute → update.

Everything that can be wrong with a request is found in add_request, before any work starts. A failure
while executing a step fails the requests of that step, not the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagoda.config import CacheConfig, parse_size
from pagoda.core.kv_cache_manager import KVCacheManager
from pagoda.core.scheduler import Scheduler, SchedulerConfig
from pagoda.engine.output_processor import OutputProcessor, child_id, parent_of
from pagoda.engine.outputs import RequestOutput
from pagoda.request import Request, RequestStatus
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.worker.model_loader import load_model
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger("pagoda")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    kv_cache_memory: int | str = "2GiB"
    block_size: int = 16
    max_num_seqs: int = 64
    max_prefill_tokens: int = 512  # prompt tokens per step; decoding requests add one token each
    max_model_len: int | None = None  # default: the model's context length, capped by the KV cache
    enable_prefix_caching: bool = True
    device: str = "cpu"
    attention_backend: str = "auto"  # "auto", "cpu" (native kernel) or "reference": see layers/attention_select.py
    # "auto": "gguf" for a GGUF file on the CPU, else None; None: weights in `dtype`; "gguf" / "gguf-a8":
    # compute on the file's own Q4_1/Q8_0 blocks, int16 / int8 activations for the 4-bit layers; "int8":
    # requantize every linear layer. See layers/quantized.py.
    quantization: str | None = "auto"
    kv_cache_dtype: str = "auto"  # "auto": fp16 for an fp32 model on the CPU, else the model's dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}") from None


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
    def __init__(self, config: EngineConfig, progress: bool = False):
        from pagoda.model_store import resolve_model

        self.config = config
        start = time.monotonic()
        device = torch.device(config.device)
        path = resolve_model(config.model, progress=progress)
        loaded = load_model(path, config.torch_dtype, device, CacheConfig(
            config.block_size, parse_size(config.kv_cache_memory), config.enable_prefix_caching,
            config.kv_cache_dtype), progress=progress,
            attention_backend=config.attention_backend, quantization=config.quantization)
        self.model_path = path
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.kv_layout = loaded.kv_layout
        context = config.max_model_len or loaded.config.max_position_embeddings
        self.max_model_len = min(context, loaded.kv_layout.num_tokens)
        if self.max_model_len < context:
            logger.warning("max_model_len lowered from %d to %d: the KV cache holds only %d tokens",
                           context, self.max_model_len, loaded.kv_layout.num_tokens)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_prefill_tokens, self.max_model_len),
            KVCacheManager(loaded.kv_layout.num_blocks, config.block_size, config.enable_prefix_caching))
        self.runner = ModelRunner(loaded.model, loaded.config, loaded.kv_caches, config.block_size,
                                  loaded.backend, device)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_steps_total = 0
        self.last_step_num_tokens = 0
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s); max concurrency at %d tokens: %.1f",
            loaded.kv_layout.num_blocks, config.block_size, loaded.kv_layout.num_tokens,
            loaded.kv_layout.num_bytes / 1024**3, str(loaded.kv_caches[0].dtype).removeprefix("torch."),
            self.max_model_len, loaded.kv_layout.max_concurrency(self.max_model_len))
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
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
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

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise SamplingParamsError("the prompt is empty: give at least one token", "prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SamplingParamsError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(prompt_ids)} tokens, which leaves no room for a completion.", "prompt")
        # A max_tokens the context could never hold is a mistake, not a wish to cap (a smaller one is capped).
        if params.max_tokens is not None and params.max_tokens > self.max_model_len:
            raise SamplingParamsError(f"max_tokens is {params.max_tokens}, more than this model's context of "
                                      f"{self.max_model_len} tokens (prompt included) holds", "max_tokens")
        room = self.max_model_len - len(prompt_ids)
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
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return []
        self.num_steps_total += 1
        self.last_step_num_tokens = scheduled.num_batched_tokens
        for r in scheduled.requests:
            self.output_processor.mark_scheduled(parent_of(r.request_id)[0],
                                                 self.scheduler.requests[r.request_id].num_cached_tokens)
        try:
            runner_output = self.runner.execute(scheduled)
        except Exception as exc:
            logger.exception("step failed; failing its %d requests", len(scheduled.requests))
            parents = list(dict.fromkeys(parent_of(r.request_id)[0] for r in scheduled.requests))
            return self._finish_parents(parents, RequestStatus.FINISHED_ERROR, f"{type(exc).__name__}: {exc}")
        core_outputs = self.scheduler.update_from_output(scheduled, runner_output)
        outputs, stopped = self.output_processor.process(core_outputs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs
