"""DoRA: the same table of checks as LoRA, plus peft as the oracle for the logits and the files."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.inject import adapter_layers, trainable_report
from lorakit.methods import DoraAdapter, LoraAdapter
from lorakit.quant import Linear4bit, quantize

from tests.helpers import inputs, logits, randomize

FAMILIES = ["llama", "qwen2", "gpt2"]     # no bias, bias on q/k/v, GPT-2's Conv1D with bias
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
PATTERNS = {"llama": {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
            "gpt2": {"rank_pattern": {"h.1.attn.c_attn": 2}, "alpha_pattern": {"h.0.mlp.c_fc": 3}}}
VARIANTS = {"plain": lambda family: {}, "rslora+patterns": lambda family: {"use_rslora": True, **PATTERNS[family]}}


def _dora(model, targets="all-linear", **kw):
    return lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=targets, use_dora=True, **kw))


def _train_like(model, seed=1):
    """`randomize`, then magnitudes near the row norms as training leaves them (not near zero, where
    unmerging, a division by m / ||W0 + s B A||, would magnify rounding)."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for ad in layer.adapters.values():
                if isinstance(ad, DoraAdapter):
                    ad.m.copy_(layer.base_weight().norm(dim=1) * (1 + 0.1 * torch.randn(ad.m.shape, generator=g)))
    return model


def _base_weights(model):
    return {n: layer.base_weight().detach().clone() for n, layer in adapter_layers(model)}


