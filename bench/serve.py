"""Multi-adapter serving, three measurements in one run (each part in fresh processes):

(a) the batched LoRA op, 32 adapters x 1 row, against peft's mixed batch and a merged model
    (bench/serve_ops.py, run as it is);
(b) end to end: 16 concurrent requests on 16 adapters through `lorakit serve`'s HTTP API (official
    `openai` async client), against transformers + peft serving the same requests one after another
    (`set_adapter` + `generate`), in generated tokens per second; the two must produce the same tokens;
(c) latency: p50/p95 of requests (4 concurrent clients, each request on a random registered adapter)
    with 1 and with 1,000 registered adapters. With 1,000, nearly every request misses the RAM tier
    (64 adapters) and its adapter is read from disk while others decode.
(e) features: (b)'s lorakit side three ways, alternating rounds: plain, every request with
    `logprobs: 5`, and half the requests constrained to a JSON schema (response_format); tokens/s of
    each against plain (targets >= 0.8x and >= 0.7x), and whether every constrained answer validates.
(v) against vLLM's CPU build in its own venv, both tuned (bench/serve_vllm.py; skipped, saying how to
    make the venv, where there is none);
(d) soak: `--soak-minutes` (default 3) of mixed traffic from 16 clients, each request on a random
    adapter: good ones (chat and completions, greedy and sampled, streaming and not) and bad ones
    (max_tokens 0, unknown or unimplemented fields, bad JSON, a body over the cap, a broken adapter,
    clients that give up); requests served, answers by status, p50/p95 latency of the good ones, and
    the server's RSS at start and end (targets: no 5xx but the broken adapter's 500s, RSS +< 5%).
The model is the embedded SmolLM2-135M-Instruct, fp32, 2 threads; adapters r=16, alpha=32, all-linear,
deterministic random weights (the 1,000 of (c) are hard links to one file, so disk holds one copy).

    .venv/bin/python bench/serve.py                 # about 16 minutes; writes bench/results/serve.json
    .venv/bin/python bench/serve.py --parts b,c     # skip (a)
    .venv/bin/python bench/serve.py --parts d       # the soak alone (about 4 minutes)
    .venv/bin/python bench/serve.py --parts e       # logprobs and structured output against plain
    .venv/bin/python bench/serve.py --parts v --make-vllm-venv   # lorakit vs vLLM (creates its venv once)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
QUESTIONS = ["Where is my parcel?", "My blender arrived broken, what now?", "Can I return shoes after 40 days?",
             "The courier left my package at the wrong door.", "How do I change my delivery address?",
             "I was charged twice for one order.", "Do you ship to Norway?", "The box was open on arrival.",
             "Can I exchange a jacket for a larger size?", "My tracking number does not work.",
             "What is your policy on damaged glassware?", "I never received my refund.",
             "Can someone else sign for my parcel?", "The item is not what I ordered.",
             "How long does express shipping take?", "I want to cancel my order."]


def make_adapters(model_name: str, folder: Path, n: int, r: int, alpha: float) -> list[str]:
    import torch

    import lorakit as lk
    from lorakit.inject import adapter_layers

    model, _ = lk.load_base(model_name)
    names = [f"tenant{j:02d}" for j in range(n)]
    for j, name in enumerate(names):
        lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, targets="all-linear"), name=name)
        g = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                if name in layer.adapters:
                    a = layer.adapters[name]
                    a.A.copy_(torch.randn(a.A.shape, generator=g) / a.A.shape[1] ** 0.5)
                    a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.02)
        lk.save_adapter(model, folder / name, name=name)
    return names


def drive(served, client):
    """`lorakit serve`'s arrangement: HTTP on a background thread, the engine on this (the main) thread;
    `client(url)` runs on a third thread and its result is returned."""
    import threading

    from lorakit.serve.api import create_app, serve_in_background

    out = {}
    with serve_in_background(create_app(served, start_engine=False)) as url:
        def run():
            try:
                out["result"] = client(url)
            except BaseException as e:          # report it from the main thread
                out["error"] = e
            finally:
                served.engine.stop()
        thread = threading.Thread(target=run)
        thread.start()
        served.engine.run()
        thread.join()
    served.close()
    if "error" in out:
        raise out["error"]
    return out["result"]


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


# -- (b) ----------------------------------------------------------------------------------------
def e2e_lorakit(args) -> dict:
    import asyncio

    import openai

    from lorakit.serve.server import ServeConfig, build

    names = sorted(p.name for p in Path(args.dir).iterdir())
    served = build(ServeConfig(model=args.model, adapters=args.dir, max_num_seqs=len(names), max_batch_tokens=1024,
                               device=args.device, dtype=args.dtype))
    base = served.engine.runner.model
    slot = next(iter(served.engine.runner.handle.layers.values())).A.dtype
    adapter_params = sum(layer.A.shape[1] * (layer.d_in + layer.d_out)
                         for layer in served.engine.runner.handle.layers.values())   # r_max per layer, one slot
    bytes_read = {"base": sum(t.nbytes for t in base.parameters()),        # what one decode step must read
                  "adapter": adapter_params * slot.itemsize, "params": sum(t.numel() for t in base.parameters()),
                  "adapter_params": adapter_params, "dtype": str(next(base.parameters()).dtype)}
    for name in names:                             # read every adapter before timing (peft loads its up front too)
        served.adapters.prefetch(name).result()

    variant = getattr(args, "variant", None) or "plain"

    async def run(url, prompts):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600) as client:
            async def one(j, name, ids):
                extra = {"ignore_eos": True}
                if variant == "logprobs":
                    extra["logprobs"] = 5
                tokens = args.tokens
                if variant == "json" and j % 2 == 0:
                    extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "ticket",
                                                                                      "schema": SCHEMA}}
                    tokens = 2 * args.tokens
                r = await client.completions.create(model=name, prompt=ids, max_tokens=tokens, temperature=0,
                                                    extra_body=extra)
                return r.usage.completion_tokens, r.choices[0].text
            t = time.perf_counter()
            results = await asyncio.gather(*(one(j, n, p) for j, (n, p) in enumerate(zip(names, prompts))))
            return time.perf_counter() - t, sum(c for c, _ in results), [text for _, text in results]

    prompts = [chat_ids(served.tokenizer, q) for q in QUESTIONS[:len(names)]]
    def client(url):
        asyncio.run(run(url, prompts[:2]))                             # warm-up
        steps = served.engine.counts["steps"]
        seconds, generated, texts = asyncio.run(run(url, prompts))
        return seconds, generated, texts, served.engine.counts["steps"] - steps
    seconds, generated, texts, steps = drive(served, client)
    valid = [_validates(text) for j, text in enumerate(texts) if variant == "json" and j % 2 == 0]
    return {"seconds": seconds, "generated": generated, "tokens_per_s": generated / seconds, "variant": variant,
            "precision": served.precision, "bytes_read": bytes_read, "texts": dict(zip(names, texts)), "steps": steps, "constrained_valid": sum(valid),
            "constrained": len(valid)}


# (e)'s schema: a ticket triage answer that fits in (e)'s token budget (a constrained request gets twice
# --tokens, as its answer must close; it ends when the grammar is complete, a free one at --tokens)
SCHEMA = {"type": "object", "properties": {
    "category": {"enum": ["delivery", "damage", "return", "billing", "other"]},
    "urgent": {"type": "boolean"},
    "reply": {"type": "string", "maxLength": 60},
    "steps": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 2}},
    "required": ["category", "urgent", "reply", "steps"], "additionalProperties": False}


def _validates(text: str) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def e2e_peft(args) -> dict:
    import peft
    import torch

    import lorakit as lk

    from lorakit.models import resolve_device
    from lorakit.serve.server import serve_dtype

    names = sorted(p.name for p in Path(args.dir).iterdir())
    base, tokenizer = lk.load_base(args.model, dtype=serve_dtype(args.dtype, resolve_device(args.device))[0])
    base.to(args.device)
    model = peft.PeftModel.from_pretrained(base, Path(args.dir) / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(args.dir) / name, adapter_name=name)
    model.eval()
    base.generation_config.eos_token_id = None          # as ignore_eos: the same greedy tokens, all of them
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:len(names)]]

    def one(name, ids, n):
        model.set_adapter(name)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids], device=args.device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=args.device),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()
    one(names[0], prompts[0], 4)                                       # warm-up
    t = time.perf_counter()
    tokens = {name: one(name, ids, args.tokens) for name, ids in zip(names, prompts)}
    seconds = time.perf_counter() - t
    generated = sum(map(len, tokens.values()))
    return {"seconds": seconds, "generated": generated, "tokens_per_s": generated / seconds,
            "texts": {n: tokenizer.decode(t, skip_special_tokens=True) for n, t in tokens.items()}}


# -- (c) ----------------------------------------------------------------------------------------
def latency(args) -> dict:
    import asyncio

    import openai

    from lorakit.serve.server import ServeConfig, build

    served = build(ServeConfig(model=args.model, adapters=args.dir, max_num_seqs=16, device=args.device))
    names = served.adapters.names()
    rng = random.Random(0)
    plan = [(rng.choice(names), QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]
    prompts = {q: chat_ids(served.tokenizer, q) for q in QUESTIONS}

    async def run(url):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600) as client:
            queue, times = list(plan), []

            async def worker():
                while queue:
                    name, q = queue.pop(0)
                    t = time.perf_counter()
                    await client.completions.create(model=name, prompt=prompts[q], max_tokens=args.latency_tokens,
                                                    temperature=0, extra_body={"ignore_eos": True})
                    times.append(time.perf_counter() - t)
            await asyncio.gather(*(worker() for _ in range(args.clients)))
            return times

    def client(url):
        return asyncio.run(run(url))
    warm = list(plan[:args.clients])
    plan[:0] = warm                                                     # the first round warms up
    times = drive(served, client)[len(warm):]
    m, c = served.adapters.metrics(), served.engine.counts
    q = statistics.quantiles(times, n=20)
    return {"registered": len(names), "requests": len(times), "p50_s": statistics.median(times), "p95_s": q[18],
            "mean_queue_s": c["queue_seconds"] / c["timed_requests"],      # arrival -> admitted (adapter loaded)
            "mean_first_token_s": c["first_token_seconds"] / c["timed_requests"],
            "loads": m["loads"], "cpu_misses": m["cpu_misses"], "device_misses": m["device_misses"]}


# -- (d) ----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def soak_traffic(rng: random.Random, names: list[str]) -> tuple[str, str, object, bool]:
    """(kind, path, body or raw bytes, streamed) of one random request: 70% good, 30% bad."""
    name, q = rng.choice(names), rng.choice(QUESTIONS)
    chat = {"model": name, "messages": [{"role": "user", "content": q}], "max_tokens": rng.randint(4, 16)}
    comp = {"model": name, "prompt": q, "max_tokens": rng.randint(4, 16), "temperature": rng.choice([0, 0.7, 1e-40])}
    if rng.random() < 0.7:
        stream = rng.random() < 0.5
        body = dict(chat if rng.random() < 0.5 else comp, stream=stream)
        return "good", "/v1/chat/completions" if "messages" in body else "/v1/completions", body, stream
    bad = [("/v1/completions", {**comp, "max_tokens": 0}), ("/v1/completions", {**comp, "guided_regex": "([a-"}),
           ("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), ("/v1/completions", {**comp, "x": 1}),
           ("/v1/completions", b"{not json"), ("/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}'),
           ("/v1/completions", {**comp, "model": "broken"}), ("/v1/completions", {**comp, "model": "nope"}),
           ("giveup", {**comp, "max_tokens": 16, "ignore_eos": True})]
    path, body = rng.choice(bad)
    return "bad", path, body, False


def soak(args) -> dict:
    import asyncio
    import collections
    import shutil as sh

    import httpx

    from lorakit.serve.server import ServeConfig, build

    root = Path(args.dir)
    sh.copytree(root / sorted(os.listdir(root))[0], root / "broken")
    served = build(ServeConfig(model=args.model, adapters=str(root), max_num_seqs=16, device=args.device))
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"broken on the server")
    names = [n for n in served.adapters.names() if n != "broken"] + ["base"]
    stats = {"status": collections.Counter(), "latency": [], "served": 0}

    async def one(c, rng):
        kind, path, body, stream = soak_traffic(rng, names)
        t = time.perf_counter()
        try:
            if path == "giveup":
                await c.post("/v1/completions", json=body, timeout=0.2)
                code = "finished"
            elif isinstance(body, bytes):
                code = (await c.post(path, content=body, headers={"content-type": "application/json"})).status_code
            elif stream:
                async with c.stream("POST", path, json=body) as r:
                    text = "".join([line async for line in r.aiter_lines()])
                    code = r.status_code if '"finish_reason": "error"' not in text else "stream-error"
            else:
                code = (await c.post(path, json=body)).status_code
        except httpx.TimeoutException:
            code = "gave up"
        stats["status"][str(code)] += 1
        if kind == "good" and code == 200:
            stats["served"] += 1
            stats["latency"].append(time.perf_counter() - t)

    async def run(url, seconds):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            end = time.monotonic() + seconds

            async def client(k):
                rng = random.Random(k)
                while time.monotonic() < end:
                    await one(c, rng)
            await asyncio.gather(*(client(k) for k in range(16)))

    def client(url):
        asyncio.run(run(url, 10))                                      # warm-up: caches, allocator
        for key in ("status", "latency"):
            stats[key].clear()
        stats["served"], start = 0, rss_bytes()
        asyncio.run(run(url, args.soak_minutes * 60))
        return start, rss_bytes()
    start, end = drive(served, client)
    q = statistics.quantiles(stats["latency"], n=20)
    return {"minutes": args.soak_minutes, "served": stats["served"], "status": dict(stats["status"]),
            "p50_s": statistics.median(stats["latency"]), "p95_s": q[18], "rss_start": start, "rss_end": end,
            "rss_growth": end / start - 1}


def make_many(src: Path, root: Path, n: int) -> None:
    for j in range(n):
        d = root / f"t{j:04d}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
        os.link(src / "adapter_model.safetensors", d / "adapter_model.safetensors")


# -- (e) ----------------------------------------------------------------------------------------
def features(args, folder: Path) -> dict:
    """Plain, logprobs and JSON-schema rounds of (b)'s lorakit side, alternating; medians."""
    rounds = [{v: spawn("e2e-lorakit", dir=folder, variant=v) for v in ("plain", "logprobs", "json")}
              for _ in range(args.rounds)]
    rate = {v: statistics.median(r[v]["tokens_per_s"] for r in rounds) for v in ("plain", "logprobs", "json")}
    ratios = {v: [r[v]["tokens_per_s"] / r["plain"]["tokens_per_s"] for r in rounds] for v in ("logprobs", "json")}
    valid = [(r["json"]["constrained_valid"], r["json"]["constrained"]) for r in rounds]
    same = [sum(r["logprobs"]["texts"][n] == r["plain"]["texts"][n] for n in r["plain"]["texts"]) for r in rounds]
    print(f"\n(e) {args.adapters} concurrent requests on {args.adapters} adapters, {args.tokens} tokens at most "
          f"(greedy); median of {args.rounds} alternating rounds\n\n| workload | tokens/s | vs plain | target |\n"
          f"| --- | ---: | ---: | ---: |\n| plain | {rate['plain']:.1f} | | |\n"
          f"| every request `logprobs: 5` | {rate['logprobs']:.1f} | x{statistics.median(ratios['logprobs']):.2f} | "
          f">= 0.8x |\n| half the requests on a JSON schema | {rate['json']:.1f} | "
          f"x{statistics.median(ratios['json']):.2f} | >= 0.7x |\n\nconstrained answers that validate, per round: "
          + ", ".join(f"{a}/{b}" for a, b in valid) + f"; logprobs rounds' text identical to plain: {same}",
          flush=True)
    return {"rounds": rounds, "tokens_per_s": rate, "ratios": ratios,
            "median_ratio": {v: statistics.median(x) for v, x in ratios.items()}, "valid": valid,
            "logprobs_text_identical": same}


