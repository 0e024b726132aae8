"""Server behaviour under faults, on the app served in-process so the tests can reach into the engine: a failing
step, a dead engine loop, a model that is loading or failed to load, overload (--max-waiting) and deadlines
(--request-timeout)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from pagoda.engine.llm_engine import EngineConfig, LLMEngine
from pagoda.server.app import ServerSettings
from tests.servers import InProcessServer, wait_healthy

LONG = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
SHORT = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def engine_config(smollm_gguf) -> EngineConfig:
    return EngineConfig(model=str(smollm_gguf), kv_cache_memory="64MiB", max_model_len=1024)


@pytest.fixture(scope="module")
def engine(engine_config) -> LLMEngine:
    return LLMEngine(engine_config)


def settings(config: EngineConfig, **kwargs) -> ServerSettings:
    return ServerSettings(engine=config, served_model_name="smol", **kwargs)


def poll_health(url: str, ready: Callable[[httpx.Response], bool], timeout: float = 10.0) -> httpx.Response:
    """GET /health until the server answers and `ready(response)` holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(f"{url}/health")
            if ready(response) or time.monotonic() > deadline:
                return response
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_failing_step_fails_only_its_requests(engine, engine_config, monkeypatch):
    with InProcessServer(settings(engine_config), engine) as server:
        real_execute = engine.runner.execute
        calls = {"n": 0}

        def flaky(scheduled):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected kernel failure")
            return real_execute(scheduled)

        monkeypatch.setattr(engine.runner, "execute", flaky)
        response = httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "injected kernel failure" in error["message"]
        # The server is still up and the next request succeeds.
        assert httpx.get(f"{server.url}/health").status_code == 200
        ok = httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3

        # A stream that fails mid-way ends with an error event, then [DONE].
        calls["n"] = -3
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**SHORT, "stream": True, "max_tokens": 8},
                          timeout=60) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "injected kernel failure" in json.loads(events[-2])["error"]["message"]
        assert any(json.loads(e).get("choices") for e in events[:-2])  # some tokens came before the failure
    assert_idle(engine)


def test_dead_engine_loop_reports_unhealthy(engine_config):
    engine = LLMEngine(engine_config)
    with InProcessServer(settings(engine_config), engine) as server:
        def broken_schedule():
            raise AssertionError("scheduler invariant broken")

        engine.scheduler.schedule = broken_schedule
        response = httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60)
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "engine_dead"
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        refused = httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60)
        assert refused.status_code == 503


def test_health_while_loading_and_after_failed_load(engine_config, monkeypatch, tmp_path):
    import pagoda.server.app as app_module

    release = threading.Event()
    real = app_module.LLMEngine

    def slow_engine(config, progress=False, launch=None):
        release.wait(30)
        return real(config, progress=progress, launch=launch)

    monkeypatch.setattr(app_module, "LLMEngine", slow_engine)
    server = InProcessServer(settings(engine_config), None)
    server.thread.start()
    try:
        health = poll_health(server.url, lambda r: True)
        assert health.status_code == 503 and health.json()["error"]["code"] == "loading"
        assert health.headers["retry-after"]
        assert httpx.post(f"{server.url}/v1/completions", json=SHORT).status_code == 503
        release.set()
        wait_healthy(server.url, 30)
        assert httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60).status_code == 200
    finally:
        release.set()
        server.__exit__()

    broken = EngineConfig(model=str(tmp_path / "missing.gguf"))
    server = InProcessServer(settings(broken), None)
    server.thread.start()
    try:
        health = poll_health(server.url, lambda r: r.json()["error"]["code"] == "load_failed")
        assert health.status_code == 503 and "missing.gguf" in health.json()["error"]["message"]
    finally:
        server.__exit__()


def test_max_waiting_refuses_with_retry_after(engine, engine_config):
    original = engine.scheduler.config
    engine.scheduler.config = dataclasses.replace(original, max_num_seqs=1)  # one runs, the rest wait
    try:
        with InProcessServer(settings(engine_config, max_waiting=2), engine) as server:
            async def burst():
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                    return await asyncio.gather(*(client.post("/v1/completions", json={**LONG, "max_tokens": 40})
                                                  for _ in range(6)))

            statuses = asyncio.run(burst())
            codes = sorted(r.status_code for r in statuses)
            assert 200 in codes and 503 in codes, codes
            refused = next(r for r in statuses if r.status_code == 503)
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
    finally:
        engine.scheduler.config = original
    assert_idle(engine)


def test_request_timeout_aborts(engine, engine_config):
    with InProcessServer(settings(engine_config, request_timeout=0.5), engine) as server:
        response = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as streamed:
            events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        # Aborted within a step: by the time the next request is answered, nothing is held.
        assert httpx.post(f"{server.url}/v1/completions", json=SHORT, timeout=60).status_code == 200
    assert_idle(engine)
