"""ASGI middleware of the server: the request body size limit (413) and the request id (X-Request-Id).

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so a body is never buffered and a streaming response
passes through untouched.
"""

from __future__ import annotations

import json
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces, bounded
_VALID_REQUEST_ID = re.compile(REQUEST_ID_PATTERN.encode())


def _error_response(status: int, message: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    # No "Connection: close": closing with the client's unread body in the socket would reset the connection
    # before the client reads this answer; uvicorn instead reads the rest of the body and discards it.
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 in OpenAI's error shape: at once when Content-Length says
    so (nothing is read), else as soon as the bytes received so far (a chunked body) pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (f"the request body exceeds this server's limit of {self.max_bytes} bytes "
                "(pagoda serve --max-request-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        start, body = _error_response(413, self._message(), "request_too_large")
        await send(start)
        await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Every HTTP request gets an id: the client's X-Request-Id when it is printable ASCII of at most 128
    characters, else a fresh one. It is put in `request.state.request_id` (a body's vLLM-style `request_id`
    may replace a fresh one) and echoed in the response headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers") or () if k == REQUEST_ID_HEADER.encode()), None)
        state = scope.setdefault("state", {})
        if sent is not None and _VALID_REQUEST_ID.fullmatch(sent):
            state["request_id"], state["request_id_from_client"] = sent.decode(), True
        else:
            state["request_id"], state["request_id_from_client"] = uuid.uuid4().hex, False

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":  # read now: a body's `request_id` may have set it
                header = (REQUEST_ID_HEADER.encode(), state["request_id"].encode())
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
