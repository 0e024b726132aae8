"""Reasoning output: the think-tag splitter (every way of cutting the text into deltas), where generation starts
(from the rendered prompt), the parser choice, and end to end on a tiny scripted Qwen3 served by `pagoda serve`
(message.reasoning_content, streamed reasoning deltas, tags split across chunks, enable_thinking false, n > 1,
stop strings, logprobs), and on SmolLM2, which has no parser and is untouched."""

from __future__ import annotations

import json

import httpx
import pytest

from pagoda.server.app import ServerSettings
from pagoda.tokenizer.chat_template import render_chat_template
from pagoda.tokenizer.reasoning import QWEN3, ReasoningDelta, ReasoningStart, resolve_reasoning_parser
from tests.conftest import API_KEY
from tests.tiny_qwen3 import CHAT_TEMPLATE

OUTSIDE, INSIDE, OFF = ReasoningStart.OUTSIDE, ReasoningStart.INSIDE, ReasoningStart.OFF


def oracle(text: str, start: ReasoningStart) -> tuple[str | None, str]:
    """The split, written independently of the splitter (whole text, string methods only)."""
    if start is OFF:
        return None, text
    if text.lstrip().startswith("<think>"):
        text, start = text.lstrip()[len("<think>"):], INSIDE
    if start is OUTSIDE:
        return None, text
    reasoning, _, content = text.partition("</think>")
    return reasoning, content


def stream(pieces: list[str], start: ReasoningStart) -> tuple[str | None, str, list]:
    splitter = QWEN3.splitter(start)
    deltas = [splitter.feed(p) for p in pieces] + [splitter.flush()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    assert content == splitter.content and reasoning == (splitter.reasoning or "")
    return splitter.reasoning, content, deltas


TEXTS = [
    "<think>\nplan é 😀\n</think>\n\nanswer ✓",
    "\n <think>r</think>c</think>",  # whitespace before the tag; a second end tag is content
    "reason 😀</think>answer",  # only the end tag
    "<think>never closed </th",
    "no tags at all, <think> later",
    "<thin",
    "",
]


@pytest.mark.parametrize("start", [OUTSIDE, INSIDE, OFF])
@pytest.mark.parametrize("text", TEXTS)
def test_every_split_gives_the_same_result(text, start):
    expected = oracle(text, start)
    assert QWEN3.split(text, start).reasoning == expected[0]
    assert QWEN3.split(text, start).content == expected[1]
    assert stream(list(text), start)[:2] == expected  # character by character
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], start)[:2] == expected, i
        for j in range(i, len(text) + 1):
            assert stream([text[:i], text[i:j], text[j:]], start)[:2] == expected, (i, j)


def test_only_a_possible_tag_is_held_back():
    splitter = QWEN3.splitter(OUTSIDE)
    assert splitter.feed("<th").reasoning == ""
    assert splitter.feed("ink>abc</th") == ReasoningDelta("abc", "")  # "</th" is held
    assert splitter.feed("ese") == ReasoningDelta("</these", "")  # not the end tag after all: released at once
    assert splitter.feed("x</think>") == ReasoningDelta("x", "")
    assert splitter.feed("<think> and </think>").content == "<think> and </think>"  # content is verbatim
    assert splitter.flush().content == ""


def test_text_without_tags_passes_through_unchanged():
    splitter = QWEN3.splitter(OUTSIDE)
    pieces = ["Hello", " wor", "ld <", "think>", " ✓"]
    assert [splitter.feed(p).content for p in pieces] == pieces  # nothing held once the start is not a tag
    assert splitter.reasoning is None


def test_start_inside_and_tags_split_across_deltas():
    assert stream(["pl", "an</t", "hink", ">an", "swer"], INSIDE)[:2] == ("plan", "answer")
    assert stream(["<th", "ink>re", "a</thi", "nk>c"], OUTSIDE)[:2] == ("rea", "c")
    assert stream(["<think>", "again</think>x"], INSIDE)[:2] == ("again", "x")  # a repeated start tag is dropped
    reasoning, content, deltas = stream(["<thi", "nk>", " hm", "</t", "hin", "k>", " ok"], OUTSIDE)
    assert [(d.reasoning, d.content) for d in deltas] == [
        ("", ""), ("", ""), (" hm", ""), ("", ""), ("", ""), ("", ""), ("", " ok"), ("", "")]


def test_unfinished_tags_are_text_at_the_end():
    assert QWEN3.split("<thi", OUTSIDE) == QWEN3.split("<thi", OFF)  # content "<thi"
    assert QWEN3.split("<think>ab</thi", OUTSIDE).reasoning == "ab</thi"
    assert QWEN3.split("<think>", OUTSIDE).reasoning == ""  # an empty block is still a block
    assert QWEN3.split("  ", INSIDE).reasoning == "  "


def _prompt(template: str, **kwargs) -> str:
    return render_chat_template(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True, **kwargs)


