"""n > 1 choices and logprobs in streams, as vLLM's OpenAI server has them.

Choice i of a seeded request draws with seed + i: each choice equals the single-choice request with
that seed, greedy choices are identical, and usage counts the prompt once. A streamed request
carries, chunk by chunk, exactly the logprobs (and echo) of the same request unstreamed.
"""
import json
import shutil

import httpx
import openai
import pytest

from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.server import ServeConfig, build


@pytest.fixture(scope="module")
def url(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("choices")
    shutil.copytree(adapter_root / "llama" / "lora2", root / "lora2")
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_model_len=64, max_tokens=32,
                               max_lora_rank=8, max_num_seqs=8, request_timeout=60))
    with serve_in_background(create_app(served)) as url:
        yield url


def post(url, path, body):
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url, path, body):
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


COMP = {"model": "lora2", "prompt": "The parcel", "max_tokens": 10, "temperature": 1.0, "ignore_eos": True}
CHAT = {"model": "lora2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 1.0,
        "ignore_eos": True}


@pytest.mark.parametrize("path, body", [("/v1/completions", COMP), ("/v1/chat/completions", CHAT)])
def test_each_choice_is_the_request_with_seed_plus_its_index(url, path, body):
    many = post(url, path, {**body, "n": 4, "seed": 7})
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    texts = [c.get("text", c.get("message", {}).get("content")) for c in many["choices"]]
    for i, text in enumerate(texts):
        one = post(url, path, {**body, "seed": 7 + i})["choices"][0]
        assert text == one.get("text", one.get("message", {}).get("content"))
    assert len(set(texts)) > 1
    usage = many["usage"]
    single = post(url, path, {**body, "seed": 7})["usage"]
    assert usage["prompt_tokens"] == single["prompt_tokens"]                       # the prompt counts once
    assert usage["completion_tokens"] == 4 * single["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_choices_are_identical_and_the_openai_client_reads_them(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="lora2", prompt="The parcel", max_tokens=10, temperature=0, n=3,
                                  extra_body={"ignore_eos": True})
    assert len({c.text for c in r.choices}) == 1 and len(r.choices) == 3
    r = client.chat.completions.create(model="base", messages=CHAT["messages"], n=2, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == r.choices[1].message.content


def test_streamed_choices_are_the_unstreamed_ones(url):
    body = {**COMP, "n": 3, "seed": 1, "stop": ["e"], "stream_options": {"include_usage": True}}
    full = post(url, "/v1/completions", {k: v for k, v in body.items() if k != "stream_options"})
    chunks = stream(url, "/v1/completions", body)
    texts = {i: "" for i in range(3)}
    reasons = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            reasons[choice["index"]] = choice["finish_reason"]
    assert [texts[i] for i in range(3)] == [c["text"] for c in full["choices"]]
    assert [reasons[i] for i in range(3)] == [c["finish_reason"] for c in full["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def _joined(chunks, index=0):
    """The streamed logprobs object of one choice, its chunks' lists joined."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index and choice["logprobs"]:
                for key in out:
                    out[key] += choice["logprobs"][key]
    return out


@pytest.mark.parametrize("extra", [{}, {"echo": True}, {"echo": True, "max_tokens": 0}, {"n": 2, "seed": 3}],
                         ids=["plain", "echo", "echo-only", "two-choices"])
def test_streamed_completion_logprobs_equal_the_unstreamed(url, extra):
    body = {**COMP, "logprobs": 3, "seed": 5, **extra}
    full = post(url, "/v1/completions", body)
    chunks = stream(url, "/v1/completions", body)
    for choice in full["choices"]:
        streamed = _joined(chunks, choice["index"])
        assert streamed == choice["logprobs"]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == choice["index"])
        assert text == choice["text"]
    assert all(len(c["choices"][0]["logprobs"]["tokens"]) >= 1 for c in chunks)   # no chunk without its tokens


def test_streamed_chat_logprobs_equal_the_unstreamed(url):
    body = {**CHAT, "logprobs": True, "top_logprobs": 2, "seed": 2}
    full = post(url, "/v1/chat/completions", body)["choices"][0]
    chunks = stream(url, "/v1/chat/completions", body)
    content = [entry for c in chunks for entry in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert content == full["logprobs"]["content"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["message"]["content"]


def test_n_beyond_the_servers_batch_is_refused_naming_it(url):
    r = httpx.post(url + "/v1/completions", json={**COMP, "n": 9}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "at most 8" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={**COMP, "best_of": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
