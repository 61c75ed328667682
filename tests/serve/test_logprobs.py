"""Log-probabilities as vLLM's OpenAI server returns them, checked against each row's merged model.

Requests for a LoRA, a DoRA and the base run in the same batches; every logprob the server reports
must equal log_softmax of a full forward of that row's own merged model (1e-4), for generated
tokens (`logprobs`, chat `top_logprobs`) and for the prompt (`echo`), also when the prompt is
prefilled in several chunks.
"""
import asyncio
import shutil

import httpx
import pytest
import torch

import lorakit as lk
from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.server import ServeConfig, build
from tests.serve.conftest import ADAPTERS

PROMPT = "The carrier said the parcel"


@pytest.fixture(scope="module")
def root(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("logprob-adapters")
    for name in ("lora2", "dora4"):
        shutil.copytree(adapter_root / "llama" / name, root / name)
    return root


@pytest.fixture(scope="module", params=[512, 8], ids=["one-prefill", "chunked-prefill"])
def server(root, request):
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_model_len=96, max_tokens=32,
                               max_lora_rank=8, max_batch_tokens=request.param, request_timeout=60))
    with serve_in_background(create_app(served)) as url:
        yield url, served


@pytest.fixture(scope="module")
def merged(root):
    """model name -> the merged model that row must match."""
    out = {"base": lk.tiny_model("llama")}
    for name in ("lora2", "dora4"):
        out[name] = lk.merge_and_unload(lk.load_adapter(lk.tiny_model("llama"), root / name))
    return out


def full_logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)      # (T, V): row t predicts t + 1


async def _all(url, bodies, path="/v1/completions"):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_completion_logprobs_and_echo_equal_each_rows_merged_model(server, merged):
    url, served = server
    tok = served.tokenizer
    ids = tok.encode(PROMPT)
    bodies = [{"model": m, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 3,
               "echo": True} for m in ("lora2", "dora4", "base")] * 2      # six rows share the batches
    for body, r in zip(bodies, asyncio.run(_all(url, bodies))):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        generated = r.json()["usage"]["completion_tokens"]
        assert generated == 6 and len(lp["tokens"]) == len(ids) + 6
        assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)          # echo first
        all_ids = ids + greedy(merged[body["model"]], ids, 6)
        ref = full_logprobs(merged[body["model"]], all_ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None   # nothing predicts token 0
        for t in range(1, len(all_ids)):
            assert abs(lp["token_logprobs"][t] - ref[t - 1, all_ids[t]].item()) < 1e-4, (body["model"], t)
            top = lp["top_logprobs"][t]
            # the token's own entry first, then the top 3; ids that decode to the same text (the byte-level
            # tokenizer's partial UTF-8 bytes all read '\ufffd') share a key, the first keeping its value
            expected = {}
            for i in [all_ids[t], *ref[t - 1].topk(3).indices.tolist()]:
                expected.setdefault(tok.decode([i]), ref[t - 1, i].item())
            assert list(top) == list(expected) and all(abs(top[k] - v) < 1e-4 for k, v in expected.items())
        for t in range(len(ids), len(all_ids)):            # greedy: each generated token is the top one (lm-eval's
            assert lp["token_logprobs"][t] == max(lp["top_logprobs"][t].values())     # is_greedy test)
        assert lp["text_offset"][0] == 0 and all(b - a == len(s) for a, b, s in
                                                 zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))


def greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_echo_with_max_tokens_0_scores_the_prompt_alone(server, merged):
    """lm-eval's loglikelihood request (prompt as token ids, echo, logprobs 1), and vLLM's max_tokens 0."""
    url, served = server
    ids = served.tokenizer.encode(PROMPT)
    for max_tokens in (0, 1):
        (r,) = asyncio.run(_all(url, [{"model": "dora4", "prompt": [ids], "max_tokens": max_tokens, "echo": True,
                                       "logprobs": 1, "temperature": 0}]))
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens
        ref = full_logprobs(merged["dora4"], ids)
        context = sum(lp["token_logprobs"][1:len(ids)])
        assert context == pytest.approx(sum(ref[t - 1, ids[t]].item() for t in range(1, len(ids))), abs=1e-4)
    assert r.json()["choices"][0]["text"].startswith(PROMPT)


def test_chat_logprobs_and_top_logprobs(server, merged):
    url, served = server
    tok = served.tokenizer
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    body = {"model": "lora2", "messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    (r,) = asyncio.run(_all(url, [body], "/v1/chat/completions"))
    content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    assert "".join(c["token"] for c in content) == r.json()["choices"][0]["message"]["content"]
    ref = full_logprobs(merged["lora2"], prompt + greedy(merged["lora2"], prompt, 5))
    for i, c in enumerate(content):
        assert c["logprob"] == pytest.approx(ref[len(prompt) - 1 + i].max().item(), abs=1e-4)   # greedy: the top
        assert c["top_logprobs"][0]["token"] == c["token"]
    (plain,) = asyncio.run(_all(url, [{**body, "logprobs": False, "top_logprobs": None}], "/v1/chat/completions"))
    assert plain.json()["choices"][0]["logprobs"] is None
