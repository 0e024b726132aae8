"""`pagoda bench serve`: a load generator for any OpenAI-compatible server (Pagoda, vLLM, llama.cpp's llama-server).

Every request streams, greedy, with `max_tokens` = its output length and usage in the stream. Requests start at
Poisson arrival times (seeded; all at once for an infinite rate), with at most `concurrency` in flight when set.
A request's clock starts when it is sent, so time spent waiting for a concurrency slot is not counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from tqdm import tqdm

from pagoda.bench.stats import RequestRecord, ServeSummary, summarize
from pagoda.bench.workload import BenchmarkError, BenchRequest, rng_for

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
_ERROR_TEXT_LIMIT = 500  # characters of an error body kept in a record


@dataclass(frozen=True)
class ServeConfig:
    url: str  # the server's base URL, e.g. http://127.0.0.1:8000
    endpoint: str = COMPLETIONS_ENDPOINT
    model: str | None = None  # sent as "model" in the body when given
    api_key: str | None = None
    concurrency: int | None = None  # requests in flight at most; None: no limit
    request_rate: float = math.inf  # requests per second (Poisson arrivals); inf: all at once
    ignore_eos: bool = False
    new_connection_per_request: bool = False
    warmup: int = 1  # requests sent one by one before timing starts
    seed: int = 0
    timeout_s: float = 600.0  # per read; a stream silent for longer fails
    progress: bool = True

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


@dataclass
class ServeResult:
    config: ServeConfig
    summary: ServeSummary
    records: list[RequestRecord]

    def to_json(self) -> dict[str, Any]:
        config = {**asdict(self.config), "api_key": "***" if self.config.api_key else None}
        if math.isinf(self.config.request_rate):
            config["request_rate"] = "inf"  # JSON has no infinity
        return {"config": config, "summary": self.summary.to_json(), "requests": [r.to_json() for r in self.records]}


def request_body(config: ServeConfig, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": request.output_len, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if config.model is not None:
        body["model"] = config.model
    if config.ignore_eos:
        body["ignore_eos"] = True  # an extra field that vLLM and llama-server accept too
    if config.is_chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: the first at 0, then exponential gaps of mean
    1/rate (a Poisson process); all 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * count
    gaps = rng_for(seed, "arrivals").exponential(1.0 / request_rate, size=max(count - 1, 0))
    return [0.0, *(float(t) for t in gaps.cumsum())][:count]


def run_serve_benchmark(config: ServeConfig, requests: Sequence[BenchRequest]) -> ServeResult:
    if not requests:
        raise BenchmarkError("the workload is empty")
    if config.concurrency is not None and config.concurrency < 1:
        raise BenchmarkError("--concurrency must be at least 1")
    if not config.request_rate > 0:
        raise BenchmarkError("--request-rate must be positive")
    return asyncio.run(_run(config, requests))


async def _run(config: ServeConfig, requests: Sequence[BenchRequest]) -> ServeResult:
    async with _open_connections(config) as connections:
        for i in range(config.warmup):
            record = await _send(connections, config, requests[i % len(requests)], index=-1)
            if not record.success:
                raise BenchmarkError(f"the warm-up request to {config.url}{config.endpoint} failed: {record.error}")

        slots = asyncio.Semaphore(config.concurrency) if config.concurrency else None
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not config.progress)

        async def one(index: int, request: BenchRequest) -> RequestRecord:
            if slots is None:
                record = await _send(connections, config, request, index)
            else:
                async with slots:
                    record = await _send(connections, config, request, index)
            bar.update(1)
            return record

        start = time.perf_counter()
        tasks = []
        try:
            for index, (request, offset) in enumerate(
                    zip(requests, arrival_offsets(len(requests), config.request_rate, config.seed))):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(index, request)))
            records = list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        duration = time.perf_counter() - start
    return ServeResult(config, summarize(records, duration), records)


def _new_client(config: ServeConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # No pool limits: the benchmark, not httpx, decides how many requests are in flight.
    return httpx.AsyncClient(base_url=config.url, headers=headers,
                             timeout=httpx.Timeout(config.timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


class _Connections:
    """Where requests get their HTTP client: one shared keep-alive pool, or (when `shared` is None) a fresh
    client, hence a fresh connection, per request."""

    def __init__(self, config: ServeConfig, shared: httpx.AsyncClient | None):
        self._config = config
        self._shared = shared

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._shared is not None:
            yield self._shared
            return
        async with _new_client(self._config) as client:
            yield client


@asynccontextmanager
async def _open_connections(config: ServeConfig) -> AsyncIterator[_Connections]:
    shared = None if config.new_connection_per_request else _new_client(config)
    try:
        yield _Connections(config, shared)
    finally:
        if shared is not None:
            await shared.aclose()


async def _send(connections: _Connections, config: ServeConfig, request: BenchRequest, index: int) -> RequestRecord:
    """Send one streaming request and time it; never raises for a failed request (the record says why)."""
    record = RequestRecord(index=index, prompt_len=request.prompt_len, output_len=request.output_len)
    body = request_body(config, request)
    content_chunks, finished, last_chunk_time = 0, False, 0.0
    start = time.perf_counter()
    try:
        async with connections.client() as client, client.stream("POST", config.endpoint, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:_ERROR_TEXT_LIMIT]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    record.error = str(error.get("message", error) if isinstance(error, dict) else error)
                    return record
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                    record.output_tokens = usage.get("completion_tokens", record.output_tokens)
                for choice in chunk.get("choices") or ():
                    finished = finished or choice.get("finish_reason") is not None
                    if _content_of(choice, config.is_chat):
                        now = time.perf_counter()
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last_chunk_time)
                        last_chunk_time = now
                        content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
        return record
    record.e2e = time.perf_counter() - start
    if not finished:
        record.error = "the stream ended before the response was complete"
        return record
    if not record.output_tokens:  # no usage in the stream: one token per content chunk
        record.output_tokens = content_chunks
    record.success = True
    return record


def _content_of(choice: dict[str, Any], is_chat: bool) -> str:
    if not is_chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking in a separate field; it is generated output all the same.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
