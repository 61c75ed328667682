"""One table of checks run on every tiny family (Llama, Qwen2, GPT-2, BERT)."""
import math

import pytest
import torch

import lorakit as lk
from lorakit.inject import adapter_layers
from lorakit.methods import AdapterLayer, LoraAdapter

from tests.helpers import inputs, logits, randomize


def _base_weights(model):
    return {n: layer.base_weight().detach().clone() for n, layer in adapter_layers(model)}


def test_noop_at_init(tiny):
    x = inputs(tiny)
    before = logits(tiny, x)
    lk.inject(tiny, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    torch.testing.assert_close(logits(tiny, x), before, atol=1e-6, rtol=0)


def test_only_adapters_train_and_grads_reach_b(tiny):
    lk.inject(tiny, lk.LoraConfig(r=4, alpha=8, targets="attention"))
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".copies.default." in n}     # a classifier's head trains whole, as in peft
    assert bool(head) == (type(tiny).__name__.endswith("ForSequenceClassification"))
    assert trainable and all(n.endswith((".A", ".B")) and ".adapters.default." in n for n in trainable - head)
    tiny.train()
    tiny(input_ids=inputs(tiny)).logits.square().mean().backward()
    for n, p in tiny.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    b_grads = [p.grad for n, p in tiny.named_parameters() if n.endswith(".B")]
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads)
    a_grads = [p.grad for n, p in tiny.named_parameters() if n.endswith(".A")]
    assert all(g is None or g.abs().sum() == 0 for g in a_grads)   # B = 0 at init: dL/dA = 0


def test_merge_matches_unmerged_and_dense_math(tiny):
    x = inputs(tiny)
    lk.inject(tiny, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(tiny)
    unmerged = logits(tiny, x)
    w0 = _base_weights(tiny)
    lk.merge(tiny)
    torch.testing.assert_close(logits(tiny, x), unmerged, atol=1e-5, rtol=0)
    for name, layer in adapter_layers(tiny):   # oracle: W0 + (alpha/r) B A, written out by hand
        a, b = layer.adapters["default"].A, layer.adapters["default"].B
        torch.testing.assert_close(layer.base_weight(), w0[name] + (8 / 4) * b @ a, atol=1e-6, rtol=0)


def test_unmerge_restores_and_double_merge_is_noop(tiny):
    x = inputs(tiny)
    lk.inject(tiny, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(tiny)
    w0 = _base_weights(tiny)
    lk.merge(tiny)
    once = _base_weights(tiny)
    lk.merge(tiny)
    for name, w in _base_weights(tiny).items():
        assert torch.equal(w, once[name]), name
    merged_logits = logits(tiny, x)
    lk.unmerge(tiny)
    for name, w in _base_weights(tiny).items():
        torch.testing.assert_close(w, w0[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny, x), merged_logits, atol=1e-5, rtol=0)  # unmerged path, same function


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(tiny, use_rslora):
    lk.inject(tiny, lk.LoraConfig(r=4, alpha=8, targets="qv", use_rslora=use_rslora))
    expected = 8 / math.sqrt(4) if use_rslora else 8 / 4
    layers = adapter_layers(tiny)
    assert layers and all(layer.adapters["default"].scale == expected for _, layer in layers)
    # and the forward really applies it: y - base(x) == s * B A x
    name, layer = layers[0]
    randomize(tiny)
    x = torch.randn(3, layer.d_in)
    ad = layer.adapters["default"]
    torch.testing.assert_close(layer(x) - layer.base_layer(x), expected * x @ ad.A.T @ ad.B.T, atol=1e-6, rtol=1e-5)


def test_gpt2_conv1d_is_fan_in_fan_out():
    model = lk.tiny_model("gpt2")
    lk.inject(model, lk.LoraConfig(r=2, targets=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdapterLayer) and layer.fan_in_fan_out
    assert layer.base_weight().shape == (layer.d_out, layer.d_in) == (96, 32)


def test_dropout_masks_the_input_not_a():
    torch.manual_seed(0)
    ad = LoraAdapter(d_in=16, d_out=8, r=4, scale=1.0, dropout=0.5)
    torch.nn.init.normal_(ad.B)
    a_before = ad.A.detach().clone()
    ad.train()
    x = torch.ones(64, 16)
    y = ad(x, torch.zeros(64, 8), None)
    assert torch.equal(ad.A, a_before)
    assert y.std(0).abs().sum() > 0          # different rows saw different masks of x
    ad.eval()
    torch.testing.assert_close(ad(x, torch.zeros(64, 8), None), x @ ad.A.T @ ad.B.T)


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    ad = LoraAdapter(d_in=4096, d_out=8, r=8, scale=1.0, init="gaussian")
    assert abs(ad.A.std().item() - 1 / 8) < 0.005 and ad.B.abs().sum() == 0


def test_half_precision_base_keeps_fp32_adapters():
    model = lk.tiny_model("llama").to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, targets="qv"))
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert ad.A.dtype == torch.float32
    out = model(input_ids=inputs(model)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
