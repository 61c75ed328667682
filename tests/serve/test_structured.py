"""Structured output: random JSON schemas, regexes, choices and grammars, mixed with free rows.

The oracle is `jsonschema` (an independent validator) for JSON and `re.fullmatch` for regexes:
every constrained output must parse and validate. Free rows in the same batches must produce the
tokens they produce alone. The model is a tiny random Llama, so the text inside the structure is
noise: what the grammar allows, drawn from the model's distribution, not what a trained model
would write.
"""
import json
import random
import re
import shutil

import httpx
import jsonschema
import pytest
import torch
import transformers

import lorakit as lk
from lorakit.models import tiny_tokenizer
from lorakit.serve import AdapterCache, attach
from lorakit.serve.api import create_app, serve_in_background
from lorakit.serve.engine import Engine
from lorakit.serve.forward import runner_for
from lorakit.serve.sampling import BadParam, SamplingParams
from lorakit.serve.server import ServeConfig, build
from lorakit.serve.structured import Grammars, Structured

MAX_LEN = 512


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A bounded schema (strings, arrays and numbers have limits, so any output ends within MAX_LEN)."""
    kinds = ["string", "integer", "boolean", "enum", "null", "array"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds) if depth else "object"
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 5)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None, "a b"], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 2)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    names = rng.sample(["id", "name", "tags", "ok", "price", "meta", "items", "x"], rng.randint(1, 3))
    props = {n: random_schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, adapter_root):
    """A tiny Llama with a 512-token context, a LoRA and a DoRA adapter, and JSON without free whitespace
    (a random model would otherwise pad it with whitespace up to the length limit)."""
    root = tmp_path_factory.mktemp("structured")
    for name in ("lora4", "dora4"):
        shutil.copytree(adapter_root / "llama" / name, root / name)
    config = lk.tiny_model("llama").config
    config.max_position_embeddings = MAX_LEN
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    tok = tiny_tokenizer()
    handle = attach(model, "all-linear", slots=4, r_max=8)
    cache = AdapterCache(handle, root, max_cpu_adapters=4)
    for name in ("lora4", "dora4"):
        cache.register(name, name, load=False)
    V = config.vocab_size

    def engine(**kw):
        return Engine(runner_for(model, handle), cache, eos_token_ids=[tok.eos_token_id], vocab_size=V,
                      max_num_seqs=16, grammars=Grammars(tok, V, **kw))
    return engine, tok


def text_of(tok, tokens) -> str:
    if tokens and tokens[-1] == tok.eos_token_id:
        tokens = tokens[:-1]
    return tok.decode(tokens)


def test_fifty_random_schemas_always_validate_and_free_rows_are_unchanged(setup):
    make, tok = setup
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(50)]
    prompt = tok.encode("Reply in JSON:")
    constrained = [SamplingParams(max_tokens=MAX_LEN - 40, temperature=1.0, seed=i,
                                  structured=Structured("json", json.dumps(s))) for i, s in enumerate(schemas)]
    free = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.9, seed=100 + i, ignore_eos=True)
            for i in range(14)]
    params, order = constrained + free, list(range(64))
    rng.shuffle(order)                                 # free and constrained rows interleave in every batch
    adapters = [(None, "lora4", "dora4")[i % 3] for i in range(64)]
    eng = make(disable_any_whitespace=True)
    got = eng.generate([prompt] * 64, [adapters[i] for i in order], [params[i] for i in order])
    out = {i: tokens for i, tokens in zip(order, got)}
    for i, schema in enumerate(schemas):
        value = json.loads(text_of(tok, out[i]))
        jsonschema.validate(value, schema)
    assert len({text_of(tok, out[i]) for i in range(50)}) > 40            # the constraint is not one fixed text
    for j, p in enumerate(free, start=50):                                # the same rows alone
        assert make().generate([prompt], [adapters[j]], [p])[0] == out[j], j


def test_default_json_allows_whitespace_and_still_parses(setup):
    make, tok = setup
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
              "required": ["ok", "n"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=MAX_LEN - 20, seed=s, structured=Structured("json", json.dumps(schema)))
              for s in range(4)]
    texts = [text_of(tok, t) for t in make().generate([tok.encode("{")] * 4, None, params)]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert any(re.search(r"\s", t) for t in texts)                 # vLLM's default: any whitespace between tokens


@pytest.mark.parametrize("kind, spec, check", [
    ("regex", r"[a-c]{3}-[0-9]{2}", lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
    ("choice", json.dumps(["yes", "no", "not sure"]), lambda t: t in ("yes", "no", "not sure")),
    ("grammar", 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,2}/', lambda t: re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", t)),
    ("json_object", "", lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_choice_grammar_and_json_object(setup, kind, spec, check):
    make, tok = setup
    params = [SamplingParams(max_tokens=MAX_LEN - 20, seed=s, structured=Structured(kind, spec)) for s in range(6)]
    for tokens in make(disable_any_whitespace=True).generate([tok.encode("go")] * 6, None, params):
        assert check(text_of(tok, tokens)), (kind, text_of(tok, tokens))


def test_a_constraint_that_does_not_compile_is_refused_naming_it(setup):
    make, tok = setup
    eng = make()
    with pytest.raises(BadParam, match="regex constraint does not compile") as e:
        eng.submit(tok.encode("x"), None, SamplingParams(structured=Structured("regex", "([a-", "guided_regex")))
    assert e.value.param == "guided_regex"
    with pytest.raises(BadParam, match="not a JSON schema"):
        eng.submit(tok.encode("x"), None, SamplingParams(structured=Structured("json", "{not json")))
    no_grammar = Engine(eng.runner, None, eos_token_ids=[0], vocab_size=eng.vocab_size)
    with pytest.raises(BadParam, match="not available"):
        no_grammar.submit(tok.encode("x"), None, SamplingParams(structured=Structured("json_object")))


# -- over HTTP ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_root):
    root = tmp_path_factory.mktemp("structured-http")
    shutil.copytree(adapter_root / "llama" / "lora2", root / "lora2")
    served = build(ServeConfig(model="tiny-llama", adapters=str(root), max_model_len=64, max_tokens=60,
                               max_lora_rank=8, request_timeout=60, disable_any_whitespace=True))
    with serve_in_background(create_app(served)) as url:
        yield url


SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tone": {"enum": ["calm", "terse"]}},
         "required": ["ok", "tone"], "additionalProperties": False}


@pytest.mark.parametrize("route, body", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SMALL}}}),
    ("completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SMALL,
                                                                                   "strict": True}}}),
    ("chat", {"structured_outputs": {"json": SMALL}}),
    ("completions", {"guided_json": SMALL}),
])
def test_json_schema_over_http(server, route, body):
    for seed in range(3):
        text, reason = _ask(server, route, {**body, "seed": seed, "temperature": 1.0})
        jsonschema.validate(json.loads(text), SMALL)
        assert reason == "stop"


def test_choice_regex_and_json_object_over_http(server):
    text, _ = _ask(server, "chat", {"structured_outputs": {"choice": ["refund", "replace"]}, "model": "lora2"})
    assert text in ("refund", "replace")
    text, _ = _ask(server, "completions", {"guided_choice": ["A", "B"]})
    assert text in ("A", "B")
    text, _ = _ask(server, "completions", {"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", text)
    text, reason = _ask(server, "completions", {"response_format": {"type": "json_object"}, "max_tokens": 60,
                                                "prompt": "{", "seed": 1, "temperature": 1.0})
    assert isinstance(json.loads(text), dict) if reason == "stop" else text.startswith("{")   # 64-token model
    text, _ = _ask(server, "chat", {"response_format": {"type": "text"}, "max_tokens": 4})   # free
    assert isinstance(text, str)


def test_streamed_structured_output_parses(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": 3, "max_tokens": 36,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SMALL}}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), SMALL)


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "frob"}}}},
     "response_format", "does not compile"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not support"),
    ({"guided_regex": "([a-"}, "guided_regex", "does not compile"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "only one"),
])
def test_bad_constraints_are_400s_naming_the_field(server, body, param, message):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def _ask(url, route, body):
    base = {"model": "base", "max_tokens": 36, "temperature": 0}
    if route == "chat":
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={**base, "messages": [{"role": "user", "content": "hi"}], **body})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={**base, "prompt": "Answer:", **body})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def test_logprobs_of_a_constrained_row_are_of_the_masked_distribution(server):
    """vLLM applies the grammar mask before its raw logprobs: the allowed tokens share all the mass."""
    r = httpx.post(f"{server}/v1/completions", timeout=30, json={
        "model": "base", "prompt": "Answer:", "max_tokens": 3, "logprobs": 5, "guided_choice": ["x", "y"]})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"] in ("x", "y")
    tops = lp["top_logprobs"][0]
    allowed = {t: v for t, v in tops.items() if v > -9999}
    assert set(allowed) == {"x", "y"} and abs(sum(2.718281828 ** v for v in allowed.values()) - 1) < 1e-4
    assert set(tops.values()) - set(allowed.values()) == {-9999.0}          # the barred ones, clamped as vLLM does