def test_the_rendered_prompt_decides_where_generation_starts():
    assert QWEN3.start_of(_prompt(CHAT_TEMPLATE)) is OUTSIDE  # Qwen3: the model writes <think> itself
    off = _prompt(CHAT_TEMPLATE, enable_thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n")
    assert QWEN3.start_of(off) is OFF  # the template closed an empty block: no reasoning
    assert QWEN3.start_of(_prompt(CHAT_TEMPLATE), enable_thinking=False) is OFF
    assert QWEN3.start_of(_prompt(CHAT_TEMPLATE), enable_thinking=True) is OUTSIDE
    thinking_template = CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}\n{%- if enable",
                                              "{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- if enable")
    assert _prompt(thinking_template).endswith("assistant\n<think>\n")
    assert QWEN3.start_of(_prompt(thinking_template)) is INSIDE  # thinking-only templates open the block
    history = render_chat_template(CHAT_TEMPLATE, [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
        {"role": "user", "content": "Bye"}], add_generation_prompt=True)
    assert "<think>\ngreet\n</think>" in history
    assert QWEN3.start_of(history) is OUTSIDE  # a closed block of an earlier turn does not count


def test_parser_choice(smollm_gguf):
    from pagoda.cli import build_parser
    from pagoda.loader.gguf_file import GGUFFile

    assert resolve_reasoning_parser("auto", CHAT_TEMPLATE)[0] is QWEN3
    assert resolve_reasoning_parser("auto", "{{ enable_thinking }}")[0] is QWEN3
    smol_template = GGUFFile(smollm_gguf).metadata["tokenizer.chat_template"]
    assert resolve_reasoning_parser("auto", smol_template)[0] is None
    assert resolve_reasoning_parser("auto", None)[0] is None
    assert resolve_reasoning_parser("none", CHAT_TEMPLATE)[0] is None
    assert resolve_reasoning_parser("qwen3", smol_template)[0] is QWEN3
    with pytest.raises(ValueError, match="unknown reasoning parser 'deepseek'"):
        resolve_reasoning_parser("deepseek", None)
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ServerSettings(engine=None, reasoning_parser="deepseek")
    assert build_parser().parse_args(["serve", "--reasoning-parser", "none"]).reasoning_parser == "none"
    assert build_parser().parse_args(["serve"]).reasoning_parser == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reasoning-parser", "deepseek"])


# ---- end to end on the tiny Qwen3 ------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.fixture(scope="module")
def http(qwen3_server):
    with httpx.Client(base_url=qwen3_server.url, timeout=120) as c:
        yield c


def chat(http: httpx.Client, tiny, script: str | None = None, **body) -> dict:
    if script is not None:
        body["logit_bias"] = {str(tiny.first(script)): 100}
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 30,
                                                        **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat_stream(http: httpx.Client, tiny, script: str | None = None, **body) -> list[dict]:
    """The stream's chunks (without [DONE], which is checked to come last)."""
    if script is not None:
        body["logit_bias"] = {str(tiny.first(script)): 100}
    with http.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0,
                                                            "max_tokens": 30, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def deltas(chunks: list[dict], index: int = 0) -> list[dict]:
    """The deltas of choice `index` before its finish chunk, none of them empty; the first one carries the role
    (sent with the first token, not before it)."""
    mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
    assert mine[0]["delta"].pop("role") == "assistant"
    assert not any("role" in c["delta"] for c in mine[1:])
    assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] is not None
    middle = [c["delta"] for c in mine[:-1]]
    assert all(middle), f"an empty delta was sent: {middle}"
    for d in middle:
        assert set(d) <= {"content", "reasoning_content", "reasoning"}
        assert d.get("reasoning") == d.get("reasoning_content")
    return middle


def joined(middle: list[dict], key: str) -> str:
    return "".join(d.get(key, "") for d in middle)


def test_non_streaming_reasoning_and_content(http, tiny_qwen3, qwen3_server):
    body = chat(http, tiny_qwen3)
    [choice] = body["choices"]
    message = choice["message"]
    assert message["reasoning_content"] == message["reasoning"] == "\nI should plan.\n"
    assert message["content"] == "\n\nThe answer is 42."
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(tiny_qwen3.texts("think")) + 1  # + <|im_end|>
    assert "reasoning parser: qwen3 (auto: the chat template mentions" in qwen3_server.log()


def test_streaming_reassembles_to_the_same_split(http, tiny_qwen3):
    middle = deltas(chat_stream(http, tiny_qwen3))
    assert joined(middle, "reasoning_content") == "\nI should plan.\n"
    assert joined(middle, "content") == "\n\nThe answer is 42."
    # one chunk per token with text; the tags themselves produce none
    assert [d.get("reasoning_content") or d.get("content") for d in middle] == \
        [t for t in tiny_qwen3.texts("think") if t not in ("<think>", "</think>")]


