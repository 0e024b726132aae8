"""ModelRunner: one rank's step: StepInput → model (native stack or torch modules) → sampler → ModelRunnerOutput.

The runner never decides who runs; it only turns the scheduler's decision into tensors. On a pipeline stage that
is not the last it returns the hidden states for the next stage instead of sampling; on a tensor-parallel rank
other than the first of the last stage it joins the logits gather and returns nothing (rank 0 of the stage
samples).
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagoda.layers.attention import Attention, AttentionBackend, BatchLayout, ForwardContext, forward_context
from pagoda.worker.prompt_logprobs import compute_prompt_logprobs
from pagoda.worker.sampler import Sampler, SamplingBatch
from pagoda.worker.step_input import StepInput, build_step_input


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, kv_caches: list[torch.Tensor], block_size: int,
                 backend: AttentionBackend, device: torch.device, native_stack=None):
        """`native_stack` (models/native_stack.py), when given, runs the steps it serves instead of the torch
        modules."""
        self.model = model
        self.config = config
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.native_stack = native_stack
        self.sampler = Sampler()
        self.windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)}
        shard = getattr(model, "shard", None)
        self.is_last_stage = shard is None or shard.layout.is_last_stage
        self.samples = shard is None or shard.tp_rank == 0  # the last stage's first TP rank samples

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """The whole step on a single rank."""
        return self.run(build_step_input(scheduler_output, self.block_size))

    def forward(self, layout: BatchLayout, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's hidden state after this rank's layers (the native stack for the steps it serves)."""
        metadata = self.backend.build_metadata(layout, self.windows)
        stack = self.native_stack
        with forward_context(ForwardContext(self.backend, metadata, self.kv_caches)):
            if stack is not None and (stack.max_tokens is None or len(input_ids) <= stack.max_tokens):
                return stack(input_ids, positions, hidden)
            return self.model(input_ids, positions, hidden)

    @torch.inference_mode()
    def run(self, step: StepInput, hidden: torch.Tensor | None = None) -> ModelRunnerOutput | torch.Tensor | None:
        """Run this rank's part of a step. `hidden`: the previous pipeline stage's output. Returns the
        ModelRunnerOutput (on the rank that samples), the hidden states (before the last stage), or None."""
        layout = BatchLayout(step.query_start, step.context_lens, step.block_tables, step.num_decodes,
                             self.block_size, torch.from_numpy(step.slot_mapping).to(self.device))
        out = self.forward(layout, torch.from_numpy(step.input_ids).to(self.device),
                           torch.from_numpy(step.positions).to(self.device), hidden)
        if not self.is_last_stage:
            return out
        # out holds every token's final hidden state (the torch modules and the native stack alike), so the
        # LM head can score any row: prompt-logprob rows here, each sampling request's last row below. Every TP
        # rank of the last stage takes part in each logits gather; only the sampling rank keeps the results.
        prompt_logprobs = compute_prompt_logprobs(step.requests, step.query_start, out, self.model.compute_logits)
        sampling = step.sampling_rows
        if not sampling:
            return ModelRunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt_logprobs) if self.samples else None
        last_token = torch.from_numpy(step.query_start[1:][sampling] - 1).to(self.device)
        logits = self.model.compute_logits(out[last_token])  # the whole vocabulary on every TP rank
        if not self.samples:
            return None
        sampled_requests = [step.requests[i] for i in sampling]
        batch = SamplingBatch.build(sampled_requests, logits.shape[-1], self.device)
        tokens, logprobs = self.sampler(logits, batch)
        return ModelRunnerOutput(
            sampled_token_ids={r.request_id: t for r, t in zip(sampled_requests, tokens)},
            logprobs={r.request_id: lp for r, lp in zip(sampled_requests, logprobs) if lp is not None},
            prompt_logprobs=prompt_logprobs,
        )
