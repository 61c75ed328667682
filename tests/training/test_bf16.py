"""bf16 autocast training against the fp32 path: the adapter's update must survive the sum."""
import json

import pytest
import torch

import lorakit as lk
from lorakit.models import tiny_model, tiny_tokenizer
from lorakit.training import TrainConfig, train_model


@pytest.mark.parametrize("dora", [False, True])
def test_an_update_far_below_bf16_resolution_survives_the_autocast_sum(dora):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256, bias=False)
    model = torch.nn.Sequential(layer)
    lk.inject(model, lk.LoraConfig(r=8, alpha=8, targets=["0"], use_dora=dora))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.B.normal_(std=1e-4)          # an update ~1e-3 of the output: under one bf16 rounding step
    x = torch.randn(64, 256)
    with torch.no_grad():
        want = model(x) - layer(x)           # fp32: the update alone
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, base = model(x), layer(x)
    assert base.dtype == torch.bfloat16 and out.dtype == torch.float32   # summed and returned in fp32
    got = out - base.float()
    # a bf16 sum would round most of it away (relative error ~1); fp32 keeps it to bf16 matmul accuracy
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_a_bf16_base_without_autocast_answers_in_bf16():
    model = tiny_model("llama").to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=4, targets="all-linear"))
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16


def _losses(tmp_path, carrier, name, **kw):
    cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / name), batch_size=4, lr=5e-3, steps=10,
                      progress=False, **kw)
    torch.manual_seed(0)
    train_model(tiny_model("llama"), tiny_tokenizer(), cfg, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_bf16_training_tracks_fp32(tmp_path, carrier):
    fp32 = _losses(tmp_path, carrier, "fp32")
    bf16 = _losses(tmp_path, carrier, "bf16", bf16=True)
    drop32, drop16 = fp32[0] - fp32[-1], bf16[0] - bf16[-1]
    assert drop32 > 0.05
    # the stated tolerance: each step's loss within 1% of fp32's, and the loss falls as far (within 10%)
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.01, (fp32, bf16)
    assert abs(drop16 - drop32) < 0.1 * drop32, (fp32, bf16)


@pytest.mark.embedded
def test_bf16_training_tracks_fp32_on_the_embedded_model(embedded_folder, tmp_path, carrier):
    """The tiny model's outputs are too small for bf16 rounding to bite; the real model's are not:
    a bf16 sum (peft's, lorakit's before) lost most early updates, 4.21 -> 4.13 where fp32 gives 3.88."""
    def run(name, **kw):
        cfg = TrainConfig(data=str(carrier["train"]), out=str(tmp_path / name), batch_size=2, lr=1e-4, steps=4,
                          max_len=96, progress=False, **kw)
        model, tokenizer = lk.load_base(lk.models.EMBEDDED)
        train_model(model, tokenizer, cfg, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    fp32, bf16 = run("fp32"), run("bf16", bf16=True)
    assert fp32[-1] < fp32[0] - 0.3
    # the stated tolerance on this model: each step within 3% of fp32 (a bf16 sum: 6% off by step 2, 18% by 6)
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.03, (fp32, bf16)


class _Siblings(torch.nn.Module):
    """Two projections reading one input, as q/k/v and gate/up do."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(32, 16), torch.nn.Linear(32, 8)

    def forward(self, x, bump=False):
        a = self.q(x)
        if bump:
            x.mul_(2)                        # an in-place write between the calls: no stale cast
        return a, self.k(x)


def test_siblings_share_one_cast_of_their_input_and_it_is_never_stale():
    torch.manual_seed(0)
    plain = _Siblings()
    model = lk.inject(_Siblings(), lk.LoraConfig(r=4, targets=["q", "k"]))
    model.load_state_dict({**plain.state_dict(), **{k: v for k, v in model.state_dict().items() if "adapters" in k}},
                          strict=False)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x)
    (a.sum() + b.sum()).backward()
    # the oracle: each layer's own math on its own bf16 cast (what autocast does layer by layer)
    ref_x = x.detach().clone().requires_grad_(True)
    outs = []
    for name in ("q", "k"):
        layer, xb = getattr(model, name), ref_x.bfloat16()
        ad = layer.adapters["default"]
        base = torch.nn.functional.linear(xb, layer.base_layer.weight.bfloat16(), layer.base_layer.bias.bfloat16())
        mid = xb @ ad.A.bfloat16().T
        outs.append(base.float() + ad.scale * (mid.float() @ ad.B.T))
    (outs[0].sum() + outs[1].sum()).backward()
    torch.testing.assert_close(a, outs[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b, outs[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=2e-2, atol=2e-2)
    x2 = torch.randn(5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, bumped = model(x2.clone(), bump=True)
        fresh = model.k(x2 * 2)
    torch.testing.assert_close(bumped, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_the_cli_picks_bf16_where_the_cpu_has_it_and_says_why(tmp_path, carrier, capsys, monkeypatch, fast):
    from lorakit.cli import main
    from lorakit.cli import train as train_cmd
    monkeypatch.setattr(train_cmd, "fast_bf16", lambda device: (fast, "the reason given"))
    seen = {}
    monkeypatch.setattr(train_cmd, "train", lambda **kw: seen.update(kw) or {"peak_memory": {}})
    main(["train", "--model", "tiny-llama", "--data", str(carrier["train"]), "--out", str(tmp_path), "--no-progress"])   # the stub's summary fails to print: not under test
    err = capsys.readouterr().err
    assert seen["bf16"] is fast
    assert ("precision: bf16 autocast, frozen base stored in bfloat16, adapters and optimizer state fp32" in err) is fast
    assert ("precision: fp32 (the reason given" in err) is not fast


def test_auto_dtype_stores_the_frozen_base_in_bf16_only_under_bf16():
    from lorakit.training.run import split_kwargs
    assert split_kwargs({"data": "x", "bf16": True})[0].dtype == "bfloat16"
    assert split_kwargs({"data": "x"})[0].dtype == "float32"
    assert split_kwargs({"data": "x", "bf16": True, "method": "full"})[0].dtype == "float32"   # trained weights stay fp32
    assert split_kwargs({"data": "x", "bf16": True, "dtype": "float32"})[0].dtype == "float32"