def decode_roofline(ours: dict, active: int) -> dict:
    """(b)'s tokens/s against the decode step's floor (`roofline.decode_bound`): `active` rows on
    `active` adapters read the base once and each adapter once, and do 2 FLOPs per weight per row.
    Prefill, attention and the KV cache are left out: the bound is generous."""
    import roofline

    limits, b = roofline.machine(), ours["bytes_read"]
    dtype = "bf16" if b["dtype"] == "torch.bfloat16" else "fp32"
    floor = roofline.decode_bound(active, b["params"], b["adapter_params"], b["base"], b["adapter"], limits, dtype)
    bound = active / floor["floor_s"]
    cpu = limits["cpu"]
    print(f"roofline: {cpu['model']} ({', '.join(cpu['flags'])}), copy {limits['bandwidth_gbs']:.1f} GB/s, "
          f"{dtype} {limits[dtype + '_gflops']:.0f} GFLOP/s; weights {ours['precision']}: a {active}-row step reads "
          f"{(b['base'] + active * b['adapter']) / 2**20:,.0f} MiB ({floor['bytes_s'] * 1e3:.1f} ms) and computes "
          f"{2 * active * (b['params'] + b['adapter_params']) / 1e9:.1f} GFLOP ({floor['flops_s'] * 1e3:.1f} ms): "
          f"{floor['binds']}-bound, at most {bound:,.0f} tokens/s; lorakit serve reached "
          f"{ours['tokens_per_s'] / bound:.1%} of it", flush=True)
    return {"machine": limits, **floor, "bound_tokens_per_s": bound, "fraction": ours["tokens_per_s"] / bound}


