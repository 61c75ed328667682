"""/tokenize and /detokenize as vLLM has them: the server's own tokenizer, prompts and chat messages."""
import httpx
import pytest

from lorakit.models import tiny_tokenizer
from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.server import ServeConfig, build


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    served = build(ServeConfig(model="tiny-llama", adapters=str(tmp_path_factory.mktemp("none")), max_model_len=64,
                               max_tokens=8, request_timeout=30))
    with serve_in_background(create_app(served)) as url:
        yield url


def test_tokenize_and_detokenize_round_trip(url):
    tok = tiny_tokenizer()
    r = httpx.post(url + "/tokenize", json={"model": "base", "prompt": "Where is parcel 7?", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Where is parcel 7?") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 64 and body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    back = httpx.post(url + "/detokenize", json={"model": "base", "tokens": body["tokens"]}).json()
    assert back == {"prompt": "Where is parcel 7?"}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False) and "token_strs" not in chat
    # what the chat route feeds the engine is what /tokenize says
    r = httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == chat["count"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"model": "nobody", "prompt": "a"}, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_token_requests_name_the_field(url, path, body, param):
    r = httpx.post(url + path, json=body)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text
