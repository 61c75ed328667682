"""Attention's fp32 backward under bf16 autocast, against F.sdpa itself and an fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.models import tiny_model
from lorakit.training import attention


@pytest.fixture
def always_fp32(monkeypatch):
    """Take the fp32 backward whatever this CPU measures, so the tests see it run."""
    monkeypatch.setattr(attention, "_faster_in_fp32", lambda *a: True)


def _qkv(seed=0, shape=(2, 3, 20, 16), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


def _attend(qkv, mode: bool, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in qkv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if mode:
            with attention.fp32_backward():
                out = F.scaled_dot_product_attention(q, k, v, **kw)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
    out.float().mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)], type(out.grad_fn).__name__


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask=torch.ones(20, 20, dtype=torch.bool).tril()),
                                dict(attn_mask=torch.rand(2, 1, 20, 20) > 0.3, scale=0.3)])
def test_same_forward_and_a_closer_backward(always_fp32, kw):
    qkv = _qkv()
    mask = kw.get("attn_mask")
    if mask is not None:           # no fully masked rows: those are NaN in every kernel
        kw = dict(kw, attn_mask=mask | torch.eye(20, dtype=torch.bool))
    out0, g0, fn0 = _attend(qkv, False, **kw)
    out1, g1, fn1 = _attend(qkv, True, **kw)
    assert fn1 == "_FlashFp32BackwardBackward" and fn0 != fn1
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)            # autocast's own forward, to the bit
    ref = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in qkv]   # the bf16 inputs, exactly
    F.scaled_dot_product_attention(*ref, **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                             for k, v in kw.items()}) \
        .mul(torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
    for a, b, r in zip(g1, g0, ref):
        assert a.dtype == torch.float32
        err = lambda g: ((g.double() - r.grad).norm() / r.grad.norm()).item()   # noqa: E731
        assert err(a) <= err(b) + 1e-3, (err(a), err(b))
        assert err(a) < 5e-3


def test_untouched_where_it_does_not_apply(always_fp32):
    qkv = _qkv()
    with attention.fp32_backward():
        out = F.scaled_dot_product_attention(*qkv)                       # no autocast: fp32 sdpa as ever
        assert type(out.grad_fn).__name__ != "_FlashFp32BackwardBackward"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(*qkv, dropout_p=0.5)
            assert type(out.grad_fn).__name__ != "_FlashFp32BackwardBackward"
            with torch.no_grad():
                assert F.scaled_dot_product_attention(*qkv).grad_fn is None


def test_a_tiny_llama_step_is_the_same_forward(always_fp32):
    results = []
    for mode in (False, True):
        model = tiny_model("llama")
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0                                                  # a padded row: a boolean 4-D mask
        with torch.autocast("cpu", dtype=torch.bfloat16), (attention.fp32_backward() if mode else torch.enable_grad()):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert l1 == l0
    for n in g0:
        assert ((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-12)) < 0.05, n


def test_the_choice_is_measured_once_per_shape_bucket(monkeypatch):
    calls = []
    monkeypatch.setattr(attention.runtime, "best_seconds", lambda fn, repeat=3: calls.append(1) or len(calls) % 2)
    monkeypatch.setattr(attention, "_choice", {})
    assert attention._faster_in_fp32((1, 2, 30, 16), False, True) is True        # bf16 1 s, fp32 0 s
    assert attention._faster_in_fp32((1, 2, 60, 16), False, True) is True        # same bucket: not measured again
    assert len(calls) == 2
    attention._faster_in_fp32((1, 2, 70, 16), False, True)
    assert len(calls) == 4


def test_keyword_arguments_and_grouped_query_heads(always_fp32):
    q, k, v = _qkv()
    k4, v4 = (t.detach()[:, :1].clone().requires_grad_(True) for t in (k, v))   # 1 kv head for 3 query heads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with attention.fp32_backward():
            out = F.scaled_dot_product_attention(query=q, key=k4, value=v4, is_causal=True, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q, k4, v4, is_causal=True, enable_gqa=True)
    assert "_FlashFp32Backward" in type(out.grad_fn).__name__ or any(
        "_FlashFp32Backward" in type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().sum().backward()
    assert k4.grad.shape == k4.shape and torch.isfinite(k4.grad).all()


def test_a_float_mask_reads_the_same_in_backward_as_in_forward(always_fp32):
    """An additive mask that is not 0/-inf (a position bias) is rounded to bf16 for the forward;
    backward must see the same mask, or the saved log-sum-exp no longer matches."""
    qkv = _qkv()
    mask = torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(3)) * 8
    out0, g0, _ = _attend(qkv, False, attn_mask=mask)
    out1, g1, _ = _attend(qkv, True, attn_mask=mask)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    ref = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in qkv]
    F.scaled_dot_product_attention(*ref, attn_mask=mask.to(torch.bfloat16).double()) \
        .mul(torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
    for a, b, r in zip(g1, g0, ref):
        err = lambda g: ((g.double() - r.grad).norm() / r.grad.norm()).item()   # noqa: E731
        assert err(a) <= err(b) + 1e-3, (err(a), err(b))


def test_measuring_leaves_the_run_random_stream_alone(monkeypatch):
    monkeypatch.setattr(attention, "_choice", {})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    attention._faster_in_fp32((1, 2, 16, 8), False, True)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
