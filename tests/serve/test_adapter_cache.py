"""The two-tier adapter cache: LRU per tier, pins, one future per adapter, confinement, failures, memory."""
import gc
import json
import os
import shutil
import threading

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.serve import (AdapterCache, AdapterError, AdapterExists, AdapterLoadError, AdapterPathError, NoFreeSlot,
                           UnknownAdapter, attach)
from tests.helpers import inputs, logits
from tests.serve.conftest import ADAPTERS, make_adapter


@pytest.fixture
def root(tmp_path, adapter_root):
    """A private adapter root holding copies of the llama adapters (tests may break them)."""
    shutil.copytree(adapter_root / "llama", tmp_path / "root")
    return tmp_path / "root"


@pytest.fixture
def served():
    model = lk.tiny_model("llama")
    return model, attach(model, "all-linear", slots=4, r_max=8)


def expected_logits(folder, x):
    return logits(lk.merge_and_unload(lk.load_adapter(lk.tiny_model("llama"), folder)), x)


def test_register_acquire_and_serve(root, served):
    model, handle = served
    x = inputs(model, batch=3)
    with AdapterCache(handle, root, max_cpu_adapters=4) as cache:
        cache.register("a", "lora2")
        cache.register("d", str(root / "dora4"))                      # absolute, inside the root
        with cache.use("a") as ka, cache.use("d") as kd, handle.rows([ka, -1, kd]):
            got = logits(model, x)
        torch.testing.assert_close(got[0], expected_logits(root / "lora2", x[:1])[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1], logits(lk.tiny_model("llama"), x[1:2])[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[2], expected_logits(root / "dora4", x[2:])[0], atol=1e-4, rtol=0)
        m = cache.metrics()
        assert (m["registered"], m["cpu_adapters"], m["active_adapters"], m["pinned"]) == (2, 2, 2, 0)
        assert (m["cpu_misses"], m["cpu_hits"], m["device_misses"], m["device_hits"], m["loads"]) == (2, 2, 2, 0, 2)   # acquire found both in RAM
        assert m["cpu_bytes"] == m["device_bytes"] > 0
        assert m["device_slot_bytes"] == handle.slot_bytes() > m["device_bytes"]
        assert cache.names() == ["a", "d"] and "a" in cache


def test_cpu_tier_is_lru(root, served):
    _, handle = served
    with AdapterCache(handle, root, max_cpu_adapters=2) as cache:
        for name in ("lora2", "lora4", "dora4"):
            cache.register(name, name, load=False)
        assert cache.metrics()["cpu_adapters"] == 0
        cache.prefetch("lora2").result()
        cache.prefetch("lora4").result()
        cache.prefetch("lora2").result()                              # a hit: lora2 is now the most recent
        cache.prefetch("dora4").result()                              # evicts lora4, the least recent
        assert [n for n in ("lora2", "lora4", "dora4") if cache.ready(n)] == ["lora2", "dora4"]
        m = cache.metrics()
        assert (m["cpu_misses"], m["cpu_hits"], m["cpu_evictions"], m["cpu_adapters"]) == (3, 1, 1, 2)


def test_device_tier_lru_never_evicts_pinned(root, served):
    model, handle = served
    x = inputs(model, batch=1)
    with AdapterCache(handle, root, max_cpu_adapters=8, max_active_adapters=2) as cache:
        for name in ADAPTERS["llama"]:
            cache.register(name, name)
        ka = cache.acquire("lora2")                                   # pinned through all of this
        cache.acquire("lora4")
        cache.release("lora4")                                        # unpinned, and the most recent
        kd = cache.acquire("dora4")                                   # must evict lora4, not the older lora2
        assert cache.slot_of("lora2") == ka and cache.slot_of("lora4") is None and kd != ka
        with pytest.raises(NoFreeSlot, match="all 2 adapter slots are in use"):
            cache.acquire("lora8")                                    # both slots pinned
        cache.release("dora4")
        assert cache.acquire("lora8") == kd                           # now dora4 goes
        assert cache.acquire("lora2") == ka                           # a hit, pinned twice
        m = cache.metrics()
        assert (m["device_misses"], m["device_hits"], m["device_evictions"], m["pinned"]) == (5, 1, 2, 2)   # the refused try was a miss
        with handle.rows([ka]):                                      # lora2's slot was never touched
            torch.testing.assert_close(logits(model, x), expected_logits(root / "lora2", x), atol=1e-4, rtol=0)
        with pytest.raises(AdapterError, match="is not acquired"):
            cache.release("lora4")


def test_a_request_waits_only_for_its_own_adapter(root, served):
    _, handle = served
    gate, started = threading.Event(), threading.Event()

    def loader(name, path):
        if name == "slow":
            started.set()
            assert gate.wait(30)
        return handle.read(path, name)

    with AdapterCache(handle, root, loader=loader, workers=2) as cache:
        cache.register("slow", "lora4", load=False)
        cache.register("fast", "lora2", load=False)
        slow = cache.prefetch("slow")
        assert started.wait(30)
        assert cache.prefetch("slow") is slow                         # one future per adapter
        cache.acquire("fast", timeout=30)                             # not held up by "slow"
        assert not slow.done() and cache.metrics()["loading"] == 1
        gate.set()
        assert cache.acquire("slow", timeout=30) != cache.slot_of("fast")


def _corrupt(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"\x00\x10garbage" * 10)


def _missing(folder):
    (folder / "adapter_model.safetensors").unlink()


def _nan(folder):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, path)


