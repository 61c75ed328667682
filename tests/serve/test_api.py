"""The HTTP API through the official `openai` client and raw HTTP, on a server on a loopback port."""
import asyncio
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch

import lorakit as lk
from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.server import ServeConfig, build
from tests.serve.conftest import ADAPTERS, make_adapter

KEYS = {"k-alice": ["lora2", "base"], "k-bob": ["dora4"], "k-admin": ["*"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("api-adapters")
    for name in ADAPTERS["llama"]:
        shutil.copytree(adapter_root / "llama" / name, root / name)
    for i in range(4):
        make_adapter(root / f"extra{i}", "llama", dict(r=4, alpha=8, targets="all-linear"), seed=200 + i)
    return root


@pytest.fixture(scope="module")
def server(root):
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_model_len=64, max_tokens=48,
                               max_lora_rank=8, request_timeout=30))
    with serve_in_background(create_app(served)) as url:
        yield url, served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def merged_greedy_text(root, adapter, prompt_ids, n):
    model = lk.tiny_model("llama")
    if adapter is not None:
        model = lk.merge_and_unload(lk.load_adapter(model, root / adapter))
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def test_models_lists_the_base_and_every_adapter(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == server[1].name == "tiny-llama"
    assert sorted(ids[1:]) == sorted([*ADAPTERS["llama"], "extra0", "extra1", "extra2", "extra3"])


@pytest.mark.parametrize("model", ["dora4", "lora8", "base", "tiny-llama"])
def test_completion_is_the_merged_models_greedy_text(client, server, root, model):
    tok = server[1].tokenizer
    r = client.completions.create(model=model, prompt="The carrier said", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tok.encode("The carrier said")
    adapter = None if model in ("base", "tiny-llama") else model
    assert r.choices[0].text == tok.decode(merged_greedy_text(root, adapter, ids, 8), skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length" and r.model == model
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)


def test_chat_and_streaming_agree_with_non_streaming(client):
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    kw = dict(model="extra1", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(parts) == full.choices[0].message.content and len([p for p in parts if p]) >= 2
    plain = client.completions.create(model="lora2", prompt="abc", max_tokens=10, temperature=0, seed=1)
    streamed = client.completions.create(model="lora2", prompt="abc", max_tokens=10, temperature=0, seed=1, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_concurrent_requests_on_8_adapters_equal_each_alone(server):
    url, served = server
    names = ["lora2", "lora4", "dora4", "lora8", "extra0", "extra1", "extra2", "extra3"]

    async def run(together):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as aclient:
            async def one(name, i):
                r = await aclient.completions.create(model=name, prompt=f"ticket {i}: return", max_tokens=12,
                                                     temperature=0, extra_body={"ignore_eos": True})
                return r.choices[0].text
            if together:
                return await asyncio.gather(*(one(n, i) for i, n in enumerate(names)))
            return [await one(n, i) for i, n in enumerate(names)]
    before = dict(served.engine.counts)
    together = asyncio.run(run(True))
    steps = served.engine.counts["steps"] - before.get("steps", 0)
    rows = served.engine.counts["batched_seqs"] - before.get("batched_seqs", 0)
    alone = asyncio.run(run(False))
    assert together == alone and len(set(alone)) > 4
    assert rows > 1.5 * steps                                 # the concurrent requests shared forward steps


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model="lora8", prompt="xyz", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:8]
    cut = client.completions.create(model="lora8", prompt="xyz", max_tokens=20, temperature=0, stop=[stop, "\x00"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lora8", prompt="xyz", max_tokens=20, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == free[:free.index(stop)]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "lora2", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "lora2", "prompt": "hi", "max_tokens": 49}, 400, "max_tokens"),
    ({"model": "lora2", "prompt": "x" * 80}, 400, "prompt"),
    ({"model": "lora2", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "lora2"}, 400, "prompt"),
    ({"model": "lora2", "prompt": "hi", "n": 0}, 400, "n"),
])
def test_bad_requests_get_an_openai_error_body(server, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_json_and_a_bad_chat_then_the_server_keeps_serving(server, client):
    r = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": "lora2", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert client.completions.create(model="lora2", prompt="ok", max_tokens=2).choices[0].text is not None


def test_disconnect_aborts_the_request(server):
    url, served = server
    aborted = served.engine.counts["finished_abort"]
    with httpx.stream("POST", url + "/v1/completions", json={"model": "dora4", "prompt": "go", "max_tokens": 48,
                                                             "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())                                   # one event, then hang up
    deadline = time.monotonic() + 20
    while served.engine.counts["finished_abort"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.counts["finished_abort"] == aborted + 1
    assert served.engine.metrics()["running"] == 0


def test_load_and_unload_adapters_while_serving(server, client, root):
    url, _ = server
    make_adapter(root / "uploads" / "new", "llama", dict(r=2, alpha=2, targets="qv"), seed=300)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "uploads/new"})
    assert r.status_code == 200, r.text
    assert "fresh" in [m.id for m in client.models.list().data]
    assert client.completions.create(model="fresh", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
    for path in ("../elsewhere", "/etc", "uploads/missing"):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="hi", max_tokens=3)
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404


def test_health_and_prometheus_metrics(server, client):
    url, _ = server
    client.completions.create(model="lora2", prompt="metrics", max_tokens=2)
    assert httpx.get(url + "/health").json() == {"status": "ok", "skipped_adapters": []}
    text = httpx.get(url + "/metrics").text
    for name in ("lorakit_requests_total", "lorakit_generation_tokens_total", "lorakit_queue_depth",
                 "lorakit_batch_sequences_count", "lorakit_adapter_device_hits_total", "lorakit_adapter_cpu_misses_total",
                 "lorakit_adapter_device_evictions_total", "lorakit_adapter_cpu_bytes", "lorakit_kv_cache_bytes",
                 "lorakit_queue_seconds_count", "lorakit_first_token_seconds_sum", "lorakit_request_seconds_sum",
                 'lorakit_http_requests_total{route="/v1/completions",status="200"}'):
        assert name in text, name
    line = next(ln for ln in text.splitlines() if ln.startswith("lorakit_generation_tokens_total"))
    assert float(line.split()[-1]) >= 2


def test_api_keys_scope_tenants(root):
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_lora_rank=8))
    with serve_in_background(create_app(served, {k: set(v) for k, v in KEYS.items()})) as url:
        def call(key, model):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                              headers=headers)
        assert call("k-alice", "lora2").status_code == 200
        assert call("k-alice", "base").status_code == 200
        assert call("k-alice", "dora4").status_code == 403
        assert call("k-bob", "dora4").status_code == 200
        assert call("k-bob", "tiny-llama").status_code == 403
        assert call(None, "lora2").status_code == 401
        assert call("k-mallory", "lora2").status_code == 401
        alice = openai.OpenAI(base_url=url + "/v1", api_key="k-alice", max_retries=0)
        assert [m.id for m in alice.models.list().data] == ["tiny-llama", "lora2"]
        load = {"lora_name": "x", "lora_path": "lora4"}
        assert httpx.post(url + "/v1/load_lora_adapter", json=load,
                          headers={"Authorization": "Bearer k-alice"}).status_code == 403
        assert httpx.post(url + "/v1/load_lora_adapter", json=load,
                          headers={"Authorization": "Bearer k-admin"}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(root):
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_lora_rank=8, max_num_seqs=2, max_queue=2))
    gate = threading.Event()
    read = served.adapters._loader
    served.adapters._loader = lambda name, path: (gate.wait(30), read(name, path))[1]     # loads hang
    with serve_in_background(create_app(served)) as url:
        async def five():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                body = {"model": "lora8", "prompt": "hi", "max_tokens": 2}
                waiting = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(4)]
                while served.engine.queue_depth < 4:          # 2 rows (free) + 2 waiting for a row
                    await asyncio.sleep(0.01)
                fifth = await c.post("/v1/completions", json=body)
                gate.set()
                return fifth, await asyncio.gather(*waiting)
        fifth, first_four = asyncio.run(five())
    assert fifth.status_code == 429 and fifth.headers["retry-after"] == "1"
    assert fifth.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in first_four] == [200] * 4


def test_a_request_past_its_timeout_gets_504_and_is_aborted(root):
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_lora_rank=8, request_timeout=0.5))
    gate = threading.Event()
    read = served.adapters._loader
    served.adapters._loader = lambda name, path: (gate.wait(30), read(name, path))[1]     # the load hangs
    with serve_in_background(create_app(served)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "lora4", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while served.engine.counts["finished_abort"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.engine.counts["finished_abort"] == 1 and served.engine.queue_depth == 0
        gate.set()
        assert httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_device_is_checked_before_anything_loads(root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device is available"):
        build(ServeConfig(model="tiny-llama", adapters=str(root), device="cuda"))
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), device="auto"))
    assert served.engine.runner.device.type == "cpu"
    served.close()
