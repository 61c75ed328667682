"""The fused LoRA SwiGLU block against its reference: the MLP's own forward over the LoRA layers."""
import contextlib

import pytest
import torch

import lorakit as lk
from lorakit.methods import fused_mlp
from lorakit.models import tiny_model


def _model(family="llama", **config):
    model = tiny_model(family)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.5)        # a trained adapter: B = 0 would hide the up/gate branch
    return model.train()


@contextlib.contextmanager
def _fused(on: bool):
    old, fused_mlp.enabled = fused_mlp.enabled, on
    try:
        yield
    finally:
        fused_mlp.enabled = old


def _run(model, x, on: bool, bf16: bool):
    """Output and every adapter grad of the first MLP, for an input that needs grad too."""
    mlp = model.model.layers[0].mlp
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with _fused(on), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = mlp(x)
    fused = "_SwiGLULora" in type(y.grad_fn.next_functions[0][0] if y.grad_fn.name() == "ViewBackward0"
                                  else y.grad_fn).__name__
    assert fused == on, f"fused path {'not ' if on else ''}taken"
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_matches_the_modules_own_forward_in_fp32(family):
    model = _model(family)
    assert "forward" in model.model.layers[0].mlp.__dict__      # installed on this family
    x = torch.randn(2, 5, model.config.hidden_size)
    (y0, dx0, g0), (y1, dx1, g1) = _run(model, x, False, False), _run(model, x, True, False)
    assert y1.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)   # the same math, summed in another order
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) == 6       # A and B of gate, up, down
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_under_bf16_autocast_is_as_close_to_fp32_as_the_unfused_graph(family):
    """The forward is the unfused one's to the bit (fp32 sums, the same bf16 matmuls); backward reads
    g and u rounded to bf16 where the unfused graph keeps fp32, and sums dx in bf16: its distance to
    the fp32 truth must stay that of the unfused graph's (~0.5% here)."""
    model = _model(family)
    x = torch.randn(2, 5, model.config.hidden_size)
    truth, unfused, fused = _run(model, x, False, False), _run(model, x, False, True), _run(model, x, True, True)
    assert fused[0].dtype == torch.float32                       # the fp32 sum, as LoraAdapter returns it
    torch.testing.assert_close(fused[0], unfused[0], rtol=0, atol=0)
    assert _rel(fused[1], truth[1]) <= 1.5 * _rel(unfused[1], truth[1]) + 1e-3
    for n in truth[2]:
        assert _rel(fused[2][n], truth[2][n]) <= 1.5 * _rel(unfused[2][n], truth[2][n]) + 2e-3, n


def test_a_training_step_is_the_same_fused_or_not():
    """Whole-model loss and adapter grads, fp32: what the trainer sees."""
    results = []
    for on in (False, True):
        model = _model()
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        with _fused(on):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("case", ["dora", "dropout", "two active", "merged", "disabled"])
def test_what_it_does_not_take_runs_the_modules_own_forward(case):
    model = _model(**{"dora": {"use_dora": True}, "dropout": {"dropout": 0.1}}.get(case, {}))
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, model.config.hidden_size)
    stack = contextlib.ExitStack()
    if case == "two active":
        lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets="all-linear"), name="other")
        lk.set_active(model, ["default", "other"])
    if case == "merged":
        lk.merge(model)
    if case == "disabled":
        stack.enter_context(lk.disabled(model))
    with stack:
        assert fused_mlp._plan(mlp, x) is None
    assert fused_mlp._plan(_model().model.layers[0].mlp, x) is not None


def test_not_installed_where_the_family_is_not_known_to_have_it():
    model = tiny_model("gpt2")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_install_takes_only_the_exact_swiglu_shape():
    from torch import nn

    class MLP(nn.Module):
        def __init__(self, act, extra=False):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = act
            if extra:
                self.norm = nn.LayerNorm(8)      # something the fused block would skip

    names = ("gate_proj", "up_proj", "down_proj")
    assert fused_mlp.install(MLP(nn.SiLU()), names)
    assert not fused_mlp.install(MLP(nn.GELU()), names)
    assert not fused_mlp.install(MLP(nn.SiLU(), extra=True), names)


def test_a_trainable_base_weight_or_a_backward_hook_takes_the_unfused_path():
    x = torch.randn(1, 3, 32)
    model = _model()
    mlp = model.model.layers[0].mlp
    mlp.down_proj.base_layer.weight.requires_grad_(True)
    assert fused_mlp._plan(mlp, x) is None
    model = _model()
    mlp = model.model.layers[0].mlp
    handle = mlp.up_proj.register_full_backward_hook(lambda *a: None)
    assert fused_mlp._plan(mlp, x) is None
    handle.remove()
    assert fused_mlp._plan(mlp, x) is not None


def test_it_survives_pickling(tmp_path):
    model = _model()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    lk.inject(loaded, lk.LoraConfig(r=2, alpha=4, targets="all-linear"), name="again")
    mlp = loaded.model.layers[0].mlp
    assert mlp.forward.__func__ is fused_mlp.forward
