"""The HTTP server: FastAPI app with OpenAI-compatible routes, SSE streaming, errors in OpenAI's shape, API-key
auth, health, metrics and the web chat page.

The app starts listening before the model is loaded (GET /health answers 503 until it is ready); the engine then
runs on its own thread (engine/async_engine.py). Every request is validated completely before it is queued; its
CPU work (parsing, validation, tokenization, templates) runs on a thread pool (request_body.py), not the event
loop. Admission (--max-waiting) is decided before a response starts; at shutdown (SIGTERM) new requests get 503
and running ones have --shutdown-timeout seconds to finish before they are cut.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagoda
from pagoda.engine.admission import Ticket
from pagoda.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineShuttingDownError,
    RequestFailedError,
    RequestTimeoutError,
)
from pagoda.engine.llm_engine import EngineConfig, LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.parallel.executor import Launch
from pagoda.sampling_params import SamplingParams, SamplingParamsError
from pagoda.server import responses as R
from pagoda.server.chat_reasoning import ChatReasoning
from pagoda.server.field_policy import unrecognized_message
from pagoda.server.metrics import CONTENT_TYPE, ServerMetrics
from pagoda.server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from pagoda.server.protocol import (
    PROMPT_TAGS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagoda.server.request_body import CpuPool, json_body
from pagoda.server.tokenizer_info import tokenizer_info
from pagoda.tokenizer.reasoning import REASONING_PARSER_CHOICES, ReasoningParser, resolve_reasoning_parser

logger = logging.getLogger("pagoda.server")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_name: str | None = None  # default: the model argument's last path component
    api_key: str | None = None
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    max_waiting: int | None = None  # queued requests beyond which new ones get 503 + Retry-After
    max_request_bytes: int = 2 * 1024 * 1024  # larger bodies get 413 before they are read
    shutdown_timeout: float = 30.0  # seconds running requests may take to finish after SIGTERM
    progress: bool = False  # progress bars while loading (the CLI's terminal)
    url: str | None = None  # where clients reach us, for the log line that says we are ready
    # Called (on the event loop) when the engine has died, e.g. a parallel rank was lost: `pagoda serve` then
    # stops, so an orchestrator restarts it. None in tests that serve an engine in-process.
    on_engine_death: Callable[[], None] | None = None
    launch: Launch | None = None  # how a parallel engine meets its ranks (default: spawned here)
    reasoning_parser: str = "auto"  # "qwen3", "none", or "auto": qwen3 if the chat template has think tags

    def __post_init__(self) -> None:
        if self.reasoning_parser not in REASONING_PARSER_CHOICES:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; choose one of "
                             f"{', '.join(REASONING_PARSER_CHOICES)}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.engine.model).name.removesuffix(".gguf")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(R.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def api_error_from(exc: BaseException) -> APIError:
    """The HTTP answer for an exception raised while preparing or running a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=exc.param, code=getattr(exc, "code", None))
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), "server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineShuttingDownError):
        return APIError(503, str(exc), "server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), "server_error", code="engine_dead")
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "server_error", code="timeout")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"the engine failed this request: {exc}", "server_error", code="engine_error")
    if isinstance(exc, ValueError):  # e.g. a chat template that raised, a model without a template
        return APIError(400, str(exc))
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    engine: AsyncEngine | None = None
    reasoning_parser: ReasoningParser | None = None  # resolved once the model (its chat template) is loaded
    load_error: BaseException | None = None
    started: float = field(default_factory=time.time)
    cpu: CpuPool = field(default_factory=CpuPool)
    draining: bool = False
    _cut_timer: asyncio.TimerHandle | None = None

    def ready_engine(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", "server_error",
                               code="load_failed")
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="loading",
                           headers={"Retry-After": "2"})
        if self.engine.dead_error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.dead_error!r}", "server_error",
                           code="engine_dead")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.settings.model_name, self.settings.engine.model):
            raise APIError(404, f"The model `{model[:256]}` does not exist. This server serves "
                                f"`{self.settings.model_name}`.", param="model", code="model_not_found")

    # ---- shutdown: SIGTERM → drain for shutdown_timeout seconds → cut ----------------------------------------

    def begin_shutdown(self) -> None:
        """Called on the event loop when the server starts shutting down (it has stopped accepting
        connections): refuse new requests now, cut the running ones after `shutdown_timeout` seconds."""
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.shutdown_timeout
        if self.engine is None:
            return
        self.engine.close("the server is shutting down")
        running = self.engine.active_request_ids
        logger.info("shutting down: %d requests running get up to %g s to finish", len(running), timeout)
        if running:
            self._cut_timer = asyncio.get_running_loop().call_later(timeout, self._cut)

    def _cut(self) -> None:
        timeout = self.settings.shutdown_timeout
        cut = self.engine.cut(f"the server shut down before this request finished ({timeout:g} s after SIGTERM)")
        if cut:
            logger.warning("shutdown: cut %d requests still running after %g s: %s", len(cut), timeout,
                           ", ".join(cut))

    def end(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        if self.engine is not None:
            self.engine.shutdown()
            stats = self.engine.engine.stats()
            logger.info("engine stopped: %d requests left, %d KV blocks in use", stats.num_running +
                        stats.num_waiting, stats.num_blocks - stats.num_free_blocks)
        self.cpu.shutdown()


class _Body:
    """`body: _Body[Model]`: the request body parsed and validated as Model off the event loop."""

    def __class_getitem__(cls, model: type) -> Any:
        return Annotated[model, Depends(json_body(model))]


def create_app(settings: ServerSettings, engine: LLMEngine | None = None) -> FastAPI:
    """The app. Given an `engine`, it serves that one; otherwise it loads settings.engine on start-up."""
    state = ServerState(settings, ServerMetrics(settings.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def on_dead(error: BaseException) -> None:
            if settings.on_engine_death is not None:
                logger.error("the engine died (%s): stopping the server", error)
                # a moment for the failed streams to send their error events
                loop.call_soon_threadsafe(loop.call_later, 1.0, settings.on_engine_death)

        def serve(llm_engine: LLMEngine) -> None:
            state.reasoning_parser, why = resolve_reasoning_parser(settings.reasoning_parser,
                                                                   llm_engine.tokenizer.chat_template)
            logger.info("reasoning parser: %s (%s)", state.reasoning_parser.name if state.reasoning_parser
                        else "none", why)
            async_engine = AsyncEngine(llm_engine, max_waiting=settings.max_waiting,
                                       step_listener=state.metrics.on_step, on_dead=on_dead)
            state.metrics.on_engine_ready(llm_engine)
            async_engine.start()
            state.engine = async_engine
            logger.info("ready: serving %s%s", settings.model_name, f" at {settings.url}" if settings.url else "")

        def load() -> None:
            try:
                llm_engine = LLMEngine(settings.engine, progress=settings.progress, launch=settings.launch)
            except BaseException as exc:  # reported by /health and every route
                logger.exception("loading %s failed", settings.engine.model)
                state.load_error = exc
                return
            loop.call_soon_threadsafe(serve, llm_engine)

        if engine is not None:
            serve(engine)
        else:
            threading.Thread(target=load, name="pagoda-load", daemon=True).start()
        yield
        state.end()

    app = FastAPI(title="Pagoda", version=pagoda.__version__, lifespan=lifespan)
    app.state.pagoda = state
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so a 413 carries the id too

    async def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    auth = [Depends(require_api_key)]

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> Response:
        try:
            state.ready_engine()
        except APIError as exc:
            return exc.response()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.get("/v1/engine")
    async def engine_info() -> dict[str, Any]:
        """The execution plan of every rank: what "auto" resolved to on this host, and the parallel layout."""
        engine = state.ready_engine().engine
        return {"model": settings.model_name, "max_model_len": engine.max_model_len,
                "kv_cache_blocks": engine.kv_layout.num_blocks, "block_size": engine.kv_layout.block_size,
                "kv_cache_tokens": engine.kv_layout.num_tokens, "max_concurrency": engine.max_concurrency,
                "ranks": [plan.as_dict() for plan in engine.plans]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        engine = state.engine
        return {"id": settings.model_name, "object": "model", "created": int(state.started), "owned_by": "pagoda",
                "root": settings.engine.model, "max_model_len": engine.engine.max_model_len if engine else None}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card()

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: _Body[TokenizeRequest]) -> Response:
        state.check_model(body.model)
        body.check_supported()
        return await state.cpu.run(_tokenize, state.ready_engine(), body)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: _Body[DetokenizeRequest]) -> Response:
        state.check_model(body.model)
        return await state.cpu.run(_detokenize, state.ready_engine(), body)

    @app.get("/tokenizer_info", dependencies=auth)
    async def get_tokenizer_info() -> dict[str, Any]:
        engine = state.ready_engine()
        return tokenizer_info(engine.tokenizer, engine.engine.max_model_len)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: _Body[CompletionRequest]) -> Response:
        state.check_model(body.model)
        engine = state.ready_engine()
        body.check_supported()
        params = body.sampling_params(body.max_tokens, body.logprobs, body.engine_prompt_logprobs())
        prepared = await state.cpu.run(_prepare_completion, engine, body, params)
        rid = _request_id(request, body)
        jobs = [_Job(engine.new_request_id(f"cmpl-{rid}"), text, ids, params) for text, ids in prepared]
        return await _respond(request, engine, body.stream, _CompletionFormatter(engine, body, jobs),
                              settings.request_timeout)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, body: _Body[ChatCompletionRequest]) -> Response:
        state.check_model(body.model)
        engine = state.ready_engine()
        body.check_supported()
        params = body.sampling_params(body.effective_max_tokens(), body.logprobs_k())
        text, prompt_ids = await state.cpu.run(_prepare_chat, engine, body, params)
        jobs = [_Job(engine.new_request_id(f"chatcmpl-{_request_id(request, body)}"), None, prompt_ids, params)]
        parser = state.reasoning_parser
        reasoning = None if parser is None else ChatReasoning(
            parser, parser.start_of(text, body.template_kwargs().get("enable_thinking")))
        return await _respond(request, engine, body.stream, _ChatFormatter(engine, body, jobs, reasoning),
                              settings.request_timeout)

    return app