def _peft_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _oracle(w0, ad):
    """m * (W0 + s B A) / ||W0 + s B A|| per row, written out in float64."""
    v = w0.double() + ad.scale * ad.B.double() @ ad.A.double()
    return ad.m.double()[:, None] * v / v.square().sum(1, keepdim=True).sqrt()


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_at_init_and_magnitude_is_the_row_norm(family):
    model = lk.tiny_model(family)
    x = inputs(model)
    before = logits(model, x)
    _dora(model)
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    for _, layer in adapter_layers(model):
        ad = layer.adapters["default"]
        assert isinstance(ad, DoraAdapter)
        torch.testing.assert_close(ad.m, layer.base_weight().norm(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_a_b_m_train_and_grads_reach_them(family):
    model = _dora(lk.tiny_model(family))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B", ".m")) and ".adapters.default." in n for n in trainable)
    assert {n.rsplit(".", 1)[1] for n in trainable} == {"A", "B", "m"}
    assert trainable_report(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():   # perturb B (and only B) so that dL/dA is non-zero too
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(std=0.1)
    model.train()
    model(input_ids=inputs(model)).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorakit_to_peft(tmp_path, family, variant):
    kw = VARIANTS[variant](family)
    model = lk.tiny_model(family)
    x = inputs(model)
    _dora(model, TARGETS[family], **kw)
    randomize(model)
    ours = logits(model, x)
    lk.save_adapter(model, tmp_path)

    theirs = peft.PeftModel.from_pretrained(lk.tiny_model(family), tmp_path).eval()
    torch.testing.assert_close(_peft_logits(theirs, x), ours, atol=1e-5, rtol=0)

    # the files are the ones peft writes for the same config: same keys (lora_magnitude_vector), same shapes
    reference = peft.get_peft_model(lk.tiny_model(family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True, fan_in_fan_out=family == "gpt2",
        task_type="CAUSAL_LM", **kw))
    reference.save_pretrained(tmp_path / "ref")
    ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_to_lorakit(tmp_path, family, variant):
    theirs = peft.get_peft_model(lk.tiny_model(family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True, fan_in_fan_out=family == "gpt2",
        task_type="CAUSAL_LM", **VARIANTS[variant](family)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = inputs(theirs.base_model.model)
    expected = _peft_logits(theirs.eval(), x)
    theirs.save_pretrained(tmp_path)

    model = lk.load_adapter(lk.tiny_model(family), tmp_path)
    assert all(isinstance(layer.adapters["default"], DoraAdapter) for _, layer in adapter_layers(model))
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lk.merge_and_unload(model), x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_mode_with_dropout_matches_peft(tmp_path, family):
    model = lk.tiny_model(family)
    x = inputs(model)
    _dora(model, TARGETS[family], dropout=0.3)
    randomize(model)
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(lk.tiny_model(family), tmp_path)
    model.train(), theirs.train()
    torch.manual_seed(7)
    ours = model(input_ids=x).logits.detach()
    torch.manual_seed(7)
    torch.testing.assert_close(theirs(input_ids=x).logits.detach(), ours, atol=1e-5, rtol=0)
    assert (ours - logits(model.eval(), x)).abs().max() > 1e-3     # dropout really was on


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_unmerged_and_dense_math_and_unmerge_restores(family):
    model = lk.tiny_model(family)
    x = inputs(model)
    _dora(model)
    _train_like(model)
    unmerged = logits(model, x)
    w0 = _base_weights(model)
    lk.merge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    for name, layer in adapter_layers(model):
        torch.testing.assert_close(layer.base_weight().double(), _oracle(w0[name], layer.adapters["default"]),
                                   atol=1e-5, rtol=0)
    lk.unmerge(model)
    for name, w in _base_weights(model).items():
        torch.testing.assert_close(w, w0[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fast_norm_equals_direct_norm(family):
    model = lk.tiny_model(family)
    x = inputs(model)
    _dora(model)
    randomize(model, scale=0.3)
    fast = logits(model, x)
    for _, layer in adapter_layers(model):
        ad = layer.adapters["default"]
        torch.testing.assert_close(ad.forward_norm(layer), ad.weight_norm(layer.base_weight()), atol=0, rtol=1e-6)
        ad.fast_norm = False
    torch.testing.assert_close(logits(model, x), fast, atol=1e-6, rtol=0)


def test_cached_base_norms_follow_the_base_weight():
    model = lk.tiny_model("llama")
    _dora(model, ["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj

    def check():
        torch.testing.assert_close(layer.base_sq_norms(), layer.base_weight().square().sum(1))

    check()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)                    # an in-place write
    check()
    model.to(torch.float64)                                # a dtype move keeps the Parameter object
    assert layer.base_sq_norms().dtype == torch.float64
    check()
    model.to(torch.float32)
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]), name="other")
    lk.set_active(model, ["default", "other"])
    randomize(model)
    lk.merge(model, ["other"])                             # another adapter merged into the base
    check()
    layer.base_layer.load_state_dict({"weight": torch.randn_like(layer.base_layer.weight)})
    check()


@pytest.mark.parametrize("order", [["lora", "dora"], ["dora", "lora"]])
def test_stacked_with_lora_merges_consistently(order):
    model = lk.tiny_model("llama")
    x = inputs(model)
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"), name="lora")
    w0 = _base_weights(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=True), name="dora")
    lk.set_active(model, order)
    _train_like(model)
    unmerged = logits(model, x)
    lk.merge(model, [order[0]])                            # half merged: the other one still runs unmerged
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    lk.merge(model)
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    lk.unmerge(model)
    for name, w in _base_weights(model).items():
        torch.testing.assert_close(w, w0[name], atol=1e-5, rtol=0)


def test_dora_on_a_4bit_base():
    model = lk.tiny_model("llama")
    quantize(model)
    x = inputs(model)
    before = logits(model, x)
    _dora(model)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, Linear4bit)
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    _train_like(model)
    unmerged = logits(model, x)
    lk.merge(model)
    assert type(layer.base_layer) is torch.nn.Linear
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)


def test_config_and_direct_construction():
    with pytest.raises(ValueError, match="use_dora"):
        lk.LoraConfig(use_dora="yes")
    w = torch.randn(8, 16)
    ad = DoraAdapter(w, r=4, scale=2.0)
    assert isinstance(ad, LoraAdapter) and ad.m.shape == (8,) and ad.A.shape == (4, 16) and ad.B.shape == (8, 4)
    torch.testing.assert_close(w + ad.delta_weight(w), w)     # B = 0: merging changes nothing


def test_half_precision_base_keeps_fp32_adapters():
    model = lk.tiny_model("qwen2").to(torch.bfloat16)
    x = inputs(model)
    before = logits(model, x)
    _dora(model, "qv")
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert ad.A.dtype == ad.m.dtype == torch.float32
    out = logits(model, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, before, atol=0, rtol=1e-2)   # g = 1 to fp32 rounding: at most one bf16 step


def test_dora_trains_through_the_trainer(tmp_path, carrier):
    import json
    from lorakit.training import train
    summary = train(model="tiny-llama", data=str(carrier["train"]), out=str(tmp_path / "d"), method="dora", r=4,
                    alpha=8, batch_size=4, lr=5e-3, steps=12, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    cfg = json.loads((tmp_path / "d" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and summary["method_config"]["use_dora"] is True
