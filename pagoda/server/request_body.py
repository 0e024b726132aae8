"""Request bodies: bytes → a validated request model, and the thread pool that does a request's CPU work.

The event loop only moves bytes. Parsing and validating a body, tokenizing prompts and rendering chat templates
run on `CpuPool`'s threads, so one big request cannot stall the others (or /health). The tokenizer releases the
GIL while it works; JSON parsing and pydantic validation do not, so their cost per call is bounded by the body
limit (`--max-request-bytes`, enforced by middleware.BodyLimitMiddleware before any of this).

JSON is parsed strictly, by pydantic-core's parser: a string that is not valid Unicode (a lone UTF-16 surrogate
escape such as "\\ud800", bytes that are not UTF-8) and the literals NaN / Infinity, which are not JSON, are
refused, so no text that cannot be encoded reaches the tokenizer, a template or a response. That parser reports
only a position; a refused body is parsed again by Python's permissive parser to name the field.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from pagoda.sampling_params import SamplingParamsError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class InvalidBodyError(SamplingParamsError):
    """The body is not a JSON object this server can read; `param` names the field when one is at fault."""

    code = "invalid_json"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)  # type: ignore[arg-type]


class CpuPool:
    """A few threads for the CPU work of requests (not the engine's: that has its own thread)."""

    def __init__(self, workers: int = 4):
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="pagoda-cpu")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def json_body(model: type[M]) -> Callable[[Request], Any]:
    """A FastAPI dependency: the request's body as `model`, parsed and validated on the app's CpuPool."""

    async def dependency(request: Request) -> M:
        raw = await request.body()
        return await request.app.state.pagoda.cpu.run(parse_body, raw, model)

    return dependency


def parse_body(raw: bytes, model: type[M]) -> M:
    """Raises InvalidBodyError (not JSON, not an object, text that is not Unicode, NaN) or RequestValidationError
    (the object does not fit `model`; app.py turns it into a 400 naming the field)."""
    if not raw.strip():
        raise InvalidBodyError("the request body must be a JSON object")
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise _diagnose(raw, exc) from None
    if not isinstance(data, dict):
        raise InvalidBodyError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def _diagnose(raw: bytes, strict_error: ValueError) -> InvalidBodyError:
    try:
        data = json.loads(raw)  # accepts lone surrogates, NaN and Infinity, which the strict parser refused
    except ValueError:  # also UnicodeDecodeError: bytes that are not UTF-8
        return InvalidBodyError(f"We could not parse the JSON body of your request: {strict_error}")
    found = _find_invalid_value(data)
    if found is None:
        return InvalidBodyError(f"We could not parse the JSON body of your request: {strict_error}")
    path, problem = found
    return InvalidBodyError(f"{path or 'the body'}: {problem}", path or None)


def _find_invalid_value(data: Any) -> tuple[str, str] | None:
    """(path, problem) of the first string that is not valid Unicode or number that is not finite."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return path, "the text is not valid Unicode (it holds a lone UTF-16 surrogate, e.g. \\ud800)"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, f"{value} is not a JSON number (numbers must be finite)"
        elif isinstance(value, dict):
            if not all(_is_unicode(key) for key in value):  # checked first: a path must not hold one
                return path, "a key is not valid Unicode (it holds a lone UTF-16 surrogate)"
            stack.extend((item, f"{path}.{key}" if path else key) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
