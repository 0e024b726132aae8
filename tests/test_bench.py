"""`pagoda bench`: the workload builder, dataset readers, summary math, and both benchmarks run end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from pagoda.bench.serve import arrival_offsets
from pagoda.bench.stats import Distribution, RequestRecord, format_summary, summarize
from pagoda.bench.workload import (
    BenchmarkError,
    SyntheticPrompts,
    WorkloadSpec,
    build_workload,
    parse_length_range,
    read_dataset,
    rng_for,
)
from pagoda.cli import main
from tests.conftest import API_KEY


@pytest.fixture(scope="module")
def tokenizer(smollm_gguf):
    from pagoda.bench.workload import load_tokenizer

    return load_tokenizer(str(smollm_gguf))


# ---------------------------------------------------------------- workload


@pytest.mark.parametrize("input_len", [1, 2, 7, 32, 300])
def test_synthetic_prompt_has_exactly_input_len_tokens(tokenizer, input_len):
    synthetic = SyntheticPrompts(tokenizer)
    rng = rng_for(0, "prompts")
    for _ in range(5):
        assert len(tokenizer.encode(synthetic.prompt(input_len, rng))) == input_len


def test_synthetic_workload_is_deterministic_per_seed(tokenizer):
    spec = WorkloadSpec(num_prompts=6, input_len=24, output_len=8, seed=7)
    first, again = build_workload(spec, tokenizer), build_workload(spec, tokenizer)
    assert first == again
    assert len({r.prompt for r in first}) == 6
    assert all(r.prompt_len == 24 and r.output_len == 8 for r in first)
    other_seed = build_workload(WorkloadSpec(num_prompts=6, input_len=24, output_len=8, seed=8), tokenizer)
    assert [r.prompt for r in other_seed] != [r.prompt for r in first]


def test_output_len_range_is_seeded_and_leaves_prompts_unchanged(tokenizer):
    fixed = build_workload(WorkloadSpec(num_prompts=20, input_len=8, output_len=5, seed=1), tokenizer)
    ranged = build_workload(WorkloadSpec(num_prompts=20, input_len=8, output_len_range=(3, 6), seed=1), tokenizer)
    assert [r.prompt for r in ranged] == [r.prompt for r in fixed]  # independent random streams
    lengths = [r.output_len for r in ranged]
    assert all(3 <= n <= 6 for n in lengths) and len(set(lengths)) > 1
    again = build_workload(WorkloadSpec(num_prompts=20, input_len=8, output_len_range=(3, 6), seed=1), tokenizer)
    assert [r.output_len for r in again] == lengths


def test_parse_length_range():
    assert parse_length_range("16:256") == (16, 256)
    assert parse_length_range("4:4") == (4, 4)
    for bad in ("16", "a:b", "0:4", "9:3", "1:2:3"):
        with pytest.raises(BenchmarkError):
            parse_length_range(bad)


def test_jsonl_dataset(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "output_len": 5}\n\n{"prompt": "What is a cat?"}\n'
                    '{"prompt": ""}\n')
    entries = read_dataset(path, tokenizer)
    assert [(e.prompt, e.output_len) for e in entries] == [("Hello there", 5), ("What is a cat?", None)]

    workload = build_workload(WorkloadSpec(num_prompts=2, dataset=path), tokenizer)
    by_prompt = {r.prompt: r for r in workload}
    assert by_prompt["Hello there"].output_len == 5
    assert by_prompt["What is a cat?"].output_len == 128  # the default when the dataset does not say
    assert by_prompt["What is a cat?"].prompt_len == len(tokenizer.encode("What is a cat?"))
    overridden = build_workload(WorkloadSpec(num_prompts=2, dataset=path, output_len=3), tokenizer)
    assert all(r.output_len == 3 for r in overridden)

    with pytest.raises(BenchmarkError, match="fewer than --num-prompts"):
        build_workload(WorkloadSpec(num_prompts=3, dataset=path), tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(BenchmarkError, match="bad.jsonl:1"):
        read_dataset(tmp_path / "bad.jsonl", tokenizer)


def test_sharegpt_dataset(tokenizer, tmp_path):
    answer = "A cat is a small furry animal that purrs."
    rows = [
        {"conversations": [{"from": "human", "value": "What is a cat?"}, {"from": "gpt", "value": answer},
                           {"from": "human", "value": "And a dog?"}, {"from": "gpt", "value": "A dog barks."}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "human", "value": "Unanswered"}]},  # no answer: skipped
        {"conversations": [{"from": "human", "value": "Empty"}, {"from": "gpt", "value": ""}]},  # skipped
        {"id": "no conversations"},  # skipped
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    entries = read_dataset(path, tokenizer)
    assert [e.prompt for e in entries] == ["What is a cat?", "Hi"]
    assert entries[0].output_len == len(tokenizer.encode(answer, add_special_tokens=False))
    assert entries[1].output_len == len(tokenizer.encode("Hello!", add_special_tokens=False))


# ---------------------------------------------------------------- summary math


def test_distribution_on_known_numbers():
    dist = Distribution.of_seconds([1.0, 2.0, 3.0, 4.0])
    assert dist.count == 4
    assert dist.mean == pytest.approx(2500.0)
    assert dist.p50 == pytest.approx(2500.0)
    assert dist.p90 == pytest.approx(3700.0)  # linear between the closest ranks: 3 + 0.7 * (4 - 3)
    assert dist.p99 == pytest.approx(3970.0)
    assert Distribution.of_seconds([]) == Distribution(0, None, None, None, None)


def test_summarize_counts_completed_requests_only():
    records = [
        RequestRecord(0, prompt_len=10, output_len=5, success=True, prompt_tokens=12, output_tokens=5, ttft=0.1,
                      e2e=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        RequestRecord(1, prompt_len=10, output_len=5, success=True, output_tokens=3, ttft=0.3, e2e=0.7,
                      itl=[0.2, 0.2]),
        RequestRecord(2, prompt_len=10, output_len=5, error="HTTP 503: busy"),
    ]
    assert records[0].tpot == pytest.approx(0.1)  # (0.5 - 0.1) / (5 - 1)
    assert records[1].tpot == pytest.approx(0.2)
    assert records[2].tpot is None
    summary = summarize(records, duration_s=2.0)
    assert (summary.completed, summary.failed) == (2, 1)
    assert summary.total_input_tokens == 12 + 10  # the server's count when it reported one
    assert summary.total_output_tokens == 8
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(4.0)
    assert summary.total_token_throughput == pytest.approx(15.0)
    assert summary.ttft_ms.mean == pytest.approx(200.0)
    assert summary.tpot_ms.p50 == pytest.approx(150.0)
    assert summary.itl_ms.count == 6 and summary.itl_ms.mean == pytest.approx(400 / 3)
    assert summary.e2e_ms.p50 == pytest.approx(600.0)
    table = format_summary(summary)
    assert "TTFT" in table and "Failed requests" in table


def test_arrival_offsets():
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(2000, 10.0, 0)
    assert offsets == arrival_offsets(2000, 10.0, 0)
    assert offsets[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(offsets))
    assert offsets[-1] / (len(offsets) - 1) == pytest.approx(0.1, rel=0.1)  # mean gap 1 / rate


# ---------------------------------------------------------------- end to end


def _serve_args(server, smollm_gguf, result_path, *extra: str) -> list[str]:
    return ["bench", "serve", "--url", server.url, "--model", "smol", "--api-key", API_KEY,
            "--tokenizer", str(smollm_gguf), "--result-json", str(result_path), *extra]


def test_bench_serve_against_pagoda_server(server, smollm_gguf, tmp_path, capsys):
    result_path = tmp_path / "serve.json"
    args = _serve_args(server, smollm_gguf, result_path, "--num-prompts", "4", "--input-len", "32",
                       "--output-len", "8", "--ignore-eos", "--concurrency", "2")
    assert main(args) == 0
    assert "Output token throughput" in capsys.readouterr().out
    result = json.loads(result_path.read_text())
    assert {"duration_s", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"} <= set(
        result["summary"])
    assert result["config"]["concurrency"] == 2 and result["config"]["api_key"] == "***"
    assert result["summary"]["completed"] == 4 and result["summary"]["failed"] == 0
    assert result["summary"]["total_output_tokens"] == 32
    records = result["requests"]
    assert len(records) == 4
    for record in records:
        assert record["success"], record["error"]
        assert record["output_tokens"] == 8
        assert record["prompt_tokens"] == 32  # the server counts the synthetic prompt as exactly --input-len
        assert 0 < record["ttft"] <= record["e2e"] and len(record["itl"]) >= 1


def test_bench_serve_chat_poisson_new_connections(server, smollm_gguf, tmp_path):
    result_path = tmp_path / "chat.json"
    args = _serve_args(server, smollm_gguf, result_path, "--endpoint", "/v1/chat/completions", "--num-prompts", "2",
                       "--input-len", "8", "--output-len", "3", "--ignore-eos", "--request-rate", "20",
                       "--new-connection-per-request", "--warmup", "0")
    assert main(args) == 0
    records = json.loads(result_path.read_text())["requests"]
    assert [(r["success"], r["output_tokens"]) for r in records] == [(True, 3), (True, 3)]


def test_bench_serve_records_failures(server, smollm_gguf, tmp_path):
    result_path = tmp_path / "failed.json"
    args = ["bench", "serve", "--url", server.url, "--api-key", "wrong-key", "--tokenizer", str(smollm_gguf),
            "--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--warmup", "0",
            "--result-json", str(result_path)]
    assert main(args) == 0
    result = json.loads(result_path.read_text())
    assert result["summary"]["completed"] == 0 and result["summary"]["failed"] == 2
    assert all(r["error"].startswith("HTTP 401") for r in result["requests"])
    # With a warm-up, a server that refuses every request stops the benchmark with a usage error.
    assert main([*args[:-4], "--warmup", "1"]) == 2


def test_bench_throughput(smollm_gguf, tmp_path, capsys):
    result_path = tmp_path / "throughput.json"
    args = ["bench", "throughput", "--model", str(smollm_gguf), "--kv-cache-memory", "64MiB", "--num-prompts", "4",
            "--input-len", "8", "--output-len", "3", "--result-json", str(result_path)]
    assert main(args) == 0
    assert "Output token throughput" in capsys.readouterr().out
    result = json.loads(result_path.read_text())["result"]
    assert result["num_requests"] == 4 and result["failed"] == 0
    assert result["total_input_tokens"] == 4 * 8
    assert result["total_output_tokens"] == 4 * 3
    assert result["elapsed_s"] > 0 and result["requests_per_s"] > 0 and result["output_tokens_per_s"] > 0
