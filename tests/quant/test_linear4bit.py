"""The 4-bit frozen base: the layer, whole-model quantization, files both ways with bitsandbytes, QLoRA."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lorakit as lk
from lorakit.models import tiny_model, tiny_tokenizer
from lorakit.io import load_quantized, save_quantized
from lorakit.quant import Linear4bit, dequantize_nf4, quantize, quantized_layers, requantize, weight_bytes

bnb = pytest.importorskip("bitsandbytes")


def _linear(d_in=128, d_out=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out, bias=bias)


def test_forward_and_input_gradient_equal_the_dense_math():
    lin = _linear()
    q = Linear4bit.from_linear(lin)
    w = dequantize_nf4(q.weight, q.quant_state)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), atol=0, rtol=0)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.linear(x2, w, lin.bias).square().sum(), x2)
    torch.testing.assert_close(g, g2, atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_layer_holds_the_payload_not_a_float_copy():
    q = Linear4bit.from_linear(_linear(1024, 1024, bias=False))
    floats = [t for t in (*q.parameters(), *q.buffers()) if t.is_floating_point()]
    assert floats == []                                          # only uint8 codes as tensors of the module
    assert q.nbytes() <= 0.135 * 1024 * 1024 * 4


def _bnb_state(sd):
    return {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}


def test_files_move_both_ways_with_bitsandbytes():
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    from bitsandbytes.nn import Params4bit
    lin, x = _linear(), torch.randn(7, 128)
    ours = Linear4bit.from_linear(lin)
    sd = ours.state_dict()
    theirs = BnbLinear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = Params4bit.from_prequantized(sd["weight"], _bnb_state(sd), device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(sd["bias"].clone())
    assert torch.equal(theirs(x), ours(x))                       # ours loads in bitsandbytes
    native = BnbLinear4bit(128, 96, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    native.load_state_dict(lin.state_dict())
    native = native.to("cpu")                                    # bitsandbytes quantizes here
    mine = Linear4bit.shell(lin)
    mine.load_state_dict(native.state_dict())
    assert torch.equal(mine(x), native(x))                       # theirs loads in lorakit
    assert sorted(sd) == sorted(native.state_dict())             # the same keys...
    for key, value in native.state_dict().items():               # ...and the same bytes: one file, either library
        assert torch.equal(sd[key], value), key


def test_missing_constants_are_named():
    sd = Linear4bit.from_linear(_linear()).state_dict()
    del sd["weight.nested_absmax"]
    with pytest.raises(RuntimeError, match="weight.nested_absmax"):
        Linear4bit.shell(_linear()).load_state_dict(sd)


def test_quantize_a_model_then_lora_merge_and_requantize():
    model, ids = tiny_model("llama"), torch.randint(0, 288, (2, 12))
    names = quantize(model)
    assert len(names) == 14 and "lm_head" not in names and all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    base = model(ids).logits
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    torch.testing.assert_close(model(ids).logits, base, atol=1e-6, rtol=0)        # a no-op at init
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    adapted = model(ids).logits
    merged = lk.merge_and_unload(model)
    assert quantized_layers(merged) == []                         # merging keeps the result in float
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match=r"logits on the probe batch changed by max [0-9.e-]+, mean"):
        change = requantize(merged, {"input_ids": ids})
    assert change["max_abs_logit_change"] > 0 and len(quantized_layers(merged)) == 14


def test_save_and_load_a_quantized_base(tmp_path):
    model, ids = tiny_model("llama"), torch.randint(0, 288, (2, 12))
    quantize(model)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    keys = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    del keys["model.layers.1.self_attn.o_proj.weight.absmax"]
    from safetensors.torch import save_file
    save_file(keys, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="lacks .'model.layers.1.self_attn.o_proj.weight.absmax'"):
        load_quantized(tmp_path / "q")


def test_weight_bytes_on_a_realistic_shape():
    model = torch.nn.Sequential()
    model.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(576, 1536, bias=False)]))
    from lorakit.linear import replace_module
    replace_module(model, "layers.0", Linear4bit.from_linear(model.layers[0]))
    assert weight_bytes(model)["ratio"] <= 0.135


def test_qlora_training_changes_only_the_adapter(tmp_path, carrier):
    from lorakit.training import TrainConfig, train_model
    torch.manual_seed(0)
    model = tiny_model("llama")
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / "q"), batch_size=4, lr=5e-3, steps=10,
                      quantize="nf4", progress=False)
    def snapshot(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "adapters" not in k}
    original = tiny_model("llama")
    quantize(original)
    frozen = snapshot(original)
    summary = train_model(model, tiny_tokenizer(), cfg, lk.LoraConfig(r=4, alpha=8))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    after = {k: v for k, v in model.state_dict().items() if "adapters" not in k}
    after = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)   # the 4-bit base is bit-for-bit unchanged
    assert summary["planned_memory"]["components"][0]["component"] == "frozen weights (NF4 payload)"


@pytest.mark.embedded
@torch.no_grad()
def test_embedded_model_quantizes_to_under_0_135_of_fp32(embedded_folder):
    model, tok = lk.load_base("smollm2-135m-instruct")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    before = model(ids).logits
    names = quantize(model)
    sizes = weight_bytes(model)
    assert len(names) == 210 and sizes["layers"] == 210
    assert sizes["ratio"] <= 0.135
    after = model(ids).logits
    assert after[0, -1].argmax() == before[0, -1].argmax()                  # the same next token
    # NF4 costs a 135M model more than the 7B+ models of the QLoRA paper (prose perplexity +29%,
    # BENCHMARKS.md); the logits stay close in direction
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.9
