"""LiteLLM and LangChain, as their users call them, against a real `pagoda serve`: what they send is accepted
(no field refused, none ignored), and what they read back is what the openai SDK reads (greedy, so equal text).

The openai SDK is the reference: tests/test_server.py checks its answers against the offline engine."""

from __future__ import annotations

import asyncio
import os

import httpx
import openai
import pytest

from tests.conftest import API_KEY
from tests.test_server import QUESTION, wait_idle

# LiteLLM fetches a model price map from GitHub at import unless told to use its bundled copy (no internet here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

litellm = pytest.importorskip("litellm")
langchain_openai = pytest.importorskip("langchain_openai")

MAX_TOKENS = 24
# LiteLLM's own pydantic models warn at import (ReadOnly TypedDict items): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture()
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture()
def reference(server):
    """The openai SDK's greedy answers: (chat text, completion text)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    chat = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    text = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert chat.choices[0].message.content and text.choices[0].text
    return chat.choices[0].message.content, text.choices[0].text


def _litellm_args(server) -> dict:
    # "openai/<name>" is LiteLLM's route for any OpenAI-compatible server (what its docs give for vLLM)
    return {"model": "openai/smol", "api_base": f"{server.url}/v1", "api_key": API_KEY, "max_tokens": MAX_TOKENS,
            "temperature": 0}


def test_litellm_chat_plain_and_streamed(server, reference):
    answer = litellm.completion(messages=QUESTION, **_litellm_args(server))
    assert answer.choices[0].message.content == reference[0]
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0

    pieces = [chunk.choices[0].delta.content or ""
              for chunk in litellm.completion(messages=QUESTION, stream=True, **_litellm_args(server))]
    assert "".join(pieces) == reference[0]


def test_litellm_text_completion(server, reference):
    answer = litellm.text_completion(prompt="The capital of France is", **_litellm_args(server))
    assert answer.choices[0].text == reference[1]


def test_litellm_async_concurrent(server, reference, http):
    async def run():
        return await asyncio.gather(*(litellm.acompletion(messages=QUESTION, **_litellm_args(server))
                                      for _ in range(4)))

    answers = asyncio.run(run())
    assert [a.choices[0].message.content for a in answers] == [reference[0]] * 4
    wait_idle(http)


def test_litellm_errors_are_mapped(server):
    """Our OpenAI-shaped errors reach LiteLLM's exception classes, message intact."""
    with pytest.raises(litellm.BadRequestError) as info:
        litellm.completion(messages=QUESTION, **{**_litellm_args(server), "temperature": -1})
    assert "temperature" in str(info.value)
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(messages=QUESTION, **{**_litellm_args(server), "api_key": "wrong"})


def _chat_model(server, **kw):
    return langchain_openai.ChatOpenAI(model="smol", base_url=f"{server.url}/v1", api_key=API_KEY,
                                       max_tokens=MAX_TOKENS, temperature=0, max_retries=0, **kw)


def test_langchain_chat_invoke_and_stream(server, reference):
    from langchain_core.messages import HumanMessage

    messages = [HumanMessage(content=QUESTION[0]["content"])]
    answer = _chat_model(server).invoke(messages)
    assert answer.content == reference[0]
    assert answer.usage_metadata["output_tokens"] > 0
    assert answer.response_metadata["finish_reason"] in ("stop", "length")

    streamed = "".join(chunk.content for chunk in _chat_model(server, stream_usage=True).stream(messages))
    assert streamed == reference[0]


def test_langchain_batch_and_prompt_template(server, reference):
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    chain = ChatPromptTemplate.from_messages([("user", "What is the capital of {country}?")]) \
        | _chat_model(server) | StrOutputParser()
    answers = chain.batch([{"country": "France"}, {"country": "France"}])
    assert answers == [reference[0]] * 2


def test_langchain_completions_llm(server, reference):
    llm = langchain_openai.OpenAI(model="smol", base_url=f"{server.url}/v1", api_key=API_KEY,
                                  max_tokens=MAX_TOKENS, temperature=0, max_retries=0)
    assert llm.invoke("The capital of France is") == reference[1]
