"""Every bad adapter folder gets an error that names the culprit, and the model stays untouched."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.inject import configs
from lorakit.methods import AdapterLayer
from tests.helpers import inputs, logits, randomize


@pytest.fixture
def folder(tmp_path):
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=4, targets="qv"))
    randomize(model)
    return lk.save_adapter(model, tmp_path / "adapter")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _assert_untouched(model, x, base):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not configs(model)
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
CASES = {
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(KEY)),
                       r"missing tensors for model\.layers\.0\.self_attn\.q_proj\.lora_A"),
    "unexpected tensor": (lambda f: _edit_tensors(f, lambda t: t.update(
        {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)})),
        r"unexpected tensors model\.layers\.0\.mlp\.up_proj\.lora_A"),
    "shape mismatch": (lambda f: _edit_tensors(f, lambda t: t.update({KEY: torch.zeros(3, 32)})),
                       r"model\.layers\.0\.self_attn\.q_proj\.lora_A: expected \(4, 32\), found \(3, 32\)"),
    "modules the model lacks": (lambda f: _edit_config(f, target_modules=["q_proj", "wq"]),
                                r"target_modules \['wq'\] matched no linear module"),
    "unsupported peft_type": (lambda f: _edit_config(f, peft_type="IA3"), r"unsupported peft_type 'IA3'"),
    "dora without magnitudes": (lambda f: _edit_config(f, use_dora=True),
                                r"use_dora: true, but .* lacks the DoRA magnitude vectors of 4 modules: "
                                r"model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector"),
    "magnitude without use_dora": (lambda f: _edit_tensors(f, lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)})),
        r"lora_magnitude_vector is a DoRA magnitude, but .* does not set use_dora: true"),
    "lora bias": (lambda f: _edit_config(f, lora_bias=True), r"lora_bias = True is not supported"),
    "unknown feature": (lambda f: _edit_config(f, some_new_option={"x": 1}), r"some_new_option = .* is not supported"),
    "pissa init": (lambda f: _edit_config(f, init_lora_weights="pissa"), r"init_lora_weights = 'pissa'"),
    "bias": (lambda f: _edit_config(f, bias="all"), r"bias = 'all' is not supported"),
    "invalid json": (lambda f: (f / "adapter_config.json").write_text("{not json"), r"adapter_config\.json is not valid JSON"),
    "bad rank": (lambda f: _edit_config(f, r=0), r"adapter_config\.json: LoraConfig\.r = 0"),
    "corrupt safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:100]), r"adapter_model\.safetensors is not a readable safetensors"),
    "pickle only": (lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "adapter_model.bin").write_bytes(b"x")),
                    r"adapter_model\.safetensors is missing \(found \['adapter_model\.bin'\]: lorakit reads only safetensors"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), r"adapter_config\.json is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_culprit_and_leaves_model_untouched(folder, case):
    corrupt, pattern = CASES[case]
    corrupt(folder)
    model = lk.tiny_model("llama")
    x = inputs(model)
    base = logits(model, x)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        lk.load_adapter(model, folder)
    _assert_untouched(model, x, base)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lk.load_adapter(lk.tiny_model("llama"), tmp_path / "nope")


def test_different_base_model_warns_with_both_names(folder):
    _edit_config(folder, base_model_name_or_path="org/other-model")
    with pytest.warns(UserWarning, match=r"'org/other-model'.*'tiny-llama'"):
        lk.load_adapter(lk.tiny_model("llama"), folder)


def test_wrong_architecture_is_refused(folder):
    model = lk.tiny_model("gpt2")
    with pytest.raises(lk.AdapterFormatError, match="matched no linear module"), \
            pytest.warns(UserWarning, match="trained on base model 'tiny-llama'"):
        lk.load_adapter(model, folder)


def test_dora_folder_loads(tmp_path):
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=4, targets="qv", use_dora=True))
    randomize(model)
    x = inputs(model)
    lk.save_adapter(model, tmp_path)
    again = lk.load_adapter(lk.tiny_model("llama"), tmp_path)
    assert configs(again)["default"].use_dora
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=1e-6, rtol=0)
