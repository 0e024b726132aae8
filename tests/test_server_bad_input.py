"""The bad-input table, generated from the request schemas: every field of every route's pydantic model (nested
messages, content parts and stream options included) gets values derived from its type, on a real `pagoda serve`
process. A new field is covered without editing this file.

- text fields × (a lone UTF-16 surrogate, a NUL, a 1 MB string, a wrong type),
- numeric fields × (NaN, +Infinity, -Infinity, negative, huge, a string),
- booleans × wrong types; token-id lists and dict keys / values the same way, one level in.

NaN and Infinity are sent as the literals Python's json writes (they are not JSON; the server refuses them).
A value may be valid for its field (a 1 MB stop string, a NUL in a prompt): then success is fine. The rule is:
never a 5xx, never a dropped connection; a 4xx always has OpenAI's error shape with a `param` naming the field;
and after each field the server is healthy with no KV block held.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tests.servers import ServerProcess, metric

MEGABYTE = "a" * 1_000_000
TEXT_VALUES = {"surrogate": "\ud800", "nul": "a\x00b", "1MB": MEGABYTE, "wrong_type": {"not": "text"}}
NUMBER_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -1,
                 "huge": 10**30, "string": "1"}
BOOL_VALUES = {"string": "true", "number": 1, "nan": float("nan")}
KEY_VALUES = {k: v for k, v in TEXT_VALUES.items() if isinstance(v, str)}  # JSON keys are always strings

USER = {"role": "user", "content": "Hi"}
ROUTES = {
    "/v1/completions": (CompletionRequest, {"prompt": "Hello", "max_tokens": 1}),
    "/v1/chat/completions": (ChatCompletionRequest, {"messages": [USER], "max_tokens": 1}),
    "/tokenize": (TokenizeRequest, {"prompt": "Hello"}),
    "/detokenize": (DetokenizeRequest, {"tokens": [1, 2]}),
}
# Bodies a nested model's fields need around them: a content-part list, the tokenize route's messages form.
CONTENT_PARTS = [{"type": "text", "text": "Hi"}]


# ---- deriving the cases from the schemas -------------------------------------------------------------------------


@dataclass
class Kinds:
    """What a field's annotation admits."""

    text: bool = False
    number: bool = False
    boolean: bool = False
    anything: bool = False
    number_list: bool = False  # token ids
    item_list: bool = False  # a list of dicts / anything: bad values go in as the first item
    dict_values: Kinds | None = None
    models: tuple[tuple[type[BaseModel], bool], ...] = ()  # (model, inside a list)


def kinds_of(annotation: Any, kinds: Kinds | None = None) -> Kinds:
    kinds = kinds or Kinds()
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return kinds_of(args[0], kinds)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            kinds_of(arg, kinds)
    elif annotation is Any:
        kinds.anything = True
    elif origin is typing.Literal or annotation is str:
        kinds.text = True
    elif annotation is bool:
        kinds.boolean = True
    elif annotation in (int, float):
        kinds.number = True
    elif origin is list:
        inner = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is typing.Annotated else args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            kinds.models += ((inner, True),)
        elif inner in (int, float):
            kinds.number_list = True
        elif inner is str:
            kinds.text = True  # list[str] sits beside str in every such field: the plain values cover it
        elif typing.get_origin(inner) is list:
            kinds.number_list = True  # list[list[int]] (prompts): numbers in the first list are the case
        else:
            kinds.item_list = True
    elif origin is dict:
        kinds.dict_values = kinds_of(args[1])
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        kinds.models += ((annotation, False),)
    return kinds


@dataclass
class Case:
    route: str
    path: tuple[str | int, ...]
    setup: tuple[tuple[tuple[str | int, ...], Any], ...]  # (path, value) set before the bad value
    values: dict[str, Any]  # variant name → the value to put at `path`, or a dict key: {"key": ...}

    @property
    def name(self) -> str:
        route = "chat" if "chat" in self.route else self.route.rsplit("/", 1)[1]
        return route + ":" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                                            for p in self.path).lstrip(".")


def _values(kinds: Kinds) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if kinds.text or kinds.anything:
        values.update({f"text:{k}": v for k, v in TEXT_VALUES.items()})
    if kinds.number or kinds.anything:
        values.update({f"number:{k}": v for k, v in NUMBER_VALUES.items()})
    if kinds.boolean:
        values.update({f"bool:{k}": v for k, v in BOOL_VALUES.items()})
    if kinds.number_list:
        values.update({f"ids:{k}": [v] for k, v in NUMBER_VALUES.items()})
    if kinds.item_list:
        values.update({f"item:{k}": [v] for k, v in {**TEXT_VALUES, **NUMBER_VALUES}.items()})
    if kinds.dict_values is not None:
        values.update({f"key:{k}": {v: 1} for k, v in KEY_VALUES.items()})
        values.update({f"value:{k}": {"5": v} for k, v in _values(kinds.dict_values).items()
                       if not isinstance(v, list | dict)})
        values["dict:wrong_type"] = "not a dict"
    if not (kinds.text or kinds.anything or kinds.number or kinds.boolean):
        values.setdefault("wrong_type", 12345)
    return values


