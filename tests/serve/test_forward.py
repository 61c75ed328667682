"""The ragged runner: each chunk's last-token logits equal transformers' own full-sequence forward."""
import gc
import weakref

import pytest
import torch
import transformers

import lorakit as lk
from lorakit.models import TINY_VOCAB
from lorakit.serve import attach
from lorakit.serve.forward import Chunk, HFRunner, LlamaRunner, runner_for
from tests.serve.conftest import ADAPTERS, make_adapter

SMALL = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def build(family, window=True):
    """A tiny model; 'mistral' (head_dim 16 != 32 / 4, window 4) and 'qwen2-window' (layer 1 slides, window 3)."""
    torch.manual_seed(0)
    if family == "mistral":
        config = transformers.MistralConfig(**SMALL, head_dim=16, sliding_window=4 if window else None)
        return transformers.MistralForCausalLM(config).eval()
    if family == "qwen2-window":
        config = transformers.Qwen2Config(**SMALL, use_sliding_window=window, sliding_window=3, max_window_layers=1)
        return transformers.Qwen2ForCausalLM(config).eval()
    return lk.tiny_model(family)


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()       # (L, vocab)


# Three forward calls; per call (sequence, new tokens). Sequence 0's prompt is split across calls 1 and 2
# (a continued prefill), 1 starts fresh in call 2, the others decode; the order changes between calls.
SCHEDULE = [[(0, 5), (2, 3), (3, 7)],
            [(3, 1), (0, 4), (1, 6), (2, 1)],
            [(1, 1), (2, 1), (0, 1), (3, 1)]]
LENGTHS = [10, 7, 5, 9]


def run(runner, seqs, slots=(-1, -1, -1, -1)):
    """Run SCHEDULE; returns [(sequence, position of the last token, logits)]."""
    caches = [runner.new_cache() for _ in seqs]
    got = []
    for call in SCHEDULE:
        chunks = [Chunk(caches[i], seqs[i][caches[i].length:caches[i].length + n], slots[i]) for i, n in call]
        out = runner.forward(chunks)
        assert out.shape == (len(call), runner.model.config.vocab_size) and out.dtype == torch.float32
        got += [(i, caches[i].length - 1, o) for (i, _), o in zip(call, out)]
    assert [c.length for c in caches] == LENGTHS
    return got


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY_VOCAB, (n,), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("family, kind", [("llama", LlamaRunner), ("qwen2", LlamaRunner), ("qwen2-window", LlamaRunner),
                                          ("mistral", LlamaRunner), ("gpt2", HFRunner)])