# ---- a request's CPU work: these run on the CpuPool, never on the event loop -----------------------------------


def _prepare_completion(engine: AsyncEngine, body: CompletionRequest, params: SamplingParams
                        ) -> list[tuple[str | None, list[int]]]:
    return [engine.prepare(p, params, add_special_tokens=body.add_special_tokens,
                           truncate_prompt_tokens=body.truncate_prompt_tokens) for p in body.prompts()]


def _prepare_chat(engine: AsyncEngine, body: ChatCompletionRequest, params: SamplingParams
                  ) -> tuple[str, list[int]]:
    """The rendered prompt (the reasoning split reads where it ends) and its token ids."""
    text = _render_chat(engine.tokenizer, body.template_messages(), body.add_generation_prompt,
                        body.template_kwargs())
    try:
        _, prompt_ids = engine.prepare(text, params, add_special_tokens=body.add_special_tokens,
                                       truncate_prompt_tokens=body.truncate_prompt_tokens)
    except SamplingParamsError as exc:
        raise body.in_chat_terms(exc) from None
    return text, prompt_ids


def _tokenize(engine: AsyncEngine, body: TokenizeRequest) -> Response:
    tokenizer = engine.tokenizer
    if body.messages is not None:
        text = _render_chat(tokenizer, [m.to_template(i) for i, m in enumerate(body.messages)],
                            body.add_generation_prompt, body.template_kwargs())
        ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    result: dict[str, Any] = {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}
    if body.return_token_strs:
        result["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
    return JSONResponse(result)


def _detokenize(engine: AsyncEngine, body: DetokenizeRequest) -> Response:
    vocab = engine.engine.model_config.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)})


