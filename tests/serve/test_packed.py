"""oneDNN-packed base layers (serve/packed.py): the same products as F.linear to fp32 rounding, the
linear-layer protocol answered exactly, and a served model that gives its unpacked greedy tokens."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import linear
from lorakit.serve import attach, packed
from lorakit.serve.forward import runner_for
from lorakit.serve.server import ServeConfig, build
from tests.serve.test_forward import SCHEDULE, run, sequences

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_products_equal_f_linear(dtype, tol, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias, dtype=dtype).requires_grad_(False)
    p = packed.PackedLinear(layer)
    for shape in [(1, 48), (7, 48), (2, 5, 48)]:
        x = torch.randn(shape, dtype=dtype)
        got, want = p(x), F.linear(x, layer.weight, layer.bias)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        p(x.transpose(0, -1).contiguous().transpose(0, -1))       # a non-contiguous input is accepted
    assert linear.shape(p) == (48, 80) and linear.stored_shape(p) == (80, 48)
    assert torch.equal(linear.dense_weight(p), layer.weight)      # unpacking is exact
    back = linear.write_weight(p, 2 * layer.weight)
    assert type(back) is nn.Linear and torch.equal(back.weight, 2 * layer.weight)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, layer.bias))


def test_only_plain_frozen_cpu_linears_are_packed():
    model = lk.tiny_model("llama").requires_grad_(False)
    plain = sum(type(m) is nn.Linear for m in model.modules())
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)    # a trainable layer stays as it is
    embedding = model.model.embed_tokens.weight.detach().clone()
    before = model.model.embed_tokens.weight.data_ptr()
    assert packed.pack_linears(model) == plain - 1
    # what is left is copied, so no tensor keeps the model file's mmap alive; values unchanged
    assert model.model.embed_tokens.weight.data_ptr() != before
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is packed.PackedLinear
    assert type(model.model.embed_tokens) is nn.Embedding           # the tied head's embedding stays dense
    gpt2 = lk.tiny_model("gpt2").requires_grad_(False)
    heads = sum(type(m) is nn.Linear for m in gpt2.modules())
    assert heads == 1 and packed.pack_linears(gpt2) == heads         # Conv1D: left alone


def test_a_packed_model_serves_the_unpacked_logits(adapter_root):
    """LoRA and DoRA slots over packed base layers (DoRA's norms read the unpacked weight)."""
    outs = []
    for pack in (False, True):
        model = lk.tiny_model("llama").requires_grad_(False)
        handle = attach(model, "all-linear", slots=3, r_max=8)
        if pack:
            assert packed.pack_linears(model) > 0
            assert all(type(layer.base_layer) is packed.PackedLinear for layer in handle.layers.values())
        for k, name in enumerate(("lora2", "dora4", "lora8")):
            handle.write_slot(k, handle.read(adapter_root / "llama" / name, name))
        outs.append(run(runner_for(model, handle), sequences(2), [0, 1, -1, 2]))
    assert len(outs[1]) == sum(len(call) for call in SCHEDULE)
    for (i, pos, want), (j, pos2, got) in zip(*outs):
        assert (i, pos) == (j, pos2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_serve_config_chooses_and_says_why(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pack_weights"):
        ServeConfig(adapters=str(tmp_path), pack_weights="yes")
    served = build(ServeConfig(model="tiny-llama", adapters=str(tmp_path), pack_weights="on", device="cpu"))
    assert "oneDNN-packed (--pack-weights on)" in served.packing
    assert type(served.engine.runner.head) is packed.PackedLinear
    served = build(ServeConfig(model="tiny-llama", adapters=str(tmp_path), pack_weights="off", device="cpu"))
    assert served.packing == "as loaded (--pack-weights off)"
    for pays in (True, False):
        monkeypatch.setattr(packed, "packing_pays", lambda model, rows, pays=pays: (pays, "a x b: packed 1 us"))
        served = build(ServeConfig(model="tiny-llama", adapters=str(tmp_path), device="cpu"))
        assert served.packing.startswith("as loaded" if not pays else "") and "auto, measured a x b: packed 1 us" in served.packing
        assert (type(served.engine.runner.head) is packed.PackedLinear) == pays


def test_packing_pays_measures_a_block_layer_not_the_head():
    model = lk.tiny_model("llama").requires_grad_(False)
    pays, why = packed.packing_pays(model, 16)
    d, ffn = model.config.hidden_size, model.config.intermediate_size
    assert isinstance(pays, bool) and why.startswith(f"16 x {d} @ {d} x {ffn}: packed ")
