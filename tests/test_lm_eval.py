"""lm-eval's `local-completions` runs a small multiple-choice task (a local JSONL file) against a real `pagoda
serve`, and its accuracy equals the one this test computes from transformers' logprobs on the same weights.

lm-eval scores each choice with one request per prompt (token ids, echo, logprobs 1, max_tokens 1) and sums
the continuation's token_logprobs. It finds the server's tokenizer itself (its "auto" backend probes GET
/tokenizer_info, then uses /tokenize and /detokenize), so nothing comes from a model hub: the hub is off and
HF_HOME points at an empty directory.

Why the comparison is exact: the server runs fp32 weights and an fp32 KV cache, whose logprobs match
transformers' within tests/logprobs_oracle.TOLERANCE per token; every question's best choice leads the
runner-up by far more than that (asserted below), so both pick the same answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.logprobs_oracle import TOLERANCE, hf_continuation_logprob, hf_logprobs
from tests.servers import ServerProcess

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight"], 1),
    ("What colour is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many days are there in a week?", ["five", "seven", "ten", "twelve"], 1),
    ("Which animal barks?", ["a cat", "a dog", "a cow"], 1),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which planet is closest to the sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What is frozen water called?", ["steam", "ice"], 1),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Mark Twain"], 1),
    ("Which is the largest ocean on Earth?", ["the Atlantic", "the Indian", "the Pacific", "the Arctic"], 2),
]

TASK_YAML = """\
task: pagoda_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def context_of(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def hf_choice_logprobs(hf_model, question: str, choices: list[str]) -> list[float]:
    """Each choice's loglikelihood as lm-eval defines it: the tokens of context + " " + choice after the
    context's tokens (lm-eval encodes the pair whole, then splits at the context's length)."""
    _, tokenizer = hf_model
    context = tokenizer.encode(context_of(question), add_special_tokens=False)
    scores = []
    for choice in choices:
        ids = tokenizer.encode(f"{context_of(question)} {choice}", add_special_tokens=False)
        assert ids[:len(context)] == context
        scores.append(hf_continuation_logprob(hf_logprobs(hf_model, ids), ids, len(context)))
    return scores


@pytest.fixture(scope="module")
def fp32_server(smollm_gguf, tmp_path_factory):
    proc = ServerProcess(smollm_gguf, "--served-model-name", "smol", "--quantization", "none", "--dtype", "float32",
                         "--kv-cache-dtype", "float32", "--kv-cache-memory", "64MiB", "--max-prefill-tokens", "16",
                         log_dir=tmp_path_factory.mktemp("lm-eval-server")).start()
    yield proc
    proc.stop()


def test_lm_eval_multiple_choice_accuracy_equals_transformers(fp32_server, hf_model, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pagoda_mc.yaml").write_text(TASK_YAML.format(data=data))
    (tmp_path / "hf").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    model_args = f"model=smol,base_url={fp32_server.url}/v1/completions,num_concurrent=2,max_retries=1"
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "pagoda_mc", "--include_path", str(tmp_path / "tasks"), "--batch_size", "4",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    [samples_file] = (tmp_path / "out").rglob("samples_pagoda_mc_*.jsonl")
    acc = json.loads(results_file.read_text())["results"]["pagoda_mc"]["acc,none"]
    samples = {s["doc_id"]: s for s in map(json.loads, samples_file.read_text().splitlines())}

    correct = 0
    for doc_id, (question, choices, answer) in enumerate(QUESTIONS):
        expected = hf_choice_logprobs(hf_model, question, choices)
        served = [float(resp[0][0]) for resp in samples[doc_id]["resps"]]
        # a choice is a few tokens, each within TOLERANCE of transformers
        assert served == pytest.approx(expected, abs=4 * TOLERANCE), (question, served, expected)
        best, runner_up = sorted(expected, reverse=True)[:2]
        assert best - runner_up > 20 * TOLERANCE, f"{question!r}: choices too close to compare robustly"
        correct += max(range(len(choices)), key=expected.__getitem__) == answer
    assert acc == correct / len(QUESTIONS)
    assert 0 < correct < len(QUESTIONS)  # the model gets some wrong: the accuracy says something
