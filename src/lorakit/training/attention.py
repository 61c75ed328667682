"""Attention's backward in fp32 under bf16 autocast, on CPUs where that measures faster.

Under bf16 autocast `scaled_dot_product_attention` runs torch's CPU flash kernel in bf16, forward
and backward. At training's short sequences that bf16 backward is slower than the fp32 one:
4x9x128x64 on a 2-core EPYC (AVX512-BF16) took 6.3 ms in bf16 and 3.8 ms in fp32, against a 1.4 ms
forward (a LoRA step of SmolLM2-135M: 1.24 -> 1.17 s); at 8x9x256x64 bf16 wins (27 vs 33 ms). `fp32_backward()` is a TorchFunctionMode for the
training forward: each CPU flash call under bf16 autocast runs its forward as autocast would (the
same op on the same bf16 inputs: the output is bit-identical) and keeps the same bf16 tensors for
backward; backward upcasts them and runs the kernel's fp32 backward, which is also the more exact
one (dq 2.5x closer to an fp64 reference). Nothing else changes: what autograd keeps is what the
bf16 path keeps, and no transformers code is touched (the mode sees the `F.sdpa` call that
transformers' own "sdpa" attention makes).

Which backward runs is measured, once per (batch, heads, length bucket, head dim), on random data
of that shape, and said in the log; where bf16 is the faster (long sequences, or a CPU whose bf16
kernels are fast) the call goes through untouched. Grouped-query heads handed to the kernel
(`enable_gqa`) are repeated first, as transformers does when it passes a mask. The measurement's
data comes from its own generator, not the run's random stream. It does not apply with dropout,
or where torch would not pick the flash kernel itself; a checkpointed model recomputes its forward
outside the mode, so the Trainer does not use it there.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from .. import runtime

log = logging.getLogger("lorakit")
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
BUCKET = 64                     # sequence lengths measured together: 1-64, 65-128, ...
_choice: dict[tuple, bool] = {}  # (B, H, T bucket, D, mask?, causal?, threads) -> fp32 backward is faster


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the float mask sdpa gives its flash kernel (-inf where False)."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _FlashFp32Backward(torch.autograd.Function):
    """out = flash(q, k, v) in bf16; backward: the flash backward on the same tensors, upcast to fp32."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))                  # what autocast would pass
        mask = _additive(mask, torch.bfloat16)
        out, lse = _FLASH(qb, kb, vb, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(qb, kb, vb, out, lse, mask)
        ctx.is_causal, ctx.scale, ctx.dtypes = is_causal, scale, (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        qb, kb, vb, out, lse, mask = ctx.saved_tensors
        mask = None if mask is None else mask.float()          # the mask forward used, as rounded there
        grads = _FLASH_BACKWARD(grad.float().contiguous(), qb.float(), kb.float(), vb.float(), out.float(), lse, 0.0,
                                ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None, None)


def _faster_in_fp32(shape: tuple[int, int, int, int], has_mask: bool, is_causal: bool) -> bool:
    """Measured: is the fp32 backward faster than the bf16 one at `shape` (B, H, T, D)?"""
    B, H, T, D = shape
    key = (B, H, -(-T // BUCKET), D, has_mask, is_causal, torch.get_num_threads())
    if key not in _choice:
        t = -(-T // BUCKET) * BUCKET
        q = torch.randn(B, H, t, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))  # not the run's RNG
        mask = torch.zeros(B, 1, t, t, dtype=torch.bfloat16) if has_mask else None
        out, lse = _FLASH(q, q, q, 0.0, is_causal, attn_mask=mask, scale=None)
        q32, o32, m32 = q.float(), out.float(), None if mask is None else mask.float()
        bf16 = runtime.best_seconds(lambda: _FLASH_BACKWARD(out, q, q, q, out, lse, 0.0, is_causal, attn_mask=mask),
                                    repeat=3)
        fp32 = runtime.best_seconds(lambda: _FLASH_BACKWARD(o32, q32, q32, q32, o32, lse, 0.0, is_causal,
                                                            attn_mask=m32), repeat=3)
        _choice[key] = fp32 < bf16
        log.info("attention backward at %dx%dx%dx%d: %.1f ms in bf16, %.1f ms in fp32 (measured): %s", B, H, t, D,
                 bf16 * 1e3, fp32 * 1e3, "fp32" if fp32 < bf16 else "bf16")
    return _choice[key]


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _arguments(args: tuple, kwargs: dict) -> dict | None:
    """F.sdpa's arguments by name (None: something this mode does not know, left to sdpa itself)."""
    if len(args) > len(_SDPA_ARGS) or any(k not in _SDPA_ARGS for k in kwargs):
        return None
    bound = dict(zip(_SDPA_ARGS, args), **kwargs)
    return bound if all(n in bound for n in _SDPA_ARGS[:3]) else None


def _applies(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    q = query
    if dropout_p or q.device.type != "cpu" or q.dim() != 4 or not torch.is_grad_enabled():
        return False
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    heads, kv_heads = q.shape[1], key.shape[1]
    if key.shape != value.shape or (kv_heads != heads and not (enable_gqa and heads % kv_heads == 0)):
        return False
    if not any(t.requires_grad for t in (q, key, value)) or key.shape[2:] != q.shape[2:]:
        return False
    # the CPU kernel choice reads shapes, strides and the mask, not fp32 vs bf16: no cast needed to ask
    choice = torch._fused_sdp_choice(q, q, q, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    return choice == SDPBackend.FLASH_ATTENTION.value and _faster_in_fp32(tuple(q.shape), attn_mask is not None,
                                                                          bool(is_causal))


class fp32_backward(TorchFunctionMode):
    """Within it, CPU flash attention under bf16 autocast runs its backward in fp32 where faster."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = _arguments(args, kwargs)
            if a is not None and _applies(**a):
                q, k, v = a["query"], a["key"], a["value"]
                if k.shape[1] != q.shape[1]:          # grouped-query heads: each kv head serves H / KV query heads
                    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
                return _FlashFp32Backward.apply(q, k, v, a.get("attn_mask"), bool(a.get("is_causal", False)),
                                                a.get("scale"))
        return func(*args, **kwargs)
