"""Logit processors (vLLM's semantics) against hand-computed distributions on the merged model.

The oracle runs the merged model one token at a time and applies each processor by hand, in plain
tensor arithmetic written from vLLM's definitions: min_tokens bars EOS, logit_bias adds,
repetition_penalty divides positive and multiplies negative logits of every token seen in the
prompt or output, frequency/presence penalties subtract count x penalty / penalty once. Requests
with different processors share the engine's batches, and a plain row beside them is unchanged.
"""
import shutil

import pytest
import torch

import lorakit as lk
from lorakit.serve import AdapterCache, attach
from lorakit.serve.engine import Engine
from lorakit.serve.forward import runner_for
from lorakit.serve.sampling import BadParam, SamplingParams
from tests.serve.conftest import ADAPTERS

EOS = 0
PROMPT = [5, 17, 17, 42, 9, 17, 3]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("penalties")
    shutil.copytree(adapter_root / "llama" / "lora4", root / "lora4")
    model = lk.tiny_model("llama")
    handle = attach(model, "all-linear", slots=4, r_max=8)
    cache = AdapterCache(handle, root, max_cpu_adapters=4)
    cache.register("lora4", "lora4", load=False)
    return Engine(runner_for(model, handle), cache, eos_token_ids=[EOS], vocab_size=model.config.vocab_size), root


def by_hand(model, prompt, n, p: SamplingParams):
    """Greedy tokens with the processors applied as vLLM defines them."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double()
        if len(out) < p.min_tokens:
            logits[EOS] = float("-inf")
        for token, bias in p.logit_bias:
            logits[token] += bias
        seen = set(prompt) | set(out)
        for t in seen:
            logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
        for t in set(out):
            logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        out.append(int(logits.argmax()))
    return out


CASES = {
    "frequency": dict(frequency_penalty=1.5),
    "presence": dict(presence_penalty=2.0),
    "repetition": dict(repetition_penalty=1.8),
    "negative frequency": dict(frequency_penalty=-1.0),
    "logit_bias": dict(logit_bias=((7, 5.0), (17, -100.0))),
    "everything": dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.3, logit_bias=((11, 2.0),)),
}


def test_each_processor_matches_its_definition_in_one_mixed_batch(engine):
    eng, root = engine
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **kw) for kw in CASES.values()]
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    adapters = ["lora4", None] * 3 + [None]
    got = eng.generate([PROMPT] * 7, adapters, params + [plain])
    models = {None: lk.tiny_model("llama"), "lora4": lk.merge_and_unload(lk.load_adapter(lk.tiny_model("llama"),
                                                                                             root / "lora4"))}
    for name, p, a, tokens in zip(CASES, params, adapters, got):
        assert tokens == by_hand(models[a], PROMPT, 8, p), name
    assert got[-1] == by_hand(models[None], PROMPT, 8, plain)             # the neighbour without processors
    assert got[0] != by_hand(models["lora4"], PROMPT, 8, plain)           # the penalty changed something
    assert 17 not in got[4]                                               # a -100 bias bars the token


def test_min_tokens_bars_eos_then_lets_it_stop(engine):
    eng, _ = engine
    bias_eos = ((EOS, 100.0),)                       # EOS would win every step
    assert eng.generate([PROMPT], params=SamplingParams(max_tokens=6, temperature=0, logit_bias=bias_eos)) == [[EOS]]
    out = eng.generate([PROMPT], params=SamplingParams(max_tokens=6, temperature=0, logit_bias=bias_eos,
                                                       min_tokens=3))[0]
    assert len(out) == 4 and EOS not in out[:3] and out[3] == EOS


@pytest.mark.parametrize("kw", [dict(presence_penalty=3), dict(repetition_penalty=0.0), dict(min_tokens=9),
                                dict(logit_bias=((3, 200.0),))])
def test_out_of_range_processors_are_refused(kw):
    with pytest.raises(BadParam):
        SamplingParams(max_tokens=8, **kw)


def test_the_http_fields_reach_the_engine(tmp_path):
    import httpx

    from lorakit.serve.api import create_app, serve_in_background
    from lorakit.serve.server import ServeConfig, build
    served = build(ServeConfig(model="tiny-llama", adapters=str(tmp_path), max_model_len=64, max_tokens=16,
                               request_timeout=30))
    model, tok = lk.tiny_model("llama"), served.tokenizer
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "frequency_penalty": 1.5, "repetition_penalty": 1.2, "logit_bias": {"7": 5}}
    expected = by_hand(model, PROMPT, 8, SamplingParams(max_tokens=8, frequency_penalty=1.5, repetition_penalty=1.2,
                                                        logit_bias=((7, 5.0),)))
    with serve_in_background(create_app(served)) as url:
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
        stop = expected[2]                           # stop_token_ids: the request ends on that token, kept
        r = httpx.post(url + "/v1/completions", json={**body, "stop_token_ids": [stop]}, timeout=30).json()
        assert r["usage"]["completion_tokens"] == expected.index(stop) + 1 and r["choices"][0]["finish_reason"] == "stop"
        special = tok.convert_tokens_to_ids("<|im_start|>")
        r = httpx.post(url + "/v1/completions", json={**body, "logit_bias": {str(special): 100}, "max_tokens": 2,
                                                      "skip_special_tokens": False}, timeout=30).json()
        assert r["choices"][0]["text"].startswith("<|im_start|>")       # kept: skip_special_tokens false