def cases_of(route: str, model: type[BaseModel], path: tuple = (), setup: tuple = ()) -> list[Case]:
    cases = []
    for name, info in model.model_fields.items():
        field_path = (*path, name)
        kinds = kinds_of(info.annotation)
        cases.append(Case(route, field_path, setup, _values(kinds)))
        for inner, in_list in kinds.models:
            inner_setup = (*setup, *_surroundings(route, field_path, inner))
            cases += cases_of(route, inner, (*field_path, 0) if in_list else field_path, inner_setup)
    return cases


def _surroundings(route: str, path: tuple, inner: type[BaseModel]) -> tuple:
    """(path, value) pairs that give a nested model's fields a valid place to go."""
    if inner.__name__ == "ContentPart":
        return ((path, copy.deepcopy(CONTENT_PARTS)),)
    if inner.__name__ == "ChatMessage":
        return ((("prompt",), None), (path, [dict(USER)])) if route == "/tokenize" else ()
    if inner.__name__ == "StreamOptions":
        return ((("stream",), True), (path, {}))
    raise AssertionError(f"no surroundings for {inner.__name__}: add them here")


CASES = [case for route, (model, _) in ROUTES.items() for case in cases_of(route, model)]


def _put(body: dict, path: tuple, value: Any) -> None:
    target: Any = body
    for part in path[:-1]:
        target = target[part]
    if value is None and isinstance(target, dict):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


def build_body(case: Case, value: Any) -> bytes:
    body = copy.deepcopy(ROUTES[case.route][1])
    for path, setup_value in case.setup:
        _put(body, path, copy.deepcopy(setup_value))
    _put(body, case.path, value)
    return json.dumps(body).encode()  # ensure_ascii: "\ud800" is written as the escape; NaN as the literal


def names_field(param: str, path: str) -> bool:
    """`param` is the field or an enclosing one (a template error names `messages`), or a part of it."""
    return path.startswith(param) or param.startswith(path)


# ---- the test ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm_gguf, tmp_path_factory):
    proc = ServerProcess(smollm_gguf, "--served-model-name", "smol", "--kv-cache-memory", "64MiB",
                         "--max-model-len", "512", log_dir=tmp_path_factory.mktemp("bad-input")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_the_table_covers_every_kind_of_field():
    names = {c.name for c in CASES}
    for expected in ("completions:prompt", "completions:temperature", "completions:logit_bias",
                     "chat:messages[0].content", "chat:messages[0].content[0].text", "chat:messages[0].name",
                     "chat:stream_options.include_usage", "chat:stop", "chat:chat_template_kwargs",
                     "tokenize:messages[0].content", "detokenize:tokens", "chat:best_of", "chat:guided_json"):
        assert expected in names, expected
    assert len(CASES) > 150
    text_fields = [c for c in CASES if "text:surrogate" in c.values]
    number_fields = [c for c in CASES if "number:nan" in c.values]
    assert len(text_fields) > 50 and len(number_fields) > 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_value(http, case):
    path = case.name.split(":", 1)[1]
    failures = []
    for variant, value in case.values.items():
        try:
            response = http.post(case.route, content=build_body(case, value),
                                 headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:  # a dropped connection, a reset
            failures.append(f"{variant}: {type(exc).__name__}: {exc}")
            continue
        if response.status_code >= 500 or response.headers.get("connection") == "close":
            failures.append(f"{variant}: {response.status_code} {response.text[:300]}")
        elif response.status_code >= 400:
            error = response.json().get("error")
            if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
                failures.append(f"{variant}: not OpenAI's error shape: {response.text[:300]}")
            elif not error["message"] or not isinstance(error["param"], str) or not names_field(error["param"],
                                                                                                 path):
                failures.append(f"{variant}: param {error['param']!r} does not name {path}: {error['message']}")
    assert not failures, "\n".join(failures)
    assert http.get("/health").status_code == 200
    assert metric(http.get("/metrics").text, "pagoda:kv_cache_blocks_used") == 0


def test_other_malformed_inputs(http):
    """Inputs outside any field: the path of /v1/models/{id}, the request-id header, bodies that are not JSON."""
    for model_id in ("%ED%A0%80", "%00", "a" * 10_000):
        response = http.get(f"/v1/models/{model_id}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    for header in (b"\xe9t\xe9", b"a b", b"x" * 129, b""):  # (uvicorn itself refuses control characters)
        response = http.post("/tokenize", json={"prompt": "hi"}, headers={"x-request-id": header})
        assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32  # a fresh one
    for raw in (b"\xff\xfe", b'{"prompt": "\xed\xa0\x80"}', b"[]", b"null", b'{"prompt": "hi"} x', b"1e400"):
        response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200
