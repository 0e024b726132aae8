"""Prompt logprobs from transformers on the same weights (fp32), and the check that pagoda's match them.

TOLERANCE: pagoda with fp32 weights (`quantization=None`: the GGUF's blocks dequantized exactly as transformers
does) and an fp32 KV cache differs from transformers only in the order of fp32 sums; measured differences are
~1e-5, so 1e-3 absolute leaves a wide margin and still catches any real error (a wrong position or an off-by-one
token gives differences of whole units).
"""

from __future__ import annotations

import torch

from pagoda.core.outputs import TokenLogprobs

TOLERANCE = 1e-3


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the log-softmax of the logits at position p (it scores token p + 1)."""
    model, _ = hf_model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def hf_continuation_logprob(reference: torch.Tensor, ids: list[int], start: int) -> float:
    """Sum of the logprobs of ids[start:] given what precedes them."""
    return float(sum(reference[p - 1, ids[p]] for p in range(start, len(ids))))


def assert_prompt_logprobs_match(entries: list[TokenLogprobs | None], ids: list[int], reference: torch.Tensor,
                                 k: int) -> None:
    """entries: pagoda's prompt logprobs of `ids` (None first); reference: hf_logprobs(ids)."""
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        entry, row = entries[p], reference[p - 1]
        assert entry.token_id == ids[p]
        expected = float(row[ids[p]])
        assert abs(entry.logprob - expected) <= TOLERANCE, (p, entry.logprob, expected)
        # rank 1 = most likely; tokens within the tolerance of the chosen one may fall on either side of it
        surely_above = int((row > expected + TOLERANCE).sum()) + 1
        maybe_above = int((row > expected - TOLERANCE).sum()) + 1
        assert surely_above <= entry.rank <= maybe_above, (p, entry.rank, surely_above, maybe_above)
        assert len(entry.top) == k
        best = row.topk(k).values.tolist() if k else []
        for (token, value), hf_value in zip(entry.top, best):
            assert abs(value - hf_value) <= TOLERANCE and abs(value - float(row[token])) <= TOLERANCE, (p, token)
