"""Batched sampling with per-request parameters.

Order, as in vLLM: logit bias and min_tokens suppression → penalties → greedy argmax, or temperature → min_p →
top_k / top_p → sample. Logprobs describe the model's raw distribution (before any of these).

Sampling inverts the cumulative distribution: one uniform u per row, the token is the first whose cumulative
probability exceeds u times the row's total (one cumsum over the vocabulary; drawing a variate per vocabulary
entry cost ~70 ms per step at batch 64 here). A request with a seed draws its u from a generator seeded by
(seed, step), so its tokens do not depend on the rest of the batch, on preemption, or on how often it was
scheduled. top-k / top-p look at the TOP_CANDIDATES most likely tokens of a row (a partial sort) and fall back to
sorting the whole row only when its cut lies beyond them (a very flat distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.core.outputs import ScheduledRequest, TokenLogprobs

_MASK64 = (1 << 64) - 1
TOP_CANDIDATES = 256  # tokens per row that top-k / top-p sort first


def _mix64(x: int) -> int:
    """splitmix64: decorrelates nearby seeds, so (seed, step) and (seed + 1, step - 1) draw unrelated noise."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplingBatch:
    """Per-row parameters for the rows of a logits matrix, built once per step from the scheduled requests."""

    requests: list[ScheduledRequest]
    temperature: torch.Tensor  # [B], 1.0 on greedy rows
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] long, vocab size where unlimited
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    max_logprobs: int | None  # the largest top-k of logprobs asked for, if any

    @classmethod
    def build(cls, requests: list[ScheduledRequest], vocab_size: int, device: torch.device) -> SamplingBatch:
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        asked = [p.logprobs for p in params if p.logprobs is not None]

        def column(values, dtype, needed: bool):
            return torch.tensor(values, dtype=dtype, device=device) if needed else None

        return cls(
            requests=requests,
            temperature=torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                     dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            top_k=column([p.top_k or vocab_size for p in params], torch.long,
                         any(0 < p.top_k < vocab_size and not g for p, g in zip(params, greedy))),
            top_p=column([p.top_p for p in params], torch.float32,
                         any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))),
            min_p=column([p.min_p for p in params], torch.float32,
                         any(p.min_p > 0.0 and not g for p, g in zip(params, greedy))),
            max_logprobs=max(asked) if asked else None,
        )


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs is not None else None
        logits = self._apply_constraints(logits, batch)
        logits = self._apply_penalties(logits, batch)
        greedy_tokens = logits.argmax(dim=-1)
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = torch.where(batch.greedy, greedy_tokens, self._sample(logits, batch))
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw_logprobs, token_list, batch)

    def _apply_constraints(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logit_bias, and min_tokens: EOS and stop tokens are impossible until min_tokens are generated."""
        for row, r in enumerate(batch.requests):
            p = r.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[row].index_add_(0, ids, vals)
            if len(r.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                if banned:
                    logits[row, banned] = float("-inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = [i for i, r in enumerate(batch.requests)
                if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty]
        for row in rows:  # one vectorised pass per penalised request
            r = batch.requests[row]
            p = r.params
            out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                prompt = torch.tensor(r.token_ids[: r.num_prompt_tokens], dtype=torch.long, device=logits.device)
                seen[prompt] = True
                row_logits = logits[row]
                penalised = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                        row_logits * p.repetition_penalty)
                logits[row] = torch.where(seen, penalised, row_logits)
            if p.frequency_penalty:
                logits[row] -= p.frequency_penalty * counts
            if p.presence_penalty:
                logits[row] -= p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        probs = torch.softmax(logits / batch.temperature.unsqueeze(1), dim=-1)
        if batch.min_p is not None:
            threshold = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        if batch.top_k is not None or batch.top_p is not None:
            probs = self._top_k_top_p(probs, batch.top_k, batch.top_p)
        u = torch.rand(probs.shape[0], device=probs.device)
        for row, r in enumerate(batch.requests):
            if r.params.seed is not None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(_mix64(_mix64(r.params.seed) ^ len(r.output_token_ids)))
                u[row] = torch.rand(1, generator=gen, device=probs.device)[0]
        cdf = probs.cumsum(dim=-1)
        # u * total < cdf[-1], so some token qualifies; the first one has a nonzero probability
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return tokens.clamp_(max=probs.shape[1] - 1)

    @staticmethod
    def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
        """Zero the tokens outside each row's top-k and top-p nucleus (rows with neither keep everything)."""
        n, vocab = probs.shape
        k = top_k if top_k is not None else torch.full((n,), vocab, dtype=torch.long, device=probs.device)
        p = top_p if top_p is not None else torch.ones(n, device=probs.device)
        rows = ((k < vocab) | (p < 1.0)).nonzero().squeeze(1)
        if rows.numel() == 0:
            return probs
        sub, k_rows, p_rows = probs[rows], k[rows], p[rows]
        limited = k_rows[k_rows < vocab]  # every top-k cut lies among the candidates
        width = min(vocab, max(TOP_CANDIDATES, int(limited.max()) if limited.numel() else 0))
        values, order = sub.topk(width, dim=-1)  # sorted, most likely first
        keep = _nucleus(values, k_rows, p_rows, total=sub.sum(dim=-1))
        # A row is decided by its candidates when it has a top-k (its cut lies among them), or its nucleus ends
        # there.
        decided = (k_rows < vocab) | keep[:, -1].logical_not() | (width == vocab)
        out = probs.clone()
        out[rows] = torch.zeros_like(sub).scatter_(1, order, values * keep)
        wide = rows[~decided]  # a nucleus wider than the candidates: sort these rows whole
        if wide.numel():
            values, order = probs[wide].sort(dim=-1, descending=True)
            keep = _nucleus(values, k[wide], p[wide], total=probs[wide].sum(dim=-1))
            out[wide] = torch.zeros_like(values).scatter_(1, order, values * keep)
        return out

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: list[int], batch: SamplingBatch) -> list[TokenLogprobs | None]:
        if raw is None:
            return [None] * len(tokens)
        top_vals, top_ids = raw.topk(max(batch.max_logprobs, 1), dim=-1)
        chosen = raw.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        out: list[TokenLogprobs | None] = []
        for row, r in enumerate(batch.requests):
            k = r.params.logprobs
            if k is None:
                out.append(None)
            else:
                out.append(TokenLogprobs(tokens[row], chosen[row], list(zip(top_ids[row][:k], top_vals[row][:k]))))
        return out


def _nucleus(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Which of each row's most likely tokens (values sorted descending, [R, W]) survive top-k and then top-p:
    a token stays if fewer than k tokens rank before it and the mass of strictly better kept tokens is below
    top_p times the kept total (the best token always stays). `total` is the row's whole mass; with top-k the
    kept total is the mass of its k tokens, all among `values` when k <= W."""
    ranks = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    keep = ranks < top_k.unsqueeze(1)
    kept = values * keep
    limited = top_k <= values.shape[1]
    kept_total = torch.where(limited, kept.sum(dim=-1), total)
    before = kept.cumsum(dim=-1) - kept
    return keep & (before < top_p.unsqueeze(1) * kept_total.unsqueeze(1))
