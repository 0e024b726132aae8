"""LLM: the offline API, named as in vLLM. `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pagoda.engine.llm_engine import EngineConfig, LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

Prompt = str | dict[str, Any]  # a string, or {"prompt_token_ids": [...]} / {"prompt": "..."}
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", kv_cache_memory: int | str = "auto",
                 memory_utilization: float = 0.9, max_num_seqs: int = 64, max_model_len: int | None = None,
                 max_prefill_tokens: int = 512, block_size: int = 16, enable_prefix_caching: bool = True,
                 device: str = "cpu", attention_backend: str = "auto", quantization: str | None = "auto",
                 kv_cache_dtype: str = "auto", kernel_plan: str = "kernel", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, pipeline_layers: Sequence[int] | None = None,
                 threads_per_rank: int | None = None, distributed_timeout: float = 60.0, progress: bool = True):
        """With tensor_parallel_size x pipeline_parallel_size > 1 the engine spawns its worker ranks (processes);
        call `shutdown()` (or use the LLM as a context manager) to stop them."""
        from pagoda.model_store import DEFAULT_MODEL

        self.engine = LLMEngine(EngineConfig(
            model=model or DEFAULT_MODEL, dtype=dtype, kv_cache_memory=kv_cache_memory,
            memory_utilization=memory_utilization, block_size=block_size, max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, device=device, attention_backend=attention_backend,
            quantization=quantization, kv_cache_dtype=kv_cache_dtype, kernel_plan=kernel_plan,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            pipeline_layers=tuple(pipeline_layers) if pipeline_layers else None, threads_per_rank=threads_per_rank,
            distributed_timeout=distributed_timeout), progress=progress)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, all in the same batches; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._params_per_prompt(sampling_params, len(prompts))
        request_ids = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, _prompt_input(prompt), p)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.encode(
            tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                          **(chat_template_kwargs or {})), add_special_tokens=False)}
            for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="generating", unit="req")
        pending = set(request_ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        finals[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finals[r] for r in request_ids]

    @staticmethod
    def _params_per_prompt(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return list(params)


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")
