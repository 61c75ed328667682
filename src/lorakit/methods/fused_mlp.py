"""The SwiGLU MLP with LoRA on gate, up and down as one autograd function: training's largest block.

Semantics: exactly the model's own forward over lorakit's LoRA layers (`LoraAdapter.forward`,
the reference the tests compare against), for x (N, d), base weights W (out, in), adapters
A (r, in), B (out, r), scales s, compute dtype c (the autocast dtype, else fp32), sums in fp32:

    g = W_g x + s_g B_g (A_g x)      u = W_u x + s_u B_u (A_u x)      # (N, I), fp32
    h = silu(g) * u                                                   # (N, I), fp32
    y = W_d h + s_d B_d (A_d h)                                       # (N, d), fp32

What the fusion changes is what backward keeps and how often x is read. The unfused graph keeps,
per layer, g, silu(g), u and h (fp32 under bf16 autocast, since the sums are fp32: see
`sum_dtype`) besides x; this one keeps x, g and u in c and the rank-r intermediates, and
recomputes silu(g) and h in backward, elementwise work against ~(3 + 1/2) fp32 (N, I) tensors
of memory per layer. The two shrinks that read x run as one matmul over the stacked [A_g; A_u].
Unsloth's `LoRA_MLP` is the same idea on GPUs; this is the CPU one, in plain torch ops.

What it does not take (the module's own forward runs instead): dropout, DoRA, biases, a
quantized, non-Linear or trainable base, several active or any merged adapters, forward or
backward hooks (on the projections or global), dtypes other than fp32 adapters over a base in c
or fp32 (so not FSDP's bf16 mixed precision, which gathers adapters in bf16).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .base import AdapterLayer
from .lora import LoraAdapter

enabled = True          # tests and benchmarks turn it off to measure the unfused graph


def _silu_types() -> tuple:
    try:
        from transformers.activations import SiLUActivation   # transformers' own (5.x): F.silu
    except ImportError:                                          # older releases use nn.SiLU itself
        return (nn.SiLU,)
    return nn.SiLU, SiLUActivation


def install(mlp: nn.Module, projections: tuple[str, str, str]) -> bool:
    """Route `mlp`'s forward through `forward` below, if its children are exactly the (gate, up,
    down) projections named (inject reads the roles) and one SiLU; True if installed."""
    children = dict(mlp.named_children())
    acts = [n for n, m in children.items() if type(m) in _silu_types()]
    if len(acts) != 1 or set(children) != {*projections, acts[0]}:
        return False
    mlp._lorakit_swiglu = (*projections, acts[0])
    if getattr(mlp.__dict__.get("forward"), "__func__", None) is not forward:   # e.g. lost to pickling
        mlp.forward = types.MethodType(forward, mlp)
    return True


def forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plan = _plan(mlp, x)
    if plan is None:
        return type(mlp).forward(mlp, x)
    (wg, wu, wd), (ag, au, ad), bs, scales, c = plan
    a_gu = torch.cat([ag, au])                       # (r_g + r_u, d): one shrink for both
    args = (x.reshape(-1, x.shape[-1]), wg, wu, wd, a_gu, ad, *bs, scales, ag.shape[0], c)
    y = _SwiGLULora.apply(*args) if torch.is_grad_enabled() else _block(*args)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


def _plan(mlp: nn.Module, x: torch.Tensor):
    """(base weights, A's, B's, scales, compute dtype) when the fused function computes exactly
    what the module would; None otherwise."""
    if not enabled:
        return None
    *names, act = mlp._lorakit_swiglu
    layers = [getattr(mlp, n) for n in names]
    if not all(type(layer) is AdapterLayer for layer in layers):
        return None
    active = layers[0].active
    if len(active) != 1 or any(layer.active != active or layer.merged for layer in layers):
        return None
    adapters = [layer.adapters[active[0]] if active[0] in layer.adapters else None for layer in layers]
    if not all(type(a) is LoraAdapter and isinstance(a.dropout, nn.Identity) for a in adapters):
        return None
    bases = [layer.base_layer for layer in layers]
    if not all(type(b) is nn.Linear and b.bias is None and not b.weight.requires_grad for b in bases):
        return None                                 # a trainable base weight needs its own grad: unfused
    if _hooked([m for layer in layers for m in (layer, layer.base_layer, *layer.adapters.values())]
               + [getattr(mlp, act)]):
        return None
    device = x.device.type
    c = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    params = [a.A for a in adapters] + [a.B for a in adapters]
    if any(p.dtype != torch.float32 for p in params) or any(b.weight.dtype not in (c, torch.float32) for b in bases):
        return None
    if c == torch.float32 and x.dtype != torch.float32:
        return None
    return ([b.weight for b in bases], [a.A for a in adapters], [a.B for a in adapters],
            tuple(a.scale for a in adapters), c)


def _hooked(modules: list[nn.Module]) -> bool:
    """Any hook the fused block would skip: forward or backward, on these modules or global."""
    m = _module
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks \
            or m._global_backward_pre_hooks:
        return True
    return any(x._forward_hooks or x._forward_pre_hooks or x._backward_hooks or x._backward_pre_hooks
               for x in modules)


def _block(x, wg, wu, wd, a_gu, ad, bg, bu, bd, scales, r_g, c):
    """The forward of the block, and what backward reads: (y, xc, g, u, mid, mid_d, casts)."""
    sg, su, sd = scales
    with torch.autocast(x.device.type, enabled=False):
        xc, wg, wu, wd, a_guc, adc = (t.to(c) for t in (x, wg, wu, wd, a_gu, ad))
        mid = F.linear(xc, a_guc)                                                  # (N, r_g + r_u), c
        m32 = mid.float()
        g = F.linear(xc, wg).float().addmm_(m32[:, :r_g], bg.t(), alpha=sg)         # (N, I) fp32
        u = F.linear(xc, wu).float().addmm_(m32[:, r_g:], bu.t(), alpha=su)
        hc = (F.silu(g) * u).to(c)                                                 # (N, I), c
        mid_d = F.linear(hc, adc)                                                  # (N, r_d), c
        y = F.linear(hc, wd).float().addmm_(mid_d.float(), bd.t(), alpha=sd)        # (N, d) fp32
    return y, (xc, g, u, mid, mid_d, wg, wu, wd, a_guc, adc)


class _SwiGLULora(torch.autograd.Function):
    """Forward and backward of the block above; the grads are those of the unfused graph."""

    @staticmethod
    def forward(ctx, x, wg, wu, wd, a_gu, ad, bg, bu, bd, scales, r_g, c):
        y, (xc, g, u, mid, mid_d, *casts) = _block(x, wg, wu, wd, a_gu, ad, bg, bu, bd, scales, r_g, c)
        ctx.save_for_backward(xc, g.to(c), u.to(c), mid, mid_d, *casts, bg, bu, bd)
        ctx.scales, ctx.r_g, ctx.x_dtype = scales, r_g, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, g, u, mid, mid_d, wg, wu, wd, a_guc, adc, bg, bu, bd = ctx.saved_tensors
        (sg, su, sd), r_g, c = ctx.scales, ctx.r_g, xc.dtype
        dy = dy.float()
        g, u = g.float(), u.float()
        silu = F.silu(g)                                                           # recomputed, fp32
        # down: y = W_d h + s_d B_d mid_d, mid_d = A_d h; scales go on the small results, not dy
        d_bd = (dy.t() @ mid_d.float()) * sd                                       # (d, r_d)
        d_mid_d = ((dy @ bd) * sd).to(c)                                           # (N, r_d)
        d_ad = (d_mid_d.t() @ (silu * u).to(c)).float()                            # (r_d, I)
        dh = torch.mm(dy.to(c), wd).float().add_(torch.mm(d_mid_d, adc))           # (N, I) fp32
        # h = silu(g) * u
        du = dh * silu
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)
        # gate, up: g = W_g x + s_g B_g mid_g, u likewise, [mid_g, mid_u] = [A_g; A_u] x
        m32 = mid.float()
        d_bg, d_bu = (dg.t() @ m32[:, :r_g]) * sg, (du.t() @ m32[:, r_g:]) * su     # (I, r_g), (I, r_u)
        d_mid = torch.cat([(dg @ bg) * sg, (du @ bu) * su], 1).to(c)               # (N, r_g + r_u)
        d_agu = (d_mid.t() @ xc).float()                                           # (r_g + r_u, d)
        dx = torch.mm(dg.to(c), wg).float().add_(torch.mm(du.to(c), wu)).add_(torch.mm(d_mid, a_guc))   # (N, d)
        return (dx.to(ctx.x_dtype), None, None, None, d_agu, d_ad, d_bg, d_bu, d_bd, None, None, None)
