"""The engine: alone equals batched, continuous batching, chunked prefill, sampling, aborts, failures."""
import shutil
import threading

import pytest
import torch

import lorakit as lk
from lorakit.serve import AdapterCache, UnknownAdapter, attach
from lorakit.serve.engine import Engine, EngineUnavailable
from lorakit.serve.forward import runner_for
from lorakit.serve.sampling import BadParam, SamplingParams
from lorakit.serve.scheduler import QueueFull
from tests.serve.conftest import ADAPTERS, make_adapter

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def root(request, tmp_path_factory, adapter_root):
    """8 adapters of one family: the 4 of conftest (LoRA, DoRA, ranks 2-8) and 4 more seeds."""
    family = request.param
    root = tmp_path_factory.mktemp(f"engine-{family}")
    for name in ADAPTERS[family]:
        shutil.copytree(adapter_root / family / name, root / name)
    for i, (name, config) in enumerate(ADAPTERS[family].items()):
        make_adapter(root / f"{name}-b", family, config, seed=100 + i)
    return family, root


def make_engine(family, root, slots=8, **kw):
    model = lk.tiny_model(family)
    handle = attach(model, "all-linear", slots=slots, r_max=8)
    cache = AdapterCache(handle, root, max_cpu_adapters=16)
    for folder in sorted(root.iterdir()):
        cache.register(folder.name, folder.name, load=False)
    return Engine(runner_for(model, handle), cache, eos_token_ids=[0], vocab_size=model.config.vocab_size, **kw)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 250, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def merged_greedy(family, folder, prompt, n):
    """The oracle: transformers' own greedy generate on the adapter merged into its own model."""
    model = lk.tiny_model(family)
    if folder is not None:
        model = lk.merge_and_unload(lk.load_adapter(model, folder))
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_alone_equals_batched_8_requests_8_adapters(root):
    family, folder = root
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 8
    ps = prompts(8)
    engine = make_engine(family, folder)
    alone = [engine.generate([p], [a], GREEDY)[0] for p, a in zip(ps, names)]
    batched = engine.generate(ps, names, GREEDY)
    assert batched == alone
    assert all(len(t) == GREEDY.max_tokens for t in batched)
    assert len(set(map(tuple, batched))) > 4                    # the adapters make a difference
    assert engine.counts["batched_seqs"] > engine.counts["steps"]   # rows really did share steps
    for i in (0, 2, 5):                                         # and the tokens are the right ones
        assert batched[i] == merged_greedy(family, folder / names[i], ps[i], GREEDY.max_tokens)
    assert engine.generate([ps[0]], [None], GREEDY)[0] == merged_greedy(family, None, ps[0], GREEDY.max_tokens)
    m = engine.adapters.metrics()
    assert m["pinned"] == 0 and engine.metrics()["running"] == 0 and engine.metrics()["kv_cache_bytes"] == 0


def test_requests_join_and_leave_between_steps_with_chunked_prefill(root):
    family, folder = root
    names = sorted(p.name for p in folder.iterdir())
    long_prompt = prompts(1, seed=5)[0] * 4                    # 12-44 tokens, read in chunks of <= 6
    ps = prompts(5, seed=1) + [long_prompt]
    params = [GREEDY.replace(max_tokens=4 + 2 * i) for i in range(6)]    # they finish at different steps
    engine = make_engine(family, folder, max_batch_tokens=6, max_num_seqs=3)
    alone = [engine.generate([p], [a], s)[0] for p, a, s in zip(ps, names, params)]
    got, ids = {}, []
    for i in range(3):                                          # three start ...
        ids.append(engine.submit(ps[i], names[i], params[i]))
    for step in range(60):
        if step in (2, 4, 6):                                   # ... three join while others decode
            i = len(ids)
            ids.append(engine.submit(ps[i], names[i], params[i]))
        for ev in engine.step():
            got.setdefault(ev.request_id, []).append(ev.token)
        assert engine.last_batch[1] <= 6 and len(engine.scheduler.running) <= 3
    assert [got[i] for i in ids] == alone


