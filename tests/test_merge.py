import pytest
import torch
import transformers

import lorakit as lk
from lorakit.inject import adapter_layers
from tests.helpers import inputs, logits, randomize


def test_merge_refuses_non_finite_and_leaves_model_unchanged():
    model = lk.tiny_model("llama")
    lk.inject(model, lk.LoraConfig(r=2, targets="all-linear"))
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["default"].B[0, 0] = float("inf")
    with pytest.raises(lk.MergeError, match="model.layers.1.mlp.down_proj"):
        lk.merge(model)
    for n, p in model.state_dict().items():
        if not n.endswith(".B"):
            assert torch.equal(p, before[n]), n
    assert all(not layer.merged for _, layer in adapter_layers(model))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_merge_and_unload_gives_a_plain_model_that_reloads(tmp_path, family):
    model = lk.tiny_model(family)
    x = inputs(model)
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear",
                                   modules_to_save=["classifier"] if family == "bert" else None))
    randomize(model)
    adapted = logits(model, x)
    plain = lk.merge_and_unload(model)
    assert not any(type(m).__module__.startswith("lorakit") for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), adapted, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path)
    reloaded = getattr(transformers, plain.config.architectures[0]).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), adapted, atol=1e-5, rtol=0)
