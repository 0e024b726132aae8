"""StepInput: one step's flat batch, built on the driver from the SchedulerOutput and run by every rank.

The batch has no padding: the scheduled tokens of all requests are concatenated, decodes first. It holds plain
numpy arrays and the scheduled requests that sample (their sampling parameters and history), so it pickles
compactly for the worker ranks (`for_workers` drops what only the driver or the last stage needs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pagoda.core.outputs import ScheduledRequest, SchedulerOutput


@dataclass
class StepInput:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: the cache slot of each token
    query_start: np.ndarray  # [B + 1] int64; request i owns tokens [query_start[i], query_start[i + 1])
    context_lens: np.ndarray  # [B] int64: tokens in the cache after this step
    block_tables: np.ndarray  # [B, max_blocks] int64, padded with 0
    num_decodes: int  # requests [0, num_decodes) have one query token
    requests: list[ScheduledRequest]  # in batch order

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    @property
    def sampling_rows(self) -> list[int]:
        """Indices of the requests whose last token samples."""
        return [i for i, r in enumerate(self.requests) if r.sample]

    def for_workers(self) -> StepInput:
        """A copy for the other ranks: a request's token history only as far as the last stage reads it (the
        prompt for a repetition penalty, the prompt-logprob targets), so the message does not grow with the
        context length."""
        def needed(r: ScheduledRequest) -> int:
            prompt = r.num_prompt_tokens if r.params.repetition_penalty != 1.0 else 0
            targets = r.prompt_logprobs_stop + 1 if r.prompt_logprobs_stop > r.prompt_logprobs_start else 0
            return max(prompt, targets)

        light = [replace(r, token_ids=r.token_ids[:needed(r)], block_ids=[]) for r in self.requests]
        return replace(self, requests=light)


def build_step_input(scheduler_output: SchedulerOutput, block_size: int) -> StepInput:
    # Decodes first (stable), so attention can batch them; sampling rows follow this order too.
    requests = sorted(scheduler_output.requests, key=lambda r: r.num_tokens > 1)
    n = len(requests)
    counts = np.fromiter((r.num_tokens for r in requests), dtype=np.int64, count=n)
    query_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start[1:])
    total = int(query_start[-1])
    max_blocks = max(len(r.block_ids) for r in requests)
    block_tables = np.zeros((n, max_blocks), dtype=np.int64)
    context_lens = np.empty(n, dtype=np.int64)
    input_ids = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    for i, r in enumerate(requests):
        block_tables[i, : len(r.block_ids)] = r.block_ids
        context_lens[i] = r.end
        s, e = query_start[i], query_start[i + 1]
        input_ids[s:e] = r.token_ids[r.start:r.end]
        positions[s:e] = np.arange(r.start, r.end)
    row = np.repeat(np.arange(n), counts)
    slot_mapping = block_tables[row, positions // block_size] * block_size + positions % block_size
    num_decodes = int(np.searchsorted(counts > 1, True)) if n else 0
    return StepInput(input_ids, positions, slot_mapping, query_start, context_lens, block_tables, num_decodes,
                     requests)