def vllm_prompts(model_dir: Path, names: list[str]) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [chat_ids(tokenizer, q) for q in QUESTIONS[:len(names)]]


# -- driver -------------------------------------------------------------------------------------
WORKERS = {"e2e-lorakit": e2e_lorakit, "e2e-peft": e2e_peft, "latency": latency, "soak": soak}


def spawn(kind: str, **extra) -> dict:
    argv = [sys.executable, __file__, "--worker", kind] + sum(([f"--{k.replace('_', '-')}", str(v)]
                                                              for k, v in extra.items()), []) + sys.argv[1:]
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if done.returncode:
        sys.exit(f"{kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--adapters", type=int, default=16, help="(b): adapters = concurrent requests")
    p.add_argument("--tokens", type=int, default=64, help="(b): tokens generated per request")
    p.add_argument("--requests", type=int, default=48, help="(c): timed requests per setting")
    p.add_argument("--clients", type=int, default=4, help="(c): concurrent clients")
    p.add_argument("--latency-tokens", type=int, default=16, help="(c): tokens per request")
    p.add_argument("--many", type=int, default=1000, help="(c): registered adapters in the large setting")
    p.add_argument("--soak-minutes", type=float, default=3, help="(d): minutes of mixed traffic")
    p.add_argument("--rounds", type=int, default=3, help="(b), (c): alternating rounds of the two sides")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides of every part)")
    p.add_argument("--dtype", default="float32", help="(b): the base's dtype on both sides: float32, bfloat16 or "
                   "auto (bfloat16 where the CPU computes it in hardware); peft keeps fp32 adapters")
    p.add_argument("--vllm-venv", default=str(HERE.parent / ".cache" / "vllm-venv"), help="(v): vLLM's own venv")
    p.add_argument("--make-vllm-venv", action="store_true", help="(v): create that venv if it is missing")
    p.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    p.add_argument("--worker", choices=WORKERS)
    p.add_argument("--dir")
    p.add_argument("--variant", choices=["plain", "logprobs", "json"], help="(e): the worker's variant")
    args = p.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return

    parts, out = set(args.parts.split(",")), {"args": vars(args)}
    if "a" in parts:
        ops_json = HERE / "results" / "serve_ops.json"
        cmd = [sys.executable, str(HERE / "serve_ops.py"), "--threads", str(args.threads), "--device", args.device,
               "--out", str(ops_json)]
        print("(a) the batched op in the whole model (bench/serve_ops.py)\n", flush=True)
        subprocess.run(cmd, check=True)
        out["a"] = json.loads(ops_json.read_text())["ratios"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_adapters(args.model, tmp / "b", args.adapters, args.r, args.alpha)
        if "b" in parts:
            pairs = []                        # alternate the two sides, as (c) does: the VM drifts
            for _ in range(args.rounds):
                pairs.append((spawn("e2e-lorakit", dir=tmp / "b"), spawn("e2e-peft", dir=tmp / "b")))
            ratios = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in pairs]
            ours, theirs = pairs[ratios.index(statistics.median_low(ratios))]      # the median round
            same = [sum(o["texts"][n] == t["texts"][n] for n in o["texts"]) for o, t in pairs]
            out["b"] = {"rounds": [{"lorakit": o, "peft_sequential": t} for o, t in pairs], "ratios": ratios,
                        "speedup": statistics.median(ratios), "identical_outputs": same}
            print(f"\n(b) {args.adapters} concurrent requests on {args.adapters} adapters, {args.tokens} tokens each "
                  f"(greedy); the median of {args.rounds} alternating rounds\n\n| server | tokens/s | wall (s) |\n"
                  f"| --- | ---: | ---: |\n"
                  f"| lorakit serve (HTTP, continuous batching) | {ours['tokens_per_s']:.1f} | {ours['seconds']:.2f} |\n"
                  f"| transformers + peft, one request after another | {theirs['tokens_per_s']:.1f} | "
                  f"{theirs['seconds']:.2f} |\n| **speed-up** (target >= 5x) | **x{out['b']['speedup']:.2f}** | |\n"
                  f"\nper round: " + ", ".join(f"x{r:.2f}" for r in ratios) +
                  f"; identical completions (text) per round: {same} of {len(ours['texts'])}", flush=True)
            out["b"]["roofline"] = decode_roofline(ours, args.adapters)
        if "c" in parts:
            src = tmp / "b" / sorted(os.listdir(tmp / "b"))[0]
            make_many(src, tmp / "one", 1)
            make_many(src, tmp / "many", args.many)
            rounds = []                       # alternate the settings: this VM's speed drifts by tens of percent
            for _ in range(args.rounds):
                rounds.append({"one": spawn("latency", dir=tmp / "one"), "many": spawn("latency", dir=tmp / "many")})
            med = {k: {q: statistics.median(r[k][q] for r in rounds) for q in ("p50_s", "p95_s")} for k in ("one", "many")}
            out["c"] = {"rounds": rounds, "median": med, "p50_ratio": med["many"]["p50_s"] / med["one"]["p50_s"],
                        "p95_ratio": med["many"]["p95_s"] / med["one"]["p95_s"],
                        "round_ratios": [(r["many"]["p50_s"] / r["one"]["p50_s"], r["many"]["p95_s"] / r["one"]["p95_s"])
                                         for r in rounds]}
            print(f"\n(c) latency, {args.clients} concurrent clients, {args.requests} requests of {args.latency_tokens} "
                  f"tokens, each on a random registered adapter; median of {args.rounds} alternating rounds\n\n"
                  f"| registered adapters | p50 (s) | p95 (s) | mean wait for admission (s) | mean to first token (s) | "
                  f"adapter loads from disk per round |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
            for k in ("one", "many"):
                wait = statistics.median(r[k]["mean_queue_s"] for r in rounds)
                first = statistics.median(r[k]["mean_first_token_s"] for r in rounds)
                print(f"| {rounds[0][k]['registered']:,} | {med[k]['p50_s']:.3f} | {med[k]['p95_s']:.3f} | {wait:.3f} | "
                      f"{first:.3f} | {rounds[0][k]['loads']} |")
            print(f"| **ratio** (target <= 1.2x) | **x{out['c']['p50_ratio']:.2f}** | **x{out['c']['p95_ratio']:.2f}** | | | |")
            print("\nper round (p50, p95 ratio): " + ", ".join(f"x{a:.2f} / x{b:.2f}" for a, b in out["c"]["round_ratios"]))
        if "e" in parts:
            out["e"] = features(args, tmp / "b")
        if "v" in parts:
            import serve_vllm
            out["v"] = serve_vllm.run(args, tmp / "b", vllm_prompts)
        if "d" in parts:
            out["d"] = d = spawn("soak", dir=tmp / "b")
            print(f"\n(d) soak: {d['minutes']:g} min, 16 clients, mixed good and bad requests on random adapters\n\n"
                  f"| good requests served | answers by status | p50 (s) | p95 (s) | RSS start -> end (MiB) |\n"
                  f"| ---: | --- | ---: | ---: | ---: |\n| {d['served']:,} | "
                  + ", ".join(f"{k}: {v:,}" for k, v in sorted(d["status"].items())) +
                  f" | {d['p50_s']:.2f} | {d['p95_s']:.2f} | {d['rss_start'] / 2**20:.0f} -> "
                  f"{d['rss_end'] / 2**20:.0f} ({d['rss_growth']:+.1%}) |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
