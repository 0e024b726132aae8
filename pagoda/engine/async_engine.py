"""AsyncEngine: runs the LLMEngine loop on a background thread and gives each request an async stream.

Threading contract (the only place pagoda has two threads):
- The engine thread owns the LLMEngine: it alone calls add_request / abort_request / step.
- The event loop talks to it through a command queue (add, abort); the engine thread drains the queue before
  every step, so an abort takes effect within one step, and hands each step's outputs back with a single
  `call_soon_threadsafe`.
- Prompt tokenization and validation run on the caller's side (they read only immutable engine state), so a bad
  request is refused before it reaches the engine.
- Admission (`max_waiting`) is decided on the event loop when a request is admitted, before its response starts
  (engine/admission.py); at shutdown `close()` refuses new requests and `cut()` ends the ones still running.

A thread rather than a process: the model's heavy work runs in torch kernels that release the GIL, and the event
loop only needs a few milliseconds per step; docs/architecture.md has the measurement.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from pagoda.engine.admission import Admission, EngineOverloadedError, Ticket
from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer.tokenizer import TooManyTokensError

logger = logging.getLogger("pagoda")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; no request can be served until a restart."""


__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "EngineShuttingDownError",
           "RequestFailedError", "RequestTimeoutError"]


class EngineShuttingDownError(RuntimeError):
    """The server is shutting down: it takes no new requests, and ends those still running past its deadline."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (e.g. an exception inside its step); other requests go on."""


class RequestTimeoutError(TimeoutError):
    """The request ran past its deadline and was aborted."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    arrival_time: float


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # command: leave the loop
StepListener = Callable[[EngineStats, list[RequestOutput]], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int | None = None,
                 step_listener: StepListener | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        """`max_waiting`: refuse new requests while this many are queued and not yet running (None: no limit;
        see engine/admission.py). `step_listener` is called on the engine thread after every step, with the
        engine's stats and the step's outputs (for metrics); it must be quick and thread-safe. `on_dead` is called
        (from any thread) once the engine can serve no more: its loop died, or one of its parallel ranks did."""
        self.engine = engine
        self._on_dead = on_dead
        engine.dead_listeners.append(self._engine_died)
        self.tokenizer = engine.tokenizer
        self.admission = Admission(max_waiting)
        self._step_listener = step_listener
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_applied = 0  # engine thread: scheduler requests added since its last report
        self._closed: EngineShuttingDownError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead_error: BaseException | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the streams."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    # ---- requests (event-loop side) ----------------------------------------------------------------------

    @staticmethod
    def new_request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def prepare(self, prompt: str | Sequence[int], params: SamplingParams, *, add_special_tokens: bool = True,
                truncate_prompt_tokens: int | None = None) -> tuple[str | None, list[int]]:
        """Tokenize and validate a prompt without queueing it; any thread may call it (immutable state only).
        `truncate_prompt_tokens` keeps the last k tokens (-1: as many as leave room for one generated token),
        and the text is then dropped (it no longer matches). Raises SamplingParamsError (and subclasses)."""
        if isinstance(prompt, str):
            # Without truncation a prompt over the context is refused by its count alone (see encode_bounded)
            bound = self.engine.max_model_len - 1 if truncate_prompt_tokens is None else None
            try:
                text, prompt_ids = prompt, self.tokenizer.encode_bounded(prompt, add_special_tokens,
                                                                         max_tokens=bound)
            except TooManyTokensError as exc:
                raise self.engine.prompt_too_long(exc.count) from None
        else:
            text, prompt_ids = self.engine.process_prompt(prompt)
        if truncate_prompt_tokens is not None:
            keep = self.engine.max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if len(prompt_ids) > keep:
                text, prompt_ids = None, prompt_ids[-keep:]
        self.engine.validate_prompt(prompt_ids, params)
        return text, prompt_ids

    def admit(self, num_requests: int) -> Ticket:
        """Reserve room for an HTTP request's `num_requests` scheduler requests (prompts × n) before its
        response starts. Raises EngineDeadError, EngineShuttingDownError or EngineOverloadedError."""
        self._check_open()
        return self.admission.admit(num_requests)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                       prompt_text: str | None = None, timeout: float | None = None,
                       ticket: Ticket | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a prepared request and yield its outputs until it finishes. Leaving the iteration early
        (client gone, task cancelled) aborts the request. `ticket`: its admission (else it is admitted here).
        Raises EngineDeadError, EngineShuttingDownError, EngineOverloadedError, RequestFailedError or
        RequestTimeoutError."""
        if ticket is None:
            ticket = self.admit(params.n)
        self._check_open()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        ticket.send(params.n)
        self._commands.put(_Add(request_id, prompt_ids, prompt_text, params, time.monotonic()))
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RequestTimeoutError(f"the request did not finish within {timeout:g} s")
                try:
                    item = await asyncio.wait_for(stream.get(), remaining)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"the request did not finish within {timeout:g} s") from None
                if isinstance(item, BaseException):  # not finished: the abort below frees its blocks (a cut)
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def _check_open(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead_error!r}")
        if self._closed is not None:
            raise self._closed

    # ---- shutdown (event-loop side) ----------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Refuse every new request from now on (EngineShuttingDownError); running ones go on."""
        self._closed = EngineShuttingDownError(reason)

    @property
    def active_request_ids(self) -> list[str]:
        return list(self._streams)

    def cut(self, reason: str) -> list[str]:
        """End every running request now: its stream raises EngineShuttingDownError, and leaving the stream
        aborts it in the engine (blocks freed within a step). Returns the ids that were cut."""
        self.close(reason)
        cut = self.active_request_ids
        self._fail_all(EngineShuttingDownError(reason))
        return cut

    # ---- the engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    return
                outputs = engine.step()
                stats = engine.stats()
                if self._step_listener is not None:
                    self._step_listener(stats, outputs)
                self._deliver(outputs, stats.num_waiting)
        except BaseException as exc:  # an engine bug: fail every stream, report unhealthy
            logger.exception("the engine loop died")
            self._engine_died(exc)

    def _engine_died(self, error: BaseException) -> None:
        """The engine can serve no more (any thread): fail every stream, stop the loop, tell the owner once."""
        if self.dead_error is not None:
            return
        self.dead_error = error
        self._commands.put(_STOP)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine stopped: {error!r}"))
        if self._on_dead is not None:
            self._on_dead(error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command; when `block`, wait for at least one. False when asked to stop."""
        outputs: list[RequestOutput] = []
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                break
            block = False
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                self._num_applied += command.params.n
                try:
                    self.engine.add_request(command.request_id, command.prompt_ids, command.params,
                                            arrival_time=command.arrival_time)
                except ValueError as exc:  # validated already; only a race (e.g. duplicate id) lands here
                    self._loop.call_soon_threadsafe(self._put, command.request_id, RequestFailedError(str(exc)))
            else:
                outputs.extend(self.engine.abort_request(command.request_id))
        if outputs:  # aborted requests' streams are gone; nothing to deliver, but the listener counts them
            if self._step_listener is not None:
                self._step_listener(self.engine.stats(), outputs)
        return True

    def _deliver(self, outputs: list[RequestOutput], num_waiting: int) -> None:
        applied, self._num_applied = self._num_applied, 0
        self._loop.call_soon_threadsafe(self._dispatch, outputs, num_waiting, applied)

    # ---- event-loop callbacks ----------------------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput], num_waiting: int, num_applied: int) -> None:
        self.admission.report(num_waiting, num_applied)
        for out in outputs:
            self._put(out.request_id, out)

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