def test_sampling_is_per_request(root):
    family, folder = root
    engine = make_engine(family, folder)
    p = prompts(1, seed=2)[0]
    seeded = SamplingParams(max_tokens=8, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    alone = engine.generate([p], ["lora2"], seeded)[0]
    crowd = engine.generate([p] * 4, ["lora2", "lora4", None, "lora2"],
                            [seeded, seeded.replace(seed=8), GREEDY, seeded.replace(seed=9)])
    assert crowd[0] == alone and crowd[1] != alone                   # seed decides, not the neighbours
    assert engine.generate([p], ["lora2"], GREEDY.replace(temperature=1.0, top_k=1))[0] == \
        engine.generate([p], ["lora2"], GREEDY)[0]                 # top_k = 1 is greedy


def test_stop_tokens_eos_and_length(root):
    family, folder = root
    engine = make_engine(family, folder)
    p = prompts(1, seed=3)[0]
    free = engine.generate([p], [None], GREEDY)[0]
    stop = free[3]
    events = []
    engine.submit(p, None, GREEDY.replace(stop_token_ids=(stop,)), events.append)
    while engine.has_work():
        engine.step()
    assert [e.token for e in events] == free[:free.index(stop) + 1] and events[-1].finish_reason == "stop"
    eos_engine = Engine(engine.runner, engine.adapters, eos_token_ids=[stop], vocab_size=engine.vocab_size)
    assert eos_engine.generate([p], [None], GREEDY.replace(ignore_eos=False))[0] == free[:free.index(stop) + 1]
    events.clear()
    engine.submit(p, None, GREEDY.replace(max_tokens=2), events.append)
    while engine.has_work():
        engine.step()
    assert [e.finish_reason for e in events] == [None, "length"]


def test_abort_frees_the_row_and_the_slot(root):
    family, folder = root
    engine = make_engine(family, folder)
    events = []
    rid = engine.submit(prompts(1)[0], "dora4", GREEDY.replace(max_tokens=50), events.append)
    other = engine.submit(prompts(1)[0], "lora2", GREEDY)
    while len(events) < 3:                                      # (the adapters load off this thread first)
        engine.step()
    assert engine.metrics()["kv_cache_bytes"] > 0 and engine.adapters.metrics()["pinned"] == 2
    engine.abort(rid)
    engine.step()
    assert events[-1].finish_reason == "abort" and len(events) == 4
    assert engine.adapters.metrics()["pinned"] == 1 and [s.id for s in engine.scheduler.running] == [other]


def test_bad_requests_are_refused_before_queueing(root):
    family, folder = root
    engine = make_engine(family, folder, max_queue=2, max_model_len=32, max_num_seqs=3)
    with pytest.raises(UnknownAdapter, match="no adapter named 'nope'"):
        engine.submit([1, 2], "nope")
    with pytest.raises(BadParam, match="the prompt has 40 tokens") as e:
        engine.submit([1] * 40)
    assert e.value.param == "prompt"
    with pytest.raises(BadParam, match="exceeds max_model_len = 32") as e:
        engine.submit([1] * 20, None, GREEDY.replace(max_tokens=13))
    assert e.value.param == "max_tokens"
    with pytest.raises(BadParam, match=r"token ids must lie in \[0, 288\)"):
        engine.submit([1, 9999])
    with pytest.raises(BadParam) as e:
        SamplingParams(max_tokens=-1)
    assert e.value.param == "max_tokens"
    for _ in range(3 + 2):                 # 3 free rows, then 2 waiting for a row
        engine.submit([1, 2])
    with pytest.raises(QueueFull, match="2 requests are already waiting for a row"):
        engine.submit([1, 2])
    assert engine.counts["rejected_queue_full"] == 1
    engine.step()                          # 3 rows taken: the queue bound now counts only the 2 left
    with pytest.raises(QueueFull):
        engine.submit([1, 2])


def test_an_adapter_that_fails_to_load_fails_only_its_request(root):
    family, folder = root
    broken = folder.parent / f"{folder.name}-broken"
    shutil.copytree(folder, broken)
    (broken / "lora4" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine = make_engine(family, broken)
    events = []
    engine.submit(prompts(1)[0], "lora4", GREEDY, events.append)
    good = engine.submit(prompts(1)[0], "lora2", GREEDY, events.append)
    while engine.has_work():
        engine.step()
    failed = [e for e in events if e.error is not None]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and "could not be loaded" in str(failed[0].error)
    assert sum(e.request_id == good for e in events) == GREEDY.max_tokens


def test_background_thread_serves_callbacks(root):
    family, folder = root
    engine = make_engine(family, folder).start()
    try:
        done, tokens = threading.Event(), []

        def on(event):
            tokens.append(event.token)
            if event.finished:
                done.set()
        engine.submit(prompts(1)[0], "lora8", GREEDY, on)
        assert done.wait(60)
    finally:
        engine.stop()
    assert len(tokens) == GREEDY.max_tokens


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, temperature=1e-40, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=5e-324, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=100, top_p=1e-300, ignore_eos=True, seed=3),
    SamplingParams(max_tokens=10, temperature=1e-5, top_k=10**9, ignore_eos=True, seed=2**62),
])
def test_extreme_sampling_values_are_safe_and_tiny_temperatures_greedy(root, params):
    family, folder = root
    engine = make_engine(family, folder)
    prompt = prompts(1)[0]
    out = engine.generate([prompt, prompt], ["lora2", "lora2"], [params, GREEDY])
    assert len(out[0]) == 10 and out[1] == merged_greedy(family, folder / "lora2", prompt, 10)
    if params.temperature < 1e-5 or params.top_p < 1e-100:
        assert out[0] == out[1]                     # below vLLM's epsilon, or only the top token kept: greedy


