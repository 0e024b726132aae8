"""Servers for the HTTP tests: a real `pagoda serve` process, or the app on a uvicorn thread in this process
(for tests that need to reach into the engine, e.g. to make a step fail)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy within {timeout} s")


class ServerProcess:
    """`python -m pagoda.cli serve MODEL --port P ...` on 127.0.0.1; its log goes to a file for post-mortems."""

    def __init__(self, model: Path | str, *args: str, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "pagoda.cli", "serve", str(model), "--port", str(self.port), *args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, timeout: float = 120.0) -> ServerProcess:
        try:
            wait_healthy(self.url, timeout, self.process)
        except BaseException:
            self.stop()
            print(self.log_path.read_text())
            raise
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class InProcessServer:
    """create_app(settings, engine) served by uvicorn on a thread of this process."""

    def __init__(self, settings, engine):
        import uvicorn

        from pagoda.server.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_healthy(self.url, 30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def async_engine(self):
        return self.app.state.pagoda.engine


def metric(text: str, name: str) -> float:
    """The value of an unlabelled-or-single-series metric in Prometheus text format."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    if match is None:
        raise KeyError(name)
    return float(match.group(1))
