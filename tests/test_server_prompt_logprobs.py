"""Prompt logprobs over HTTP against a real `pagoda serve` in fp32 (weights and KV cache, 16 prompt tokens per
step, so the prompts here are prefilled in several chunks): echo + logprobs in the legacy completions table,
max_tokens 0 with echo, vLLM's prompt_logprobs field, streaming, errors, and GET /tokenizer_info. Values are
checked against transformers on the same weights (tolerance: tests/logprobs_oracle.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.logprobs_oracle import TOLERANCE, hf_logprobs
from tests.servers import ServerProcess, metric

PROMPT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass lamp and a "
          "notebook in which he wrote down the ships he saw")


@pytest.fixture(scope="module")
def fp32_server(smollm_gguf, tmp_path_factory):
    proc = ServerProcess(smollm_gguf, "--served-model-name", "smol", "--quantization", "none", "--dtype", "float32",
                         "--kv-cache-dtype", "float32", "--kv-cache-memory", "64MiB", "--max-prefill-tokens", "16",
                         log_dir=tmp_path_factory.mktemp("fp32-server")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(fp32_server):
    with httpx.Client(base_url=fp32_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def prompt_ids(http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert len(ids) > 16  # longer than one step's prompt budget
    return ids


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": "smol", "prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def assert_table_matches(table: dict, ids: list[int], reference, tokenizer_texts: list[str]) -> None:
    """The legacy table over `ids` (prompt + completion) against transformers' logprobs of the same ids."""
    assert table["tokens"] == tokenizer_texts
    assert table["token_logprobs"][0] is None and table["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        expected = float(reference[p - 1, ids[p]])
        assert abs(table["token_logprobs"][p] - expected) <= TOLERANCE, (p, table["token_logprobs"][p], expected)
        top = table["top_logprobs"][p]
        assert table["tokens"][p] in top  # OpenAI's dicts hold the chosen token besides the top k
        assert top[table["tokens"][p]] == table["token_logprobs"][p]
        assert max(top.values()) == pytest.approx(float(reference[p - 1].max()), abs=TOLERANCE)
    offsets = [sum(len(t) for t in table["tokens"][:i]) for i in range(len(ids))]
    assert table["text_offset"] == offsets


def texts(http, ids: list[int]) -> list[str]:
    return [http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in ids]


def test_echo_with_logprobs_scores_prompt_and_completion(http, prompt_ids, hf_model):
    out = complete(http, echo=True, logprobs=2, max_tokens=4)
    [choice] = out["choices"]
    table = choice["logprobs"]
    completion_ids = http.post("/tokenize", json={"prompt": choice["text"][len(PROMPT):],
                                                  "add_special_tokens": False}).json()["tokens"]
    ids = prompt_ids + completion_ids
    assert len(table["tokens"]) == len(ids) == len(prompt_ids) + out["usage"]["completion_tokens"]
    assert choice["text"].startswith(PROMPT) and "".join(table["tokens"]) == choice["text"]
    assert_table_matches(table, ids, hf_logprobs(hf_model, ids), texts(http, ids))
    assert all(len(top) <= 3 for top in table["top_logprobs"][1:])


def test_max_tokens_zero_with_echo_returns_the_prompt(http, prompt_ids, hf_model):
    counted = metric(http.get("/metrics").text, "vllm:prompt_tokens_total")
    plain = complete(http, echo=True, max_tokens=0)
    assert metric(http.get("/metrics").text, "vllm:prompt_tokens_total") == counted + len(prompt_ids)
    [choice] = plain["choices"]
    assert choice["text"] == PROMPT and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert plain["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                              "total_tokens": len(prompt_ids)}
    scored = complete(http, echo=True, max_tokens=0, logprobs=1)
    [choice] = scored["choices"]
    assert choice["text"] == PROMPT
    assert_table_matches(choice["logprobs"], prompt_ids, hf_logprobs(hf_model, prompt_ids), texts(http, prompt_ids))
    # lm-eval's request: token ids, echo, logprobs 1, max_tokens 1; several prompts at once
    batch = http.post("/v1/completions", json={"model": "smol", "prompt": [prompt_ids, prompt_ids[:20]],
                                               "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
    first, second = batch.json()["choices"]
    assert len(first["logprobs"]["tokens"]) == len(prompt_ids) + 1 and len(second["logprobs"]["tokens"]) == 21
    assert first["logprobs"]["token_logprobs"][:20] == pytest.approx(second["logprobs"]["token_logprobs"][:20],
                                                                     abs=TOLERANCE, nan_ok=True)


def test_vllm_prompt_logprobs_field(http, prompt_ids, hf_model):
    out = complete(http, max_tokens=2, prompt_logprobs=3)
    [choice] = out["choices"]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt_ids)
    reference = hf_logprobs(hf_model, prompt_ids)
    for p in range(1, len(prompt_ids)):
        entry = entries[p]
        chosen = entry[str(prompt_ids[p])]
        assert abs(chosen["logprob"] - float(reference[p - 1, prompt_ids[p]])) <= TOLERANCE
        top = sorted((v for v in entry.values() if v["rank"] <= 3), key=lambda v: v["rank"])  # the top 3
        assert [v["rank"] for v in top] == [1, 2, 3]
        assert [v["logprob"] for v in top] == pytest.approx(reference[p - 1].topk(3).values.tolist(),
                                                            abs=TOLERANCE)
        assert all(isinstance(v["decoded_token"], str) for v in entry.values())
    assert choice["logprobs"] is None and len(choice["text"]) > 0
    # with echo's logprobs 3 the engine computes the top 3, and each field still shows what it asked for
    [both] = complete(http, max_tokens=0, echo=True, logprobs=3, prompt_logprobs=1)["choices"]
    for p in range(1, len(prompt_ids)):
        entry = both["prompt_logprobs"][p]
        itself = entry[str(prompt_ids[p])]
        assert sorted(v["rank"] for v in entry.values()) == ([1] if itself["rank"] == 1 else [1, itself["rank"]])
        assert len(both["logprobs"]["top_logprobs"][p]) >= 3


def test_chat_prompt_logprobs(http, hf_model):
    body = {"model": "smol", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 0,
            "prompt_logprobs": 0}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    ids = http.post("/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 0
    entries = out["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    reference = hf_logprobs(hf_model, ids)
    for p in range(1, len(ids)):
        assert list(entries[p]) == [str(ids[p])]  # k = 0: the prompt token alone
        assert abs(entries[p][str(ids[p])]["logprob"] - float(reference[p - 1, ids[p]])) <= TOLERANCE


def test_streamed_echo_carries_the_prompt_logprobs(http, prompt_ids):
    whole = complete(http, echo=True, logprobs=1, max_tokens=3)
    body = {"model": "smol", "prompt": PROMPT, "temperature": 0, "echo": True, "logprobs": 1, "max_tokens": 3,
            "stream": True}
    chunks = []
    with http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):])["choices"][0])
    echo, *rest = chunks
    assert echo["text"] == PROMPT and len(echo["logprobs"]["tokens"]) == len(prompt_ids)
    assert echo["logprobs"]["token_logprobs"][0] is None
    merged = {key: [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert merged == whole["choices"][0]["logprobs"]
    assert rest[-1]["finish_reason"] == "length"


def test_batched_with_plain_requests_and_over_a_cached_prefix(http, prompt_ids, hf_model):
    long_text = {"model": "smol", "prompt": "Write a story about a dragon.", "max_tokens": 40, "temperature": 0,
                 "ignore_eos": True}
    alone = http.post("/v1/completions", json=long_text).json()["choices"][0]["text"]
    complete(http, max_tokens=1)  # the prompt's blocks are now in the prefix cache (if earlier tests left none)
    assert complete(http, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    with ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(http.post, "/v1/completions", json=long_text) for _ in range(2)]
        scored = [pool.submit(complete, http, echo=True, logprobs=1, max_tokens=0) for _ in range(2)]
        reference = hf_logprobs(hf_model, prompt_ids)
        for future in scored:
            out = future.result()
            assert "prompt_tokens_details" not in out["usage"]  # no prefix-cache hit for a scored prompt
            assert_table_matches(out["choices"][0]["logprobs"], prompt_ids, reference, texts(http, prompt_ids))
        assert [f.result().json()["choices"][0]["text"] for f in plain] == [alone, alone]


BAD = [
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"echo": True, "logprobs": 30}, "logprobs"),
    ({"prompt_logprobs": "many"}, "prompt_logprobs"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_prompt_logprobs_requests(http, extra, param):
    response = http.post("/v1/completions", json={"prompt": "hi", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_chat_max_tokens_zero_without_prompt_logprobs_is_refused(http):
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_tokenizer_info(http):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["add_bos_token"] is False and info["add_eos_token"] is False
    assert "<|im_start|>" in info["chat_template"]
    assert info["model_max_length"] == http.get("/v1/models").json()["data"][0]["max_model_len"]
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [2]
