import pytest
import torch

import lorakit as lk
from lorakit.methods import AdapterLayer, ModulesToSave
from tests.helpers import inputs, logits, randomize


def test_injecting_the_same_name_twice_is_an_error():
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    with pytest.raises(ValueError, match="'default' is already in this model"):
        lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    assert len(model.model.layers[0].self_attn.q_proj.adapters) == 1


def test_bad_adapter_name():
    with pytest.raises(ValueError, match="adapter name 'a.b'"):
        lk.inject(lk.tiny_model("llama"), lk.LoraConfig(), name="a.b")


def test_named_adapters_switch_and_delete():
    model = lk.tiny_model("llama")
    x = inputs(model)
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"), name="fashion")
    randomize(model, seed=1)
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"), name="warranty")
    assert lk.active_adapters(model) == ["fashion"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".warranty." in n)
    fashion = logits(model, x)
    lk.set_active(model, "warranty")
    randomize(model, seed=2)
    warranty = logits(model, x)
    assert not torch.allclose(fashion, warranty) and not torch.allclose(base, warranty)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".fashion." in n)
    lk.set_active(model, "fashion")
    torch.testing.assert_close(logits(model, x), fashion)
    lk.delete_adapter(model, "fashion")
    assert lk.active_adapters(model) == []
    torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=0)   # warranty inactive
    lk.set_active(model, "warranty")
    torch.testing.assert_close(logits(model, x), warranty)
    lk.delete_adapter(model, "warranty")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    with pytest.raises(KeyError, match="no adapter named"):
        lk.set_active(model, "warranty")


def test_disabled_gives_base_behaviour_even_when_merged():
    model = lk.tiny_model("qwen2")
    x = inputs(model)
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    randomize(model)
    adapted = logits(model, x)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, x), adapted)
    lk.merge(model)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model, x), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=0)


def test_switching_while_merged_is_refused():
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"), name="a")
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"), name="b")
    lk.merge(model)
    with pytest.raises(RuntimeError, match=r"\['a'\] are merged"):
        lk.set_active(model, "b")


def test_modules_to_save_trains_a_copy_of_the_head():
    model = lk.tiny_model("bert")
    x = inputs(model)
    base = logits(model, x)
    lk.inject(model, lk.LoraConfig(r=4, targets="qv", modules_to_save=["classifier"]))
    assert isinstance(model.classifier, ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.copies.default.weight", "classifier.copies.default.bias"} <= trainable
    assert not any(n.startswith("classifier.original") for n in trainable)
    report = lk.trainable_report(model)
    assert report.by_kind["classifier (full)"] == {"modules": 1, "params": 32 * 3 + 3}
    randomize(model)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=0)
    assert not torch.allclose(logits(model, x), base)


def test_targets_and_modules_to_save_must_not_overlap():
    with pytest.raises(ValueError, match="both LoRA targets and modules_to_save"):
        lk.inject(lk.tiny_model("llama"), lk.LoraConfig(targets=["q_proj"], modules_to_save=["layers.0.self_attn"]))


def test_wrapping_checks_shapes_and_names_the_module():
    model = lk.tiny_model("llama")
    model.model.layers[1].self_attn.v_proj.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: weight shape \(3, 3\).*expected \(16, 32\)"):
        lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
