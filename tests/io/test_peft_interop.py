"""Both directions against the installed peft: same files, same logits."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from tests.helpers import inputs, logits, randomize

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "rank_pattern": {"llama": {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                     "gpt2": {"rank_pattern": {"h.1.attn.c_attn": 2}, "alpha_pattern": {"h.0.mlp.c_fc": 3}}},
    "modules_to_save": {},
    "dora": {"use_dora": True},
}
SAVE = {"llama": ["lm_head"], "gpt2": ["ln_f"]}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _kw(family, variant):
    kw = dict(VARIANTS[variant].get(family, VARIANTS[variant]) if variant == "rank_pattern" else VARIANTS[variant])
    if variant == "modules_to_save":
        kw["modules_to_save"] = SAVE[family]
    return kw


def _peft_config(family, variant):
    kw = _kw(family, variant)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], task_type="CAUSAL_LM",
                           fan_in_fan_out=family == "gpt2", **kw)


def _peft_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorakit_to_peft(tmp_path, family, variant):
    model = lk.tiny_model(family)
    x = inputs(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=TARGETS[family], **_kw(family, variant)))
    randomize(model)
    ours = logits(model, x)
    lk.save_adapter(model, tmp_path)

    theirs = peft.PeftModel.from_pretrained(lk.tiny_model(family), tmp_path).eval()
    torch.testing.assert_close(_peft_logits(theirs, x), ours, atol=1e-5, rtol=0)

    # and the files are the ones peft itself writes for the same config: same keys, same shapes
    reference = peft.get_peft_model(lk.tiny_model(family), _peft_config(family, variant))
    reference.save_pretrained(tmp_path / "ref")
    ref_tensors, our_tensors = load_file(tmp_path / "ref" / "adapter_model.safetensors"), \
        load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in ref_tensors.items()}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == f"tiny-{family}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_to_lorakit(tmp_path, family, variant):
    theirs = peft.get_peft_model(lk.tiny_model(family), _peft_config(family, variant))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = inputs(theirs.base_model.model)
    expected = _peft_logits(theirs.eval(), x)
    theirs.save_pretrained(tmp_path)

    model = lk.load_adapter(lk.tiny_model(family), tmp_path)
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    # the merged model agrees too
    torch.testing.assert_close(logits(lk.merge_and_unload(model), x), expected, atol=1e-5, rtol=0)


def test_round_trip_through_lorakit(tmp_path):
    model = lk.tiny_model("qwen2")
    x = inputs(model)
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, targets="all-linear", use_rslora=True, init="gaussian"))
    randomize(model)
    lk.save_adapter(model, tmp_path, name="default")
    again = lk.load_adapter(lk.tiny_model("qwen2"), tmp_path, name="tenant_a")
    assert lk.active_adapters(again) == ["tenant_a"]
    torch.testing.assert_close(logits(again, x), logits(model, x), atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))   # no temporary files left behind
