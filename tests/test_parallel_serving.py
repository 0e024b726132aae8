"""Parallel engines as users run them: the default model (its GGUF blocks, the native stack on every rank) with
TP=2 and PP=2 giving the single rank's tokens, `pagoda serve -tp 2` over HTTP, two torchrun "nodes" on this
machine, and a worker killed mid-request (the request fails, /health turns 503, every process exits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagoda import LLM, SamplingParams
from tests.servers import ServerProcess, free_port, wait_healthy

transformers = pytest.importorskip("transformers")

from tests.tiny_models import save_tiny_model  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def reference(served_llm) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in served_llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_default_model_sharded_gives_the_same_tokens(smollm_gguf, reference, tp, pp):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(smollm_gguf), kv_cache_memory="256MiB", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             progress=False) as llm:
        plans = llm.engine.plans
        assert [p.native_stack for p in plans] == [True, True]  # q4 kernels on each rank's shard
        assert [p.quantization for p in plans] == ["gguf", "gguf"]
        if tp == 2:  # 9 heads in 3 KV groups: whole groups, 1 and 2
            assert [(p.num_heads, p.num_kv_heads) for p in plans] == [(3, 1), (6, 2)]
        else:
            assert [p.layers for p in plans] == [(0, 15), (15, 30)]
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got == reference


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(vocab_size=321, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      initializer_range=0.15, tie_word_embeddings=True)
    return save_tiny_model(tmp_path_factory.mktemp("tiny-served"), config)


def _completion(url: str, prompt: list[int], max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_serve_tp2_and_killed_worker(tiny_dir, tmp_path):
    """`pagoda serve -tp 2` answers like one rank; killing its worker fails the running stream, /health turns
    503, and the server and every worker exit."""
    single = ServerProcess(tiny_dir, "--dtype", "float32", "--quantization", "none", log_dir=tmp_path).start()
    try:
        expected = _completion(single.url, [1, 2, 3, 4], 12)
    finally:
        single.stop()
    server = ServerProcess(tiny_dir, "-tp", "2", "--threads-per-rank", "1", "--dtype", "float32",
                           "--quantization", "none", log_dir=tmp_path).start()
    try:
        assert _completion(server.url, [1, 2, 3, 4], 12) == expected
        engine = httpx.get(f"{server.url}/v1/engine").json()
        assert [r["tp_rank"] for r in engine["ranks"]] == [0, 1]
        workers = _children(server.process.pid)
        assert len(workers) == 1
        body = {"prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = [next(lines) for _ in range(6)]  # the stream is running
            os.kill(workers[0], signal.SIGKILL)
            events += [line for line in lines if line.startswith("data: ")]
        payloads = [e[len("data: "):] for e in events if e.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])
        assert "error" in error and error["error"]["code"] == "engine_dead", error
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503
        server.process.wait(30)
        assert server.process.returncode == 1
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        server.stop()


def test_two_torchrun_nodes_on_localhost(tiny_dir, tmp_path):
    """Two `torchrun --nnodes 2` launches on 127.0.0.1: node 0's rank serves HTTP, node 1's waits for steps."""
    single = ServerProcess(tiny_dir, "--dtype", "float32", "--quantization", "none", log_dir=tmp_path).start()
    try:
        expected = _completion(single.url, [9, 8, 7], 10)
    finally:
        single.stop()
    master, http_port = free_port(), free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    logs = [open(tmp_path / f"node{r}.log", "w") for r in range(2)]
    nodes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
         "--master-port", str(master), "-m", "pagoda", "serve", str(tiny_dir), "-tp", "2", "--port", str(http_port),
         "--dtype", "float32", "--quantization", "none", "--threads-per-rank", "1"],
        stdout=logs[r], stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}) for r in range(2)]
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(url, 180, nodes[0])
        assert _completion(url, [9, 8, 7], 10) == expected
        assert len(httpx.get(f"{url}/v1/engine").json()["ranks"]) == 2
        # Stop the driver (rank 0, node 0's torchrun child) as `pagoda serve` is stopped: it stops node 1's rank,
        # and both torchruns see their ranks leave cleanly. (A signal to torchrun itself makes it tear its ranks
        # down and exit 1, by its design.)
        [driver] = _children(nodes[0].pid)
        os.kill(driver, signal.SIGTERM)
        for node in nodes:
            node.wait(60)
        assert [node.returncode for node in nodes] == [0, 0], [(tmp_path / f"node{r}.log").read_text()
                                                               for r in range(2)]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
        for log in logs:
            log.close()