def _wrong_targets(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "wq"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _other_width(folder):
    config = transformers.LlamaConfig(vocab_size=288, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    shutil.rmtree(folder)
    make_adapter(folder, None, dict(r=2, targets="qv"), model=transformers.LlamaForCausalLM(config))


def _gpt2(folder):
    shutil.rmtree(folder)
    make_adapter(folder, "gpt2", dict(r=2, targets=["c_attn"]))


def _prompt(folder):
    shutil.rmtree(folder)
    model = lk.tiny_model("llama")
    lk.inject(model, lk.PromptTuningConfig(num_virtual_tokens=2))
    lk.save_adapter(model, folder)


BROKEN = {
    "corrupt safetensors": (_corrupt, "is not a readable safetensors file"),
    "missing weights": (_missing, "adapter_model.safetensors is missing"),
    "non-finite weights": (_nan, "non-finite values"),
    "unknown target module": (_wrong_targets, r"target_modules \['wq'\] matched no linear module"),
    "another base's shapes": (_other_width, r"expected \(2, 32\), found \(2, 48\)"),
    "another architecture": (_gpt2, r"target_modules \['attn\.c_attn'\] matched no linear module"),
    "prompt tuning": (_prompt, "peft_type 'PROMPT_TUNING' cannot be served per row"),
    "rank above r_max": (lambda f: shutil.rmtree(f) or shutil.copytree(f.parent / "lora8", f),
                         "rank 8 is above the server's r_max = 4"),
}


@pytest.mark.filterwarnings("ignore:.*was trained on base model")
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_bad_adapter_fails_alone(root, case):
    model = lk.tiny_model("llama")
    handle = attach(model, "all-linear", slots=3, r_max=4)
    x = inputs(model, batch=1)
    breaker, message = BROKEN[case]
    shutil.copytree(root / "lora4", root / "bad")                     # rank 4 <= r_max until broken
    breaker(root / "bad")
    with AdapterCache(handle, root) as cache:
        cache.register("good", "lora2")
        slot = cache.acquire("good")                                   # a running request
        before = cache.metrics()
        with pytest.raises(AdapterLoadError, match=message) as err:
            cache.register("bad", "bad")
        assert str(err.value).startswith("adapter 'bad' (bad) could not be loaded: ")
        assert str(root) not in str(err.value) and err.value.status == 500          # the server's fault
        assert "bad" not in cache and cache.names() == ["good"]
        after = cache.metrics()
        assert after["load_errors"] == before["load_errors"] + 1
        assert {k: after[k] for k in ("cpu_bytes", "device_bytes", "cpu_adapters", "active_adapters", "loading")} == \
               {k: before[k] for k in ("cpu_bytes", "device_bytes", "cpu_adapters", "active_adapters", "loading")}
        with handle.rows([slot]):
            torch.testing.assert_close(logits(model, x), expected_logits(root / "lora2", x), atol=1e-4, rtol=0)
        cache.register("bad", "lora4")                                 # the name is free again


def test_paths_stay_inside_the_root(root, served, tmp_path):
    _, handle = served
    outside = tmp_path / "outside"
    shutil.copytree(root / "lora2", outside)
    os.symlink(outside, root / "escape")
    os.symlink(root / "lora2", root / "alias")                         # a symlink that stays inside: fine
    (root / "half").mkdir()
    os.symlink(outside / "adapter_config.json", root / "half" / "adapter_config.json")
    shutil.copy(root / "lora2" / "adapter_model.safetensors", root / "half")
    with AdapterCache(handle, root) as cache:
        cases = {"../outside": "contains '..'", "lora2/../../outside": "contains '..'",
                 str(outside): "is outside the adapter root", "escape": "leaves the adapter root through a symlink",
                 "half": "adapter_config.json leaves the adapter root", "nowhere": "no such folder",
                 "lora2/adapter_config.json": "is not a folder", "": "non-empty string",
                 "lora2\x00x": "contains a NUL character", "a" * 5000: "longer than 4096 bytes",
                 "a" * 300 + "/b": "a part longer than 255", "lora\udc802": "not valid UTF-8"}
        for i, (path, message) in enumerate(cases.items()):
            with pytest.raises(AdapterPathError, match=message) as err:
                cache.register(f"x{i}", path)
            assert str(root) not in str(err.value) and len(str(err.value)) < 300      # no server paths, bounded
        assert cache.names() == []
        cache.register("alias", "alias")
        assert cache.metrics()["cpu_adapters"] == 1


def test_names_and_unregister(root, served):
    _, handle = served
    with AdapterCache(handle, root) as cache:
        for bad in ("base", "../x", "", "a b", "x" * 129):
            with pytest.raises(AdapterError, match="lora_name"):
                cache.register(bad, "lora2")
        cache.register("a", "lora2")
        with pytest.raises(AdapterExists, match="already registered"):
            cache.register("a", "lora4")
        with pytest.raises(UnknownAdapter) as err:
            cache.acquire("nope")
        assert err.value.status == 404
        slot = cache.acquire("a")
        cache.unregister("a")                                          # in use: the slot outlives the name
        m = cache.metrics()
        assert (m["registered"], m["cpu_bytes"], m["active_adapters"]) == (0, 0, 1) and m["device_bytes"] > 0
        with pytest.raises(AdapterExists, match="still use it"):
            cache.register("a", "lora2")
        cache.release("a")
        m = cache.metrics()
        assert (m["active_adapters"], m["device_bytes"], m["pinned"]) == (0, 0, 0)
        assert all(not layer.A[slot].any() for layer in handle.layers.values())   # the slot was cleared
        with pytest.raises(UnknownAdapter):
            cache.unregister("a")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def one_thread():
    """220 small forwards: with two intra-op threads on a busy 2-core box each op can wait a whole
    scheduler slice at the thread barrier (measured: 0.5 s a cycle instead of 25 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_load_unload_200_cycles_does_not_grow(tmp_path, one_thread):
    """~0.5 MB adapters: leaking each cycle's copy would add ~100 MB, far above the 5% allowed."""
    config = transformers.LlamaConfig(vocab_size=288, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    make_adapter(tmp_path / "root" / "a", None, dict(r=16, targets="all-linear"), model=transformers.LlamaForCausalLM(config))
    handle = attach(model, "all-linear", slots=2, r_max=16)
    x = torch.randint(0, 288, (1, 4))

    def cycle(cache, i):
        cache.register(f"a{i}", "a")
        with cache.use(f"a{i}") as k, handle.rows([k]), torch.no_grad():
            model(input_ids=x)
        cache.unregister(f"a{i}")

    with AdapterCache(handle, tmp_path / "root", max_cpu_adapters=1, max_active_adapters=1) as cache:
        for i in range(20):
            cycle(cache, i)
        gc.collect()
        start = _rss_bytes()
        for i in range(20, 220):
            cycle(cache, i)
        gc.collect()
        growth = _rss_bytes() - start
        m = cache.metrics()
    nbytes = handle.read(tmp_path / "root" / "a").nbytes
    assert nbytes > 400_000
    assert growth < 0.05 * start, f"RSS grew by {growth / 2**20:.1f} MiB over 200 cycles (from {start / 2**20:.0f} MiB)"
    assert (m["loads"], m["registered"], m["cpu_bytes"], m["device_bytes"]) == (220, 0, 0, 0)
