"""Chat templates render exactly like transformers' apply_chat_template(tokenize=False), inside a sandbox."""

from __future__ import annotations

import datetime

import pytest

from pagoda.loader.gguf_file import GGUFFile
from pagoda.tokenizer.chat_template import ChatTemplateError, render_chat_template
from pagoda.tokenizer.tokenizer import Tokenizer

# Modeled on Qwen3's template: system + tools block, reasoning split from content, tool calls and responses,
# and the empty think block when enable_thinking is false.
QWEN3_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')\
.split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + \
'\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «quoted» & <escaped>?",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋 — ça va?"}],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n\nExplain."},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "<think>\nDone.\n</think>\n\nIt is 21°C.", "tool_calls": None},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(smollm_gguf).metadata)


@pytest.fixture(scope="module")
def ref(smollm_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


def _reference(ref, messages, template=None, **kwargs):
    return ref.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["single", "system", "multi_turn"])
def test_smollm_embedded_template(smol, ref, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == _reference(ref, messages, add_generation_prompt=add_generation_prompt)
    assert ours.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen3_style_template(smol, ref, name, with_tools, enable_thinking):
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    special = {"bos_token": smol.bos_token, "eos_token": smol.eos_token}
    ours = render_chat_template(QWEN3_TEMPLATE, messages, add_generation_prompt=True, tools=tools,
                                special_tokens=special, **extra)
    assert ours == _reference(ref, messages, QWEN3_TEMPLATE, tools=tools, add_generation_prompt=True, **extra)
    assert ours.endswith("<think>\n\n</think>\n\n") == (enable_thinking is False)
    if with_tools:
        assert '"description": "Weather for a city — «quoted» & <escaped>?"' in ours  # tojson: no escaping


def test_template_through_tokenizer_with_tools(smol, ref):
    smol_copy = Tokenizer(smol.hf_tokenizer, bos_token_id=1, eos_token_id=2,
                          chat_templates={"default": QWEN3_TEMPLATE})
    messages = CONVERSATIONS["tool_round_trip"]
    ours = smol_copy.apply_chat_template(messages, tools=TOOLS, enable_thinking=False)
    assert ours == _reference(ref, messages, QWEN3_TEMPLATE, tools=TOOLS, add_generation_prompt=True,
                              enable_thinking=False)


def test_raise_exception_becomes_chat_template_error(ref):
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    messages = CONVERSATIONS["system"]
    with pytest.raises(ChatTemplateError, match="^System role not supported$"):
        render_chat_template(template, messages)
    with pytest.raises(Exception, match="System role not supported"):
        _reference(ref, messages, template)
    assert isinstance(ChatTemplateError("x"), ValueError)
    assert render_chat_template(template, CONVERSATIONS["single"]) == "Hello!"


def test_list_of_text_parts_is_joined(smol, ref):
    text_parts = [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second."}]
    parts = [{"role": "user", "content": text_parts}]
    joined = [{"role": "user", "content": "First part.\nSecond."}]
    assert smol.apply_chat_template(parts) == _reference(ref, joined, add_generation_prompt=True)
    assert parts[0]["content"][0] == {"type": "text", "text": "First part."}  # caller's messages untouched
    with pytest.raises(ChatTemplateError, match="image_url"):
        smol.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_none_values_dropped_and_tojson_options(ref):
    template = "{% for m in messages %}{{ m | tojson(indent=2, sort_keys=True) }}{{ m.tool_calls is defined }}" \
               "{{ m | tojson(separators=(',', ':'), ensure_ascii=True) }}{% endfor %}"
    messages = [{"role": "assistant", "content": "é <b>", "tool_calls": None, "z": [1, 2]}]
    assert render_chat_template(template, messages) == _reference(ref, messages, template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{% set _ = messages[0].update({'content': 'pwned'}) %}",
        "{% set ns = namespace() %}{% set ns._private = 1 %}",
        "{{ namespace(__init__=1) }}",
        "{{ dict.__class__ }}{{ self.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_syntax_and_runtime_errors_are_chat_template_errors(smol):
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages[0].n + 'x' }}", [{"role": "user", "content": "hi", "n": 1}])
    with pytest.raises(ChatTemplateError):  # the SmolLM2 template needs a content string
        smol.apply_chat_template([{"role": "user", "content": None}])


def test_strftime_now_and_loopcontrols(ref):
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == str(datetime.date.today().year)
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    messages = CONVERSATIONS["multi_turn"]
    assert render_chat_template(template, messages) == _reference(ref, messages, template) == "What is 2+2?"


def test_special_token_variables_and_kwargs_override(smol, ref):
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom }}"
    messages = CONVERSATIONS["single"]
    ours = Tokenizer(smol.hf_tokenizer, bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0,
                     chat_templates={"default": template}).apply_chat_template(messages, custom=7)
    assert ours == _reference(ref, messages, template, custom=7) == "<|im_start|>|<|im_end|>|<|im_end|>|<|endoftext|>|7"
    assert render_chat_template(template, messages, special_tokens={"bos_token": "B"}, bos_token="K") .startswith("K|")


def test_templates_compile_once():
    from pagoda.tokenizer.chat_template import _compile

    source = "{{ messages | length }} compile-once"
    before = _compile.cache_info().misses
    for _ in range(3):
        assert render_chat_template(source, [{"role": "user", "content": "a"}]) == "1 compile-once"
    assert _compile.cache_info().misses == before + 1
