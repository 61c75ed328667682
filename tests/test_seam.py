"""The core seam: the base-linear protocol, the adapter state, the method registry, atomic folders."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import linear
from lorakit.atomic import atomic_folder
from lorakit.methods import registry
from lorakit.quant import Linear4bit
from lorakit.state import ATTR, check_name, has_adapters, state


def test_every_base_kind_answers_in_the_out_in_layout():
    torch.manual_seed(0)
    dense = nn.Linear(6, 4)
    conv = Conv1D(4, 6)                                   # nf=4 outputs, nx=6 inputs: weight stored (6, 4)
    conv.weight.data.copy_(dense.weight.data.T)
    q = Linear4bit.from_linear(dense, blocksize=64)
    for layer in (dense, conv, q):
        assert linear.is_linear(layer) and linear.shape(layer) == (6, 4)
    assert linear.dense_weight(conv).shape == (4, 6) and torch.equal(linear.dense_weight(conv), dense.weight)
    assert linear.transposed(conv) and not linear.transposed(dense)
    assert linear.stored_shape(conv) == (6, 4) and linear.stored_shape(q) == (4, 6)
    w = torch.randn(4, 6)
    assert linear.write_weight(conv, w) is conv and torch.equal(conv.weight, w.T)
    merged = linear.write_weight(q, w)                    # a quantized base becomes float, not re-rounded
    assert type(merged) is nn.Linear and torch.equal(merged.weight, w)
    assert not linear.is_linear(nn.Embedding(3, 2))
    with pytest.raises(TypeError, match="Embedding is not a linear layer"):
        linear.shape(nn.Embedding(3, 2))


def test_the_state_is_one_object_and_goes_with_merge_and_unload():
    model = lk.tiny_model("llama")
    assert not has_adapters(model)
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    st = model.__dict__[ATTR]
    assert st is state(model) and st.names == ["default"] and st.active == ["default"]
    assert len(st.targets["default"]) == 4
    assert not [k for k in model.__dict__ if k.startswith("lorakit_")]   # nothing else on the model
    with pytest.raises(KeyError, match=r"no adapter named 'nope' \(this model has \['default'\]\)"):
        lk.set_active(model, "nope")
    lk.merge_and_unload(model)
    assert ATTR not in model.__dict__ and not has_adapters(model)


def test_input_adapters_and_their_hooks_belong_to_the_state():
    model = lk.tiny_model("llama")
    lk.inject(model, lk.PromptTuningConfig(num_virtual_tokens=3), name="p")
    st = state(model)
    assert st.inputs is model.lorakit_inputs and len(st.hooks) == 2
    lk.delete_adapter(model, "p")
    assert st.inputs is None and st.hooks == () and not hasattr(model, "lorakit_inputs")


@pytest.mark.parametrize("name, ok", [("carrier-v2", True), ("_x", True), ("1st", True), ("a.b", False),
                                      ("a/b", False), ("", False), ("x" * 129, False), (3, False)])
def test_one_rule_for_adapter_names(name, ok):
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(ValueError, match="adapter name"):
            check_name(name)


def test_the_registry_names_each_config():
    assert registry.of(lk.LoraConfig()).name == "lora"
    assert registry.of(lk.LoraConfig(use_dora=True)).name == "dora"
    assert registry.of(lk.PrefixTuningConfig()).peft_type == "PREFIX_TUNING"
    dora = registry.get("dora").make(r=4)
    assert isinstance(dora, lk.LoraConfig) and dora.use_dora and dora.r == 4
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['r'\] for method 'prompt'"):
        registry.get("prompt").make(r=4)
    with pytest.raises(ValueError, match="method 'vera' is not available"):
        registry.get("vera")


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with atomic_folder(target, keep_existing=True) as tmp:   # a shared cache: the first writer wins
        (tmp / "c").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