def test_tags_split_across_chunks(http, tiny_qwen3):
    assert tiny_qwen3.text("split_tags") == "<think> hm</think> ok"
    middle = deltas(chat_stream(http, tiny_qwen3, "split_tags"))
    assert middle == [{"reasoning_content": " hm", "reasoning": " hm"}, {"content": " ok"}]
    message = chat(http, tiny_qwen3, "split_tags")["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (" hm", " ok")


def test_logprobs_of_held_back_tokens_are_kept(http, tiny_qwen3):
    whole = chat(http, tiny_qwen3, "split_tags", logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in whole] == [*tiny_qwen3.texts("split_tags"), "<|im_end|>"]
    chunks = chat_stream(http, tiny_qwen3, "split_tags", logprobs=True)
    streamed = [e["token"] for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == [e["token"] for e in whole]


def test_enable_thinking_false_gives_no_reasoning(http, tiny_qwen3):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    message = chat(http, tiny_qwen3, **off)["choices"][0]["message"]
    assert message["content"] == tiny_qwen3.text("think")  # this model thinks anyway: all of it is content
    assert "reasoning_content" not in message and "reasoning" not in message
    middle = deltas(chat_stream(http, tiny_qwen3, **off))
    assert joined(middle, "content") == tiny_qwen3.text("think")
    assert not any("reasoning_content" in d for d in middle)


@pytest.mark.parametrize("script", ["plain", "tag_in_answer"])
def test_output_without_a_think_block_is_untouched(http, tiny_qwen3, script):
    message = chat(http, tiny_qwen3, script)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": tiny_qwen3.text(script), "refusal": None, "tool_calls": []}
    assert joined(deltas(chat_stream(http, tiny_qwen3, script)), "content") == tiny_qwen3.text(script)


def test_n_samples_are_split_separately(http, tiny_qwen3):
    body = chat(http, tiny_qwen3, "split_tags", n=2)
    assert [(c["index"], c["message"]["reasoning_content"], c["message"]["content"]) for c in body["choices"]] == \
        [(0, " hm", " ok"), (1, " hm", " ok")]
    chunks = chat_stream(http, tiny_qwen3, "split_tags", n=2)
    for index in (0, 1):
        assert deltas(chunks, index) == [{"reasoning_content": " hm", "reasoning": " hm"}, {"content": " ok"}]


def test_stop_string_and_length_inside_the_reasoning(http, tiny_qwen3):
    [choice] = chat(http, tiny_qwen3, stop=["plan"])["choices"]
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == ("\nI should ", None)
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "plan")
    [choice] = chat(http, tiny_qwen3, max_tokens=3)["choices"]
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == ("\nI should", None)
    assert choice["finish_reason"] == "length"
    middle = deltas(chat_stream(http, tiny_qwen3, max_tokens=3))
    assert middle == [{"reasoning_content": "\nI", "reasoning": "\nI"},
                      {"reasoning_content": " should", "reasoning": " should"}]


def test_reasoning_sent_back_reaches_the_template(http, tiny_qwen3):
    message = chat(http, tiny_qwen3)["choices"][0]["message"]
    for key in ("reasoning_content", "reasoning"):
        turn = {"role": "assistant", "content": message["content"], key: message[key]}
        ids = http.post("/tokenize", json={"messages": [*MESSAGES, turn, {"role": "user", "content": "Why?"}]}
                        ).json()["tokens"]
        prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert "<|im_start|>assistant\n<think>\nI should plan.\n</think>\n\n\n\nThe answer is 42." in prompt


def test_completions_are_raw_text(http, tiny_qwen3):
    prompt = render_chat_template(CHAT_TEMPLATE, MESSAGES, add_generation_prompt=True)
    body = http.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 30}).json()
    assert body["choices"][0]["text"] == tiny_qwen3.text("think")
    assert "reasoning_content" not in body["choices"][0]


def test_parser_none_leaves_the_text_alone(tiny_qwen3):
    from pagoda.engine.llm_engine import EngineConfig, LLMEngine
    from tests.servers import InProcessServer

    config = EngineConfig(model=str(tiny_qwen3.directory), kv_cache_memory="32MiB")
    settings = ServerSettings(engine=config, reasoning_parser="none")
    with InProcessServer(settings, LLMEngine(config)) as server, httpx.Client(base_url=server.url) as http:
        message = chat(http, tiny_qwen3)["choices"][0]["message"]
        assert message["content"] == tiny_qwen3.text("think") and "reasoning_content" not in message


# ---- a model without a parser ----------------------------------------------------------------------------------


def test_smollm2_has_no_parser_and_is_untouched(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        question = [{"role": "user", "content": "Write <think> and </think> back to me."}]
        ids = http.post("/tokenize", json={"messages": question}).json()["tokens"]
        raw = http.post("/v1/completions", json={"prompt": ids, "temperature": 0, "max_tokens": 24}).json()
        body = http.post("/v1/chat/completions", json={"messages": question, "temperature": 0,
                                                        "max_tokens": 24}).json()
        message = body["choices"][0]["message"]
        assert message["content"] == raw["choices"][0]["text"]
        assert "reasoning_content" not in message
        with http.stream("POST", "/v1/chat/completions", json={"messages": question, "temperature": 0,
                                                                "max_tokens": 24, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        middle = [c["choices"][0]["delta"] for c in chunks[:-1]]
        assert middle[0].pop("role") == "assistant"  # with the first token
        assert all(set(d) == {"content"} for d in middle)  # today's chunks: content only
        assert "".join(d["content"] for d in middle) == raw["choices"][0]["text"]
    assert "reasoning parser: none (auto: the chat template has no think tags" in server.log()
