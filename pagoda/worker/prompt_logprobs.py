"""Prompt logprobs, computed inside a prefill step from the hidden states the step already has.

A request that asks for them gets, for each scheduled position p of its prompt-logprobs range, the
log-softmax of the logits at p, which scores the prompt token at p + 1: its logprob, its rank and the top k.
Only those rows go through the LM head (the vocabulary is large: a row of logits is 49k floats on the default
model), in blocks of BLOCK_ROWS so a long chunk never holds more than one block of logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pagoda.core.outputs import ScheduledRequest, TokenLogprobs

BLOCK_ROWS = 256  # rows of logits alive at once (256 x 49k fp32 = 48 MiB)


def compute_prompt_logprobs(requests: Sequence[ScheduledRequest], query_start: np.ndarray, hidden: torch.Tensor,
                            compute_logits: Callable[[torch.Tensor], torch.Tensor]
                            ) -> dict[str, list[TokenLogprobs]]:
    """requests are in batch order, query_start their offsets into hidden's rows."""
    wanted = [(i, r) for i, r in enumerate(requests) if r.prompt_logprobs_stop > r.prompt_logprobs_start]
    if not wanted:
        return {}
    rows, targets, owners = [], [], []
    for i, r in wanted:
        lo, hi = r.prompt_logprobs_start, r.prompt_logprobs_stop
        first_row = int(query_start[i]) + lo - r.start  # the row of position lo in this step's batch
        rows.append(np.arange(first_row, first_row + hi - lo))
        targets.extend(r.token_ids[lo + 1:hi + 1])
        owners.append((r, hi - lo))
    all_rows = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
    all_targets = torch.tensor(targets, dtype=torch.long, device=hidden.device)
    k = max(max(r.params.prompt_logprobs for _, r in wanted), 1)
    chosen, ranks, top_values, top_ids = [], [], [], []
    for s in range(0, len(all_rows), BLOCK_ROWS):
        logprobs = torch.log_softmax(compute_logits(hidden[all_rows[s:s + BLOCK_ROWS]]).float(), dim=-1)
        target = all_targets[s:s + BLOCK_ROWS].unsqueeze(1)
        value = logprobs.gather(1, target)
        chosen.append(value.squeeze(1))
        ranks.append((logprobs > value).sum(dim=1) + 1)
        top = logprobs.topk(k, dim=-1)
        top_values.append(top.values)
        top_ids.append(top.indices)
    chosen_l = torch.cat(chosen).tolist()
    ranks_l = torch.cat(ranks).tolist()
    top_values_l = torch.cat(top_values).tolist()
    top_ids_l = torch.cat(top_ids).tolist()
    out: dict[str, list[TokenLogprobs]] = {}
    row = 0
    for r, count in owners:
        n = r.params.prompt_logprobs
        out[r.request_id] = [
            TokenLogprobs(targets[j], chosen_l[j], list(zip(top_ids_l[j][:n], top_values_l[j][:n])), ranks_l[j])
            for j in range(row, row + count)]
        row += count
    return out
