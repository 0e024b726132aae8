"""Render a model's chat template (Jinja source shipped with the model) into a prompt string.

Owns the sandbox templates run in and the preparation of the variables they see. The output must equal
transformers' `apply_chat_template(..., tokenize=False)` for the same template and inputs: models are trained on
exactly that text, and any difference (a newline, a space) degrades answers silently.

Templates are untrusted code from a model repository, so they run in Jinja's ImmutableSandboxedEnvironment:
no access to dunder attributes or Python internals, no mutation of lists or dicts passed in, and namespaces
refuse underscore-prefixed names. Every failure, including a template's own `raise_exception(...)`, surfaces as
ChatTemplateError (a ValueError) whose message says what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss ones read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template refused the conversation, failed to compile, or tried something the sandbox forbids."""


def render_chat_template(
    template: str,
    messages: list[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[Mapping[str, Any]] | None = None,
    documents: list[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text for `messages`.

    `special_tokens` are the named tokens (bos_token, eos_token, ...) exposed as variables, as transformers does;
    `template_kwargs` (e.g. enable_thinking=False) are extra variables and override them.
    """
    compiled = _compile(template)
    variables = {**(special_tokens or {}), **template_kwargs}
    try:
        return compiled.render(
            messages=prepare_messages(messages),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template attempted an operation the sandbox forbids: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        # e.g. `message['content'] + '...'` when a message has no content: the conversation does not fit it
        raise ChatTemplateError(f"chat template failed on this conversation: {type(e).__name__}: {e}") from e


def prepare_messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates expect them: plain data, None-valued keys dropped, text parts joined into a string,
    and reasoning available under every name templates read it by. The caller's objects are never modified."""
    out = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):  # pydantic request models
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"each chat message must be a mapping with 'role' and 'content', got {message!r}")
        m = {k: v for k, v in message.items() if v is not None}  # APIs send content=None; templates expect absence
        if isinstance(m.get("content"), (list, tuple)):
            m["content"] = join_text_parts(m["content"])
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(_plain(m))
    return out


def join_text_parts(parts: list | tuple) -> str:
    """OpenAI-style content parts → one string (text parts joined by newlines); non-text parts are refused."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(f"message content part of type {kind!r} is not supported; only text parts are")
    return "\n".join(texts)


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only: templates then cannot reach methods of caller objects (str or int
    subclasses such as enums), and the copy keeps the caller's data safe from the render."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. the server's request messages)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------- the sandbox


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (no `dict.__subclasses__` games)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed names so templates cannot shadow internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates may not set underscore-prefixed attribute {name!r}")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Each distinct template source is compiled once per process (compiling costs milliseconds per request)."""
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from None
