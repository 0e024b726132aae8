"""Does the HTTP side stay responsive while the engine is saturated?

Sends N concurrent streaming chat requests (default 64) to a Pagoda server and polls GET /health every 50 ms
meanwhile; reports /health latency percentiles, whether every stream completed correctly, and throughput.

    .venv/bin/python benchmarks/health_under_load.py                 # starts `pagoda serve` on the default model
    .venv/bin/python benchmarks/health_under_load.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import free_port, wait_healthy

TOPICS = ["the sea", "mountains", "a city at night", "autumn", "a robot", "coffee", "trains", "the moon"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_stream(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Write a short story about {TOPICS[index % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, finish, usage, done = None, "", None, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece and first is None:
                    first = time.perf_counter()
                text += piece or ""
                finish = choice["finish_reason"] or finish
    ok = done and finish in ("stop", "length") and bool(text) and usage is not None
    return {"ok": ok, "ttft": (first or time.perf_counter()) - start, "e2e": time.perf_counter() - start,
            "tokens": usage["completion_tokens"] if usage else 0}


async def poll_health(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            response = await client.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
            await asyncio.sleep(0.05)
    return latencies


async def run(url: str, concurrency: int, max_tokens: int) -> dict:
    stop = asyncio.Event()
    health = asyncio.create_task(poll_health(url, stop))
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, i, max_tokens) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    stop.set()
    latencies = await health
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "completed_ok": sum(r["ok"] for r in results), "seconds": round(elapsed, 2),
        "output_tokens": tokens, "output_tok_per_s": round(tokens / elapsed, 1),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 3),
        "health_polls": len(latencies),
        "health_p50_ms": round(1000 * statistics.median(latencies), 1),
        "health_p99_ms": round(1000 * percentile(latencies, 99), 1),
        "health_max_ms": round(1000 * max(latencies), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `pagoda serve` on --model)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "pagoda.cli", "--log-level", "WARNING", "serve", args.model,
                                   "--port", str(port)])
        wait_healthy(url, 180, server)
    try:
        result = asyncio.run(run(url, args.concurrency, args.max_tokens))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(json.dumps(result, indent=2))
    return 0 if result["completed_ok"] == args.concurrency else 1


if __name__ == "__main__":
    sys.exit(main())