def test_ragged_calls_equal_transformers(family, kind):
    model, seqs = build(family), sequences()
    runner = runner_for(model, None)
    assert type(runner) is kind and runner.max_length == 64
    expected = [full_logits(model, s) for s in seqs]
    for i, pos, logits in run(runner, seqs):
        torch.testing.assert_close(logits, expected[i][pos], atol=1e-4, rtol=0)
    if family in ("mistral", "qwen2-window"):        # the window matters for these lengths
        assert (full_logits(build(family, window=False), seqs[0])[-1] - expected[0][-1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def folders(adapter_root, tmp_path_factory):
    """family -> adapter name -> folder; qwen2 and mistral get the llama configurations."""
    out = {f: {n: adapter_root / f / n for n in ADAPTERS[f]} for f in ("llama", "gpt2")}
    root = tmp_path_factory.mktemp("forward-adapters")
    for family in ("qwen2", "mistral"):
        out[family] = {}
        for k, (name, config) in enumerate(ADAPTERS["llama"].items()):
            out[family][name] = make_adapter(root / family / name, family, config, seed=20 + k, model=build(family))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_each_chunk_equals_its_merged_model(family, folders):
    """LoRA, DoRA, a rank pattern and a base row in every call; slots unrelated to sequence order."""
    model = build(family)
    handle = attach(model, "all-linear", slots=5, r_max=8)
    names = ["lora2", "dora4", None, "lora8"]                 # per sequence
    slot = {"lora8": 0, "lora2": 2, "dora4": 4}
    for name, k in slot.items():
        handle.write_slot(k, handle.read(folders[family][name], name))
    seqs = sequences(1)
    got = run(runner_for(model, handle), seqs, [-1 if n is None else slot[n] for n in names])
    assert handle.router.rows is None                       # the runner clears the rows it set
    expected, base = [], [full_logits(build(family), s) for s in seqs]
    for i, name in enumerate(names):
        merged = build(family) if name is None else lk.merge_and_unload(lk.load_adapter(build(family),
                                                                                        folders[family][name]))
        expected.append(full_logits(merged, seqs[i]))
    for i, pos, logits in got:
        torch.testing.assert_close(logits, expected[i][pos], atol=1e-4, rtol=0)
        assert ((logits - base[i][pos]).abs().max() > 0.05) == (names[i] is not None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cache_memory_grows_by_doubling_and_is_freed(family):
    runner = runner_for(build(family), None)
    cache = runner.new_cache()
    assert cache.length == 0 and cache.nbytes == 0
    runner.forward([Chunk(cache, torch.tensor([1, 2, 3]))])
    sizes = [cache.nbytes]
    for t in range(40):
        runner.forward([Chunk(cache, torch.tensor([t + 4]))])
        sizes.append(cache.nbytes)
    assert cache.length == 43 and sizes == sorted(sizes) and sizes[-1] > sizes[0] > 0
    if family == "llama":      # capacity 16 -> 32 -> 64 (max_length): two reallocations in 40 appends
        assert len(set(sizes)) == 3 and tuple(cache.kv.shape) == (2, 2, 2, 64, 8)
        held = weakref.ref(cache.kv)
    else:
        held = weakref.ref(cache.cache.layers[0].keys)
    del cache
    gc.collect()
    assert held() is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_errors_leave_the_caches_alone(family):
    model = build(family)
    runner = runner_for(model, attach(model, "all-linear", slots=2, r_max=4))
    a, b = runner.new_cache(), runner.new_cache()
    runner.forward([Chunk(a, torch.arange(1, 61)), Chunk(b, torch.tensor([5]))])
    with pytest.raises(ValueError, match="appears more than once"):
        runner.forward([Chunk(b, torch.tensor([1])), Chunk(a, torch.tensor([1])), Chunk(b, torch.tensor([2]))])
    with pytest.raises(ValueError, match=r"60 cached \+ 5 new tokens = 65, past the model's max_length = 64"):
        runner.forward([Chunk(b, torch.tensor([1])), Chunk(a, torch.arange(1, 6))])
    with pytest.raises(ValueError, match=r"slot 2 out of range \[-1, 2\)"):
        runner.forward([Chunk(b, torch.tensor([1]), slot=2)])
    with pytest.raises(TypeError, match="new_cache"):
        runner.forward([Chunk(runner_for(build("qwen2" if family == "gpt2" else "gpt2")).new_cache(),
                              torch.tensor([1]))])
    assert (a.length, b.length) == (60, 1)
    runner.forward([Chunk(a, torch.arange(1, 5)), Chunk(b, torch.tensor([1]))])     # 64: still fits
    assert (a.length, b.length) == (64, 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_forward_that_fails_midway_changes_no_cache_and_can_be_retried(family):
    model = build(family)
    runner = runner_for(model)
    seqs = sequences(1)
    caches = [runner.new_cache() for _ in range(3)]
    runner.forward([Chunk(caches[i], seqs[i][:4]) for i in range(3)])
    want = runner.forward([Chunk(runner.new_cache(), seqs[i][:6]) for i in range(3)])
    bad = torch.tensor([1, TINY_VOCAB + 7])                    # the embedding fails on the third chunk
    with pytest.raises(IndexError):
        runner.forward([Chunk(caches[0], seqs[0][4:6]), Chunk(caches[1], seqs[1][4:6]), Chunk(caches[2], bad)])
    assert [c.length for c in caches] == [4, 4, 4]
    got = runner.forward([Chunk(caches[i], seqs[i][4:6]) for i in range(3)])        # the retry sees clean caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_llama_family_configs_it_cannot_compute_go_to_hf():
    config = transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="rope_type 'dynamic'"):
        assert isinstance(runner_for(model), HFRunner)
    with pytest.raises(ValueError, match="LlamaRunner cannot serve"):
        LlamaRunner(model)


@pytest.mark.embedded
def test_embedded_prefill_and_decodes_equal_transformers():
    model, tokenizer = lk.load_base()
    runner = runner_for(model, None)
    assert isinstance(runner, LlamaRunner) and runner.max_length == model.config.max_position_embeddings
    ids = tokenizer("The warehouse policy says that returns", return_tensors="pt")["input_ids"][0]
    cache = runner.new_cache()
    logits = runner.forward([Chunk(cache, ids)])
    got = [logits[0]]
    for _ in range(3):                      # greedy decodes from our own logits
        ids = torch.cat([ids, logits[0].argmax()[None]])
        logits = runner.forward([Chunk(cache, ids[-1:])])
        got.append(logits[0])
    expected = full_logits(model, ids)[-4:]
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_fused_rms_norm_equals_the_models_own_norm_modules(family):
    model, seqs = build(family), sequences(3)
    fused, modules = runner_for(model, None), runner_for(model, None)
    assert fused.fused_norm
    modules.fused_norm = False
    for (i, pos, a), (j, pos2, b) in zip(run(fused, seqs), run(modules, seqs)):
        assert (i, pos) == (j, pos2)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