def _request_id(request: Request, body: Any = None) -> str:
    """The request's id: the client's X-Request-Id, else the body's `request_id` (vLLM's field), else a fresh one
    (RequestIdMiddleware). It names the response (`chatcmpl-<id>`), the log lines and the engine requests."""
    body_id = getattr(body, "request_id", None)
    if body_id is not None and not request.state.request_id_from_client:
        request.state.request_id = body_id
    return request.state.request_id


def _render_chat(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool,
                 kwargs: dict[str, Any]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except ValueError as exc:
        raise APIError(400, f"the chat template could not format these messages: {exc}", param="messages") from exc


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SamplingParamsError)
    async def on_params_error(request: Request, exc: SamplingParamsError) -> JSONResponse:
        return api_error_from(exc).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                            code="invalid_json").response()
        loc = [p for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "missing" and not loc:
            return APIError(400, "the request body must be a JSON object").response()
        param = _param_path(loc)
        if first.get("type") == "extra_forbidden":
            return APIError(400, unrecognized_message(param[:256]), param=param[:256],
                            code="unrecognized_field").response()
        details = "; ".join(f"{_param_path([p for p in e.get('loc', ()) if p != 'body']) or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return APIError(400, f"Invalid request: {details}", param=param or None,
                        code="missing_required_parameter" if first.get("type") == "missing" else "invalid_type"
                        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(R.error_body(str(exc.detail), type_, None, code), exc.status_code)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param_path(loc) -> str:
    """pydantic's error location as OpenAI's `param`: "messages[0].content"."""
    path = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _UNION_TAGS or part.startswith("function-") \
                or (previous == "prompt" and part in PROMPT_TAGS):
            continue  # pydantic's label of a union member (e.g. "list[int]"), not a field name
        else:
            path += ("." if path else "") + str(part)
        previous = part
    return path


# ---- running requests ------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One engine request of an HTTP request (a completions request may hold several prompts)."""

    request_id: str
    prompt_text: str | None
    prompt_ids: list[int]
    params: SamplingParams


async def _merged(engine: AsyncEngine, jobs: list[_Job], timeout: float | None, ticket: Ticket
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of all jobs as they come, tagged with the job's index. Leaving early aborts every job."""
    if len(jobs) == 1:
        job = jobs[0]
        async for out in engine.generate(job.request_id, job.prompt_ids, job.params, prompt_text=job.prompt_text,
                                         timeout=timeout, ticket=ticket):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, job: _Job) -> None:
        try:
            async for out in engine.generate(job.request_id, job.prompt_ids, job.params,
                                             prompt_text=job.prompt_text, timeout=timeout, ticket=ticket):
                queue.put_nowait((index, out))
            queue.put_nowait((index, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Formatter(ABC):
    """Turns the jobs' outputs into one OpenAI response (whole or streamed). Choice index = job * n + sample."""

    chunk_object = ""

    def __init__(self, engine: AsyncEngine, body, jobs: list[_Job], prefix: str):
        self.engine = engine
        self.body = body
        self.jobs = jobs
        self.n = body.n
        self.prefix = prefix
        self.ids = R.ResponseIds(jobs[0].request_id if len(jobs) == 1 else engine.new_request_id(prefix),
                                 body.model or "")
        self.logprobs = R.LogprobsFormatter(engine.tokenizer)
        self._finished: set[int] = set()

    def first_finish(self, index: int) -> bool:
        """True the first time choice `index` is seen finished (later outputs repeat the final state)."""
        if index in self._finished:
            return False
        self._finished.add(index)
        return True

    @abstractmethod
    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        """The whole response, from each job's final output."""

    @abstractmethod
    def first_chunks(self) -> list[dict[str, Any]]:
        """Stream chunks sent before any token (chat: the role; completions: the echoed prompt)."""

    @abstractmethod
    def chunks(self, job: int, out: RequestOutput) -> list[dict[str, Any]]:
        """Stream chunks for one step's output of a job."""


class _CompletionFormatter(_Formatter):
    chunk_object = "text_completion"

    def __init__(self, engine: AsyncEngine, body: CompletionRequest, jobs: list[_Job]):
        super().__init__(engine, body, jobs, "cmpl")
        self.offsets: dict[int, int] = {}
        self.pending_echo: set[int] = set()  # choices whose echo waits for the prompt's logprobs

    def _echo(self, job: _Job) -> str:
        if not self.body.echo:
            return ""
        if job.prompt_text is not None:
            return job.prompt_text
        return self.engine.tokenizer.decode(job.prompt_ids, skip_special_tokens=False)

    @property
    def _echo_logprobs(self) -> bool:
        """The echoed prompt carries logprobs, which exist only once the engine has run the prompt."""
        return self.body.echo and self.body.logprobs is not None

    def _prompt_table(self, job: int, out: RequestOutput) -> dict[str, Any]:
        return self.logprobs.echoed_prompt(self.jobs[job].prompt_ids, out.prompt_logprobs, self.body.logprobs)

    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for j, out in enumerate(outputs):
            echo = self._echo(self.jobs[j])
            prompt_table = self._prompt_table(j, out) if self._echo_logprobs else None
            for sample in out.outputs:
                logprobs = None
                if sample.logprobs is not None:
                    logprobs = self.logprobs.completion(sample.logprobs, len(echo), self.body.logprobs)
                    if prompt_table is not None:
                        logprobs = self.logprobs.joined(prompt_table, logprobs)
                choice = R.completion_choice(j * self.n + sample.index, echo + sample.text, sample.finish_reason,
                                             logprobs, sample.stop_reason)
                if self.body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self.logprobs.vllm_prompt_logprobs(
                        self.jobs[j].prompt_ids, out.prompt_logprobs, self.body.prompt_logprobs)
                choices.append(choice)
        return {**self.ids.base("text_completion"), "choices": choices, "usage": R.usage_of(outputs)}

    def first_chunks(self) -> list[dict[str, Any]]:
        chunks = []
        for j, job in enumerate(self.jobs):
            echo = self._echo(job)
            for i in range(self.n):
                self.offsets[j * self.n + i] = len(echo)
                if echo and self._echo_logprobs:
                    self.pending_echo.add(j * self.n + i)  # sent with its logprobs, see chunks()
                elif echo:
                    chunks.append(R.completion_chunk(self.ids, j * self.n + i, echo))
        return chunks

    def chunks(self, job: int, out: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        for sample in out.outputs:
            index = job * self.n + sample.index
            text, token_ids, logprobs = sample.delta_text, sample.delta_token_ids, sample.delta_logprobs
            if index in self.pending_echo and out.prompt_logprobs is not None:
                # The echo goes first, with the prompt's logprobs. Only the first sample computes them, so
                # another may have tokens already: they follow the echo at once.
                self.pending_echo.discard(index)
                chunks.append(R.completion_chunk(self.ids, index, self._echo(self.jobs[job]), None,
                                                 self._prompt_table(job, out)))
                text, token_ids, logprobs = sample.text, sample.token_ids, sample.logprobs
            if index not in self.pending_echo and (text or token_ids):
                table = None
                if sample.logprobs is not None:
                    table = self.logprobs.completion(logprobs, self.offsets.get(index, 0), self.body.logprobs)
                self.offsets[index] = self.offsets.get(index, 0) + len(text)
                chunks.append(R.completion_chunk(self.ids, index, text, None, table))
            if sample.finish_reason is not None and index not in self.pending_echo and self.first_finish(index):
                chunks.append(R.completion_chunk(self.ids, index, "", sample.finish_reason))
        return chunks


class _ChatFormatter(_Formatter):
    chunk_object = "chat.completion.chunk"

    def __init__(self, engine: AsyncEngine, body: ChatCompletionRequest, jobs: list[_Job],
                 reasoning: ChatReasoning | None = None):
        super().__init__(engine, body, jobs, "chatcmpl")
        self.reasoning = reasoning
        # With a reasoning split, the logprobs of tokens whose text is held back (part of a tag) wait for the
        # next chunk that has text, or the finish chunk: no chunk with an empty delta, no logprob lost.
        self._pending_logprobs: dict[int, list] = {}
        self._role_sent: set[int] = set()

    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        [out] = outputs
        choices = []
        for s in out.outputs:
            reasoning, content = (None, s.text) if self.reasoning is None else self.reasoning.message(s.text)
            choices.append(R.chat_choice(s.index, content, s.finish_reason,
                                         None if s.logprobs is None else self.logprobs.chat(s.logprobs),
                                         s.stop_reason, reasoning))
        body = {**self.ids.base("chat.completion"), "choices": choices, "usage": R.usage_of(outputs)}
        if self.body.prompt_logprobs is not None:  # vLLM's field, on the response (one prompt per chat)
            body["prompt_logprobs"] = self.logprobs.vllm_prompt_logprobs(self.jobs[0].prompt_ids, out.prompt_logprobs,
                                                                         self.body.prompt_logprobs)
        return body

    def first_chunks(self) -> list[dict[str, Any]]:
        return []  # the role comes with each choice's first token, so a client's time to first chunk is TTFT

    def chunks(self, job: int, out: RequestOutput) -> list[dict[str, Any]]:
        if self.reasoning is not None:
            return self._reasoning_chunks(out)
        chunks = []
        for sample in out.outputs:
            if sample.delta_text or sample.delta_token_ids:
                logprobs = None if sample.logprobs is None else self.logprobs.chat(sample.delta_logprobs)
                delta = self._with_role(sample.index, {"content": sample.delta_text})
                chunks.append(R.chat_chunk(self.ids, sample.index, delta, None, logprobs))
            if sample.finish_reason is not None and self.first_finish(sample.index):
                chunks.append(R.chat_chunk(self.ids, sample.index, {}, sample.finish_reason))
        return chunks

    def _reasoning_chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        for sample in out.outputs:
            index = sample.index
            if sample.logprobs is not None:
                self._pending_logprobs.setdefault(index, []).extend(sample.delta_logprobs)
            delta = self.reasoning.delta(index, sample.delta_text, sample.finished)
            if delta:
                chunks.append(R.chat_chunk(self.ids, index, self._with_role(index, delta), None,
                                           self._take_logprobs(index)))
            if sample.finish_reason is not None and self.first_finish(index):
                chunks.append(R.chat_chunk(self.ids, index, self._with_role(index, {}), sample.finish_reason,
                                           self._take_logprobs(index)))
        return chunks

    def _with_role(self, index: int, delta: dict[str, Any]) -> dict[str, Any]:
        """The delta, with the role when it is the choice's first chunk."""
        if index in self._role_sent:
            return delta
        self._role_sent.add(index)
        return {"role": "assistant", **delta}

    def _take_logprobs(self, index: int) -> dict[str, Any] | None:
        pending = self._pending_logprobs.pop(index, None)
        return self.logprobs.chat(pending) if pending else None


async def _respond(request: Request, engine: AsyncEngine, stream: bool, formatter: _Formatter,
                   timeout: float | None) -> Response:
    request_id = _request_id(request)
    try:  # admit or refuse before any work, and before a stream's 200 is sent
        ticket = engine.admit(len(formatter.jobs) * formatter.n)
    except Exception as exc:
        error = api_error_from(exc)
        logger.info("request %s refused: %s", request_id, error.message)
        raise error from exc
    formatter.ids.id = f"{formatter.prefix}-{request_id}"
    if formatter.body.model is None:
        formatter.ids.model = request.app.state.pagoda.settings.model_name
    if stream:
        return _AdmittedStream(ticket, _stream(engine, formatter, timeout, ticket, request_id),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect() -> dict[str, Any]:
        finals: dict[int, RequestOutput] = {}
        async for job, out in _merged(engine, formatter.jobs, timeout, ticket):
            if out.finished:
                finals[job] = out
        return formatter.final([finals[j] for j in range(len(formatter.jobs))])

    try:
        body = await _unless_disconnected(request, collect())
    except _ClientGone:
        return Response(status_code=499)
    except Exception as exc:
        error = api_error_from(exc)
        logger.warning("request %s failed: %s", request_id, error.message)
        raise error from exc
    finally:
        ticket.release()
    return JSONResponse(body)


class _AdmittedStream(StreamingResponse):
    """A streaming response that gives back its admission ticket's unsent share however the response ends
    (even when the client leaves before the body generator starts, so the generator's own cleanup never runs)."""

    def __init__(self, ticket: Ticket, content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def _stream(engine: AsyncEngine, formatter: _Formatter, timeout: float | None, ticket: Ticket,
                  request_id: str) -> AsyncIterator[str]:
    """SSE body. A client disconnect cancels this generator (Starlette listens for it), which aborts the jobs."""
    include_usage = formatter.body.include_usage_in_stream
    finals: dict[int, RequestOutput] = {}

    def event(chunk: dict[str, Any]) -> str:
        if include_usage:
            chunk["usage"] = None
        return R.sse(chunk)

    try:
        for chunk in formatter.first_chunks():
            yield event(chunk)
        async for job, out in _merged(engine, formatter.jobs, timeout, ticket):
            for chunk in formatter.chunks(job, out):
                yield event(chunk)
            if out.finished:
                finals[job] = out
        if include_usage:
            yield R.sse({**formatter.ids.base(formatter.chunk_object), "choices": [],
                         "usage": R.usage_of([finals[j] for j in sorted(finals)])})
    except Exception as exc:  # noqa: BLE001 - the status line is sent already: report in-band
        error = api_error_from(exc)
        logger.warning("request %s ended with an error event: %s", request_id, error.message)
        yield R.sse(R.error_body(error.message, error.type, error.param, error.code))
    yield R.SSE_DONE


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        raise _ClientGone()
    return task.result()
