"""The pure merge on state dicts equals the in-place merge_and_unload, for LoRA and DoRA."""
import pytest
import torch

import lorakit as lk
from lorakit.io import merged_state_dict, read_folder
from lorakit.merge import MergeError
from tests.helpers import randomize

SAVE = {"llama": ["lm_head"], "gpt2": ["ln_f"]}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dora", [False, True])
def test_pure_merge_equals_merge_and_unload(tmp_path, family, dora):
    base = {k: v.clone() for k, v in lk.tiny_model(family).state_dict().items()}
    model = lk.tiny_model(family)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=dora, modules_to_save=SAVE[family]))
    randomize(model)
    lk.save_adapter(model, tmp_path)
    folder = read_folder(tmp_path)
    pure = merged_state_dict(base, folder)
    in_place = lk.merge_and_unload(model).state_dict()
    assert pure.keys() == in_place.keys()
    changed = 0
    for key, value in in_place.items():
        torch.testing.assert_close(pure[key], value, atol=2e-6, rtol=0, msg=key)
        changed += not torch.equal(pure[key], base[key])
    adapted = sum(k.endswith(".lora_A") for k in folder.tensors)
    saved = sum(not k.endswith((".lora_A", ".lora_B", "lora_magnitude_vector")) for k in folder.tensors)
    assert adapted >= 8 and changed == adapted + saved     # every adapted weight and saved tensor moved, nothing else
    assert all(torch.equal(v, base[k]) for k, v in lk.tiny_model(family).state_dict().items())  # base untouched


def test_pure_merge_refuses_a_bad_fit_and_non_finite(tmp_path):
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=2, targets="qv"))
    randomize(model)
    lk.save_adapter(model, tmp_path)
    folder = read_folder(tmp_path)
    gpt2 = lk.tiny_model("gpt2").state_dict()
    with pytest.raises(lk.AdapterFormatError, match="the base state dict has no"):
        merged_state_dict(gpt2, folder)
    key = next(k for k in folder.tensors if k.endswith(".lora_B"))
    folder.tensors[key] = torch.full_like(folder.tensors[key], float("inf"))
    with pytest.raises(MergeError, match="non-finite"):
        merged_state_dict(lk.tiny_model("llama").state_dict(), folder)
