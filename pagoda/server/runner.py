"""Runs the app under uvicorn for `pagoda serve`: the access log, and a bounded graceful shutdown.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections at once and waits for the open ones; the app is told
at that moment (ServerState.begin_shutdown): new requests get 503, running ones have `shutdown_timeout` seconds
to finish, then they are ended with an error event (streams) or a 503 and their blocks are freed. uvicorn's own
`timeout_graceful_shutdown` is a backstop a few seconds later, for a connection that would not close.
"""

from __future__ import annotations

import logging
import signal

import uvicorn
from fastapi import FastAPI

_BACKSTOP_SECONDS = 10.0  # after the cut, for the final events to reach the clients


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets=None) -> None:
        self._app.state.pagoda.begin_shutdown()
        await super().shutdown(sockets)
        # uvicorn re-raises the signal it caught once it is done, so the process would die of SIGTERM (exit
        # 143) after a clean shutdown; an orchestrator's SIGTERM ends in exit 0 instead. Ctrl-C still raises.
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def serve(app: FastAPI, host: str, port: int, *, access_log: bool = False) -> None:
    """Serve until a signal asks to stop; returns after a graceful shutdown."""
    timeout = app.state.pagoda.settings.shutdown_timeout
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                            timeout_keep_alive=30, timeout_graceful_shutdown=int(timeout + _BACKSTOP_SECONDS))
    if access_log:  # uvicorn sets its access logger to log_level, which would hide every line (they are INFO)
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = _Server(config, app)
    settings = app.state.pagoda.settings
    if settings.on_engine_death is None:  # a dead engine (e.g. a lost parallel rank) stops the server
        settings.on_engine_death = lambda: setattr(server, "should_exit", True)
    server.run()
