"""The batched sampler on hand-made logits: each parameter does what it says, per row."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from pagoda.core.outputs import ScheduledRequest
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.worker.sampler import Sampler, SamplingBatch

V = 8


def row(params: SamplingParams, prompt=(0,), output=(), eos=frozenset({7}), rid="r") -> ScheduledRequest:
    tokens = list(prompt) + list(output)
    return ScheduledRequest(rid, tokens, len(tokens) - 1, 1, [0], True, params, len(prompt), list(output), eos)


def sample(rows, logits):
    logits = torch.tensor(logits, dtype=torch.float32)
    return Sampler()(logits.clone(), SamplingBatch.build(rows, V, torch.device("cpu")))


BASE = [0.0, 1.0, 3.0, 2.0, 0.5, -1.0, 0.0, 2.9]


def test_greedy_rows_and_sampled_rows_in_one_batch():
    tokens, _ = sample([row(SamplingParams(temperature=0)), row(SamplingParams(temperature=1.0, top_k=1))],
                       [BASE, BASE])
    assert tokens == [2, 2]


def test_min_tokens_suppresses_eos_and_stop_tokens():
    logits = [[0, 0, 0, 0, 0, 0, 9.0, 10.0]]
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[6])
    tokens, _ = sample([row(params, output=[1])], logits)
    assert tokens[0] not in (6, 7)
    tokens, _ = sample([row(params, output=[1, 2, 3])], logits)
    assert tokens == [7], "once min_tokens are out, EOS is allowed again"
    ignore = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sample([row(ignore, output=[1])], logits)[0] == [7], "with ignore_eos, EOS is an ordinary token"


def test_logit_bias():
    tokens, _ = sample([row(SamplingParams(temperature=0, logit_bias={0: 100.0}))], [BASE])
    assert tokens == [0]
    tokens, _ = sample([row(SamplingParams(temperature=0, logit_bias={2: -100.0}))], [BASE])
    assert tokens == [7]


def test_repetition_presence_frequency_penalties():
    # token 2 (3.0) vs token 7 (2.9): a seen token 2 loses under each penalty
    assert sample([row(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=[2])], [BASE])[0] == [7]
    assert sample([row(SamplingParams(temperature=0, presence_penalty=0.5), output=[2])], [BASE])[0] == [7]
    assert sample([row(SamplingParams(temperature=0, frequency_penalty=0.06), output=[2, 2])], [BASE])[0] == [7]
    assert sample([row(SamplingParams(temperature=0, frequency_penalty=0.06), output=[2])], [BASE])[0] == [2]
    # presence/frequency apply to generated tokens only (OpenAI), repetition to the prompt as well
    assert sample([row(SamplingParams(temperature=0, presence_penalty=2.0), prompt=[2])], [BASE])[0] == [2]
    # a negative logit is pushed further down by the repetition penalty, not up
    neg = [-1.0, -1.2, -5, -5, -5, -5, -5, -5]
    assert sample([row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])], [neg])[0] == [1]


def frequencies(params: SamplingParams, logits, n=3000):
    rows = [row(params, rid=str(i)) for i in range(n)]
    tokens, _ = sample(rows, [logits] * n)
    return Counter(tokens)


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(frequencies(SamplingParams(temperature=1.0, top_k=2), BASE)) == {2, 7}
    probs = torch.softmax(torch.tensor(BASE), 0)
    assert probs[2] + probs[7] < 0.8
    assert set(frequencies(SamplingParams(temperature=1.0, top_p=0.5), BASE)) == {2, 7}
    assert set(frequencies(SamplingParams(temperature=1.0, top_p=0.01), BASE)) == {2}
    assert set(frequencies(SamplingParams(temperature=1.0, min_p=0.5), BASE)) == {2, 7}  # p3/p2 = e^-1
    assert set(frequencies(SamplingParams(temperature=1.0, min_p=0.3), BASE)) == {2, 7, 3}


def test_temperature_sampling_follows_the_distribution():
    counts = frequencies(SamplingParams(temperature=1.0), BASE, n=20000)
    probs = torch.softmax(torch.tensor(BASE), 0).tolist()
    for token, p in enumerate(probs):
        assert abs(counts[token] / 20000 - p) < 4 * math.sqrt(p * (1 - p) / 20000) + 1e-3
    cold = frequencies(SamplingParams(temperature=0.2), BASE, n=2000)
    assert cold[2] > cold[7] > 0 and cold[2] / 2000 > 0.55


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    flat = [0.0] * V
    alone, _ = sample([row(params, output=[1, 2])], [flat])
    crowd, _ = sample([row(SamplingParams(temperature=1.0), rid=str(i)) for i in range(5)]
                      + [row(params, output=[1, 2])], [flat] * 6)
    assert crowd[-1] == alone[0]
    steps = [sample([row(params, output=[1] * k)], [flat])[0][0] for k in range(12)]
    assert len(set(steps)) > 1, "each step draws fresh noise"


def test_logprobs_are_the_raw_distribution_with_top_k():
    params = SamplingParams(temperature=0, logprobs=3, presence_penalty=2.0)
    tokens, lps = sample([row(params, output=[2]), row(SamplingParams(temperature=0))], [BASE, BASE])
    expected = torch.log_softmax(torch.tensor(BASE), 0)
    lp = lps[0]
    assert lp.token_id == tokens[0] == 7
    assert lp.logprob == pytest.approx(expected[7].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == [2, 7, 3]
    assert [v for _, v in lp.top] == pytest.approx(expected[[2, 7, 3]].tolist(), abs=1e-6)
    assert lps[1] is None


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
])
def test_invalid_params_name_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def reference_top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The definition, by sorting every row: top-k first, then the smallest prefix reaching top_p of the rest."""
    out = torch.zeros_like(probs)
    for i in range(probs.shape[0]):
        values, order = probs[i].sort(descending=True)
        values = values * (torch.arange(len(values)) < top_k[i])
        before = values.cumsum(0) - values
        out[i, order] = values * (before < top_p[i] * values.sum())
    return out


def test_top_k_top_p_over_a_large_vocabulary_equals_sorting_every_row():
    """Candidates first, a full sort only where the nucleus is wider (flat rows): the same support and values."""
    from pagoda.worker.sampler import TOP_CANDIDATES

    gen = torch.Generator().manual_seed(3)
    vocab = 5000
    peaked = torch.softmax(torch.randn(4, vocab, generator=gen) * 4, -1)
    flat = torch.softmax(torch.randn(4, vocab, generator=gen) * 0.1, -1)
    probs = torch.cat([peaked, flat])
    top_k = torch.tensor([vocab, 40, 600, vocab, vocab, 3, vocab, vocab])
    top_p = torch.tensor([0.9, 1.0, 0.95, 1.0, 0.9, 0.5, 1.0, 0.2])
    got = Sampler._top_k_top_p(probs, top_k, top_p)
    active = [0, 1, 2, 4, 5, 7]
    assert torch.equal(got[active], reference_top_k_top_p(probs, top_k, top_p)[active])
    assert torch.equal(got[3], probs[3]) and torch.equal(got[6], probs[6]), "rows without top-k/top-p are kept"
    assert (got[4] > 0).sum() > TOP_CANDIDATES, "a flat row's nucleus is wider than the candidates"
    assert (got[1] > 0).sum() == 40 and (got[5] > 0).sum() <= 3