def test_non_finite_logits_and_a_failing_forward_fail_only_their_request(root):
    family, folder = root
    engine = make_engine(family, folder)
    forward = engine.runner.forward
    poisoned = {}

    def flaky(chunks):                                     # as a real forward: raise before any cache changes
        if any(poisoned.get(id(c.cache)) == "raise" for c in chunks):
            raise RuntimeError("this adapter's kernel failed")
        logits = forward(chunks)
        rows = torch.tensor([id(c.cache) in poisoned for c in chunks])[:, None]
        return torch.where(rows, float("nan"), logits)
    engine.runner.forward = flaky
    events = []
    ids = [engine.submit(p, a, GREEDY, events.append) for p, a in zip(prompts(4, seed=5), ["lora2", "dora4", None,
                                                                                          "lora8"])]
    for a in ("lora2", "dora4", "lora8"):                 # in RAM first: all four start together
        engine.adapters.prefetch(a).result()
    engine.step()                                          # admitted: poison the second and the fourth
    seqs = {s.id: s for s in engine.scheduler.running}
    poisoned[id(seqs[ids[1]].cache)] = "nan"
    poisoned[id(seqs[ids[3]].cache)] = "raise"
    while engine.has_work():
        engine.step()
    by = {i: [e for e in events if e.request_id == i] for i in ids}
    for i in (ids[1], ids[3]):
        assert by[i][-1].finish_reason == "error" and by[i][-1].error is not None
    assert "non-finite logits" in str(by[ids[1]][-1].error) and "kernel failed" in str(by[ids[3]][-1].error)
    for i, prompt, adapter in ((ids[0], prompts(4, seed=5)[0], "lora2"), (ids[2], prompts(4, seed=5)[2], None)):
        tokens = [e.token for e in by[i] if e.token is not None]
        assert tokens == merged_greedy(family, None if adapter is None else folder / adapter, prompt, 10)
    assert engine.failure is None and engine.counts["finished_error"] == 2


def test_a_broken_loop_marks_the_engine_failed_and_refuses_work(root):
    family, folder = root
    engine = make_engine(family, folder)
    events, done = [], threading.Event()

    def on(event):
        events.append(event)
        if event.finished:
            done.set()
    engine.scheduler.schedule = lambda new_cache: 1 / 0          # a bug in the loop itself
    engine.start()
    try:
        engine.submit(prompts(1)[0], "lora2", GREEDY, on)
        assert done.wait(30)
        assert events[-1].finish_reason == "error" and "engine failed" in str(events[-1].error)
        assert isinstance(engine.failure, ZeroDivisionError) and not engine.metrics()["healthy"]
        with pytest.raises(EngineUnavailable, match="ZeroDivisionError"):
            engine.submit([1, 2])
    finally:
        engine.stop()


def test_logprobs_and_prompt_logprobs_equal_each_merged_model_on_both_runners(root):
    """Llama's compact forward and the transformers fallback (GPT-2) score prompt and output alike."""
    family, folder = root
    eng = make_engine(family, folder)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    events = {}
    ids = {eng.submit(p, a, params, callback=lambda ev: events.setdefault(ev.request_id, []).append(ev)): (p, a)
           for p, a in zip(prompts(3, seed=5), ["lora2", "dora4", None])}
    while eng.has_work():
        eng.step()
    for rid, (prompt, adapter) in ids.items():
        model = lk.tiny_model(family)
        if adapter is not None:
            model = lk.merge_and_unload(lk.load_adapter(model, folder / adapter))
        output = [ev.token for ev in events[rid]]
        with torch.no_grad():
            lp = model(torch.tensor([prompt + output])).logits[0].double().log_softmax(-1)
        first = events[rid][0].prompt_logprobs
        assert first[0] is None and len(first) == len(prompt)
        for j, pos in enumerate(first[1:], start=1):                 # row j - 1 predicts prompt token j
            assert pos.token == prompt[j] and pos.logprob == pytest.approx(lp[j - 1, prompt[j]].item(), abs=1e-4)
            assert [t for t, _ in pos.top] == lp[j - 1].topk(2).indices.tolist()
        for i, ev in enumerate(events[rid]):
            row = len(prompt) - 1 + i
            assert ev.logprob.token == output[i]
            assert ev.logprob.logprob == pytest.approx(lp[row, output[i]].item(), abs=1e-4)
            assert [v for _, v in ev.logprob.top] == pytest.approx(lp[row].topk(3).values.tolist(), abs=1e-4)
