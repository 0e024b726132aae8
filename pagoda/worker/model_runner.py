"""ModelRunner: SchedulerOutput → one flattened batch → model → sampler → ModelRunnerOutput.

The batch has no padding: the scheduled tokens of all requests are concatenated, decodes first. The runner
never decides who runs; it only turns the scheduler's decision into tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.core.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from pagoda.layers.attention import Attention, AttentionBackend, BatchLayout, ForwardContext, forward_context
from pagoda.worker.prompt_logprobs import compute_prompt_logprobs
from pagoda.worker.sampler import Sampler, SamplingBatch


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, kv_caches: list[torch.Tensor], block_size: int,
                 backend: AttentionBackend, device: torch.device):
        self.model = model
        self.config = config
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.sampler = Sampler()
        self.windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)}

    def _layout(self, requests: list[ScheduledRequest]) -> tuple[BatchLayout, np.ndarray, np.ndarray]:
        """Token ids, positions, slot mapping, query offsets, context lengths and block tables of the batch."""
        bs = self.block_size
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
        slot_mapping = block_tables[row, positions // bs] * bs + positions % bs
        num_decodes = int(np.searchsorted(counts > 1, True)) if n else 0  # decodes come first
        layout = BatchLayout(query_start, context_lens, block_tables, num_decodes, bs,
                             torch.from_numpy(slot_mapping).to(self.device))
        return layout, input_ids, positions

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # Decodes first (stable), so attention can batch them; sampling rows follow this order too.
        requests = sorted(scheduler_output.requests, key=lambda r: r.num_tokens > 1)
        layout, input_ids, positions = self._layout(requests)
        metadata = self.backend.build_metadata(layout, self.windows)
        with forward_context(ForwardContext(self.backend, metadata, self.kv_caches)):
            hidden = self.model(torch.from_numpy(input_ids).to(self.device),
                                torch.from_numpy(positions).to(self.device))
        # hidden holds every token's final hidden state (the torch modules and the native stack alike), so the
        # LM head can score any row: prompt-logprob rows here, each sampling request's last row below.
        prompt_logprobs = compute_prompt_logprobs(requests, layout.query_start, hidden, self.model.compute_logits)
        sampling = [i for i, r in enumerate(requests) if r.sample]
        if not sampling:
            return ModelRunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt_logprobs)
        last_token = torch.from_numpy(layout.query_start[1:][sampling] - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last_token])
        sampled_requests = [requests[i] for i in sampling]
        batch = SamplingBatch.build(sampled_requests, logits.shape[-1], self.device)
        tokens, logprobs = self.sampler(logits, batch)
        return ModelRunnerOutput(
            sampled_token_ids={r.request_id: t for r, t in zip(sampled_requests, tokens)},
            logprobs={r.request_id: lp for r, lp in zip(sampled_requests, logprobs) if lp is not None},
            prompt_logprobs=prompt_logprobs,
        )
