"""DoRA: W' = m * (W0 + s B A) / ||W0 + s B A||_c, the norm per output channel (row of W0).

Liu et al., 2024, arXiv:2402.09353. LoRA learns the direction; a magnitude m (d_out,) learns the
length of each output row. m starts at ||W0||_c, so with B = 0 the adapter starts as a no-op.
The norm is detached (paper, sec. 4.3): it follows B A but takes no gradient.

Forward, the way peft applies it to the base output y = W0 x + b already computed, so no second
base matmul (g = m / ||W0 + s B A||_c, shape (d_out,)):
    out = g * (y - b + s B A x) + b
With dropout in training, peft runs the base again on the dropped-out input, and so do we:
    out = y + (g - 1) * W0 drop(x) + g * s B A drop(x)

The norm without forming the (d_out, d_in) matrix B A each step:
    ||W0 + s B A||_c^2 = ||W0||_c^2 + 2 s rowdot(B, W0 A^T) + s^2 rowdot(B (A A^T), B)
with ||W0||_c^2 cached on the layer (`AdapterLayer.base_sq_norms`): one (d_out, d_in) x (d_in, r)
matmul and a few (d_out, r) ops, against the direct form's B A, W0 + s B A and its norm. Merge and
unmerge use the direct norm (`weight_norm`), the pure-torch reference the tests hold the fast form
to. Measured in fp32 against fp64 on all 210 SmolLM2-135M projections, r=16, with ||s B A||_F from
0.01 to 1 x ||W0||_F: at most 2.0e-7 relative error (the direct form: 2.2e-7); on the tiny test
models ~1e-7, and logits agree with peft to ~1e-7, well inside the 1e-5 test tolerance. Time for
all 210 norms, 2 threads: ~60 ms (fast, cached), ~85 ms (fast, ||W0||^2 recomputed), ~150 ms
(direct). The expanded form loses accuracy only when the norm is tiny next to ||W0||_c, i.e. when
s B A nearly cancels whole rows of W0.

With several adapters on one layer, W0 is the base with no adapter merged (as peft merges) and an
earlier adapter's output is rescaled by g along with the base's (as peft's forward does).
What this does not do: DoRA on embeddings or convolutions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, sum_dtype
from .lora import LoraAdapter


def weight_norm(w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W0 + s B A||_c (d_out,) for W0 (d_out, d_in), detached, in A's dtype on W0's device: the direct
    form, what merge, unmerge and serving use (and the reference for the forward's fast form)."""
    with torch.no_grad():
        dev = w0.device
        return torch.linalg.norm(w0.to(A.dtype) + scale * (B.to(dev) @ A.to(dev)), dim=1)


def dora_factor(w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, m: torch.Tensor) -> torch.Tensor:
    """g = m / ||W0 + s B A||_c (d_out,): DoRA's row scale of the merged weight, a constant at inference.
    Computed where W0 is (a served base may be on a GPU), returned where A is."""
    with torch.no_grad():
        return (m.to(w0.device, A.dtype) / weight_norm(w0, A, B, scale)).to(A.device)


class DoraAdapter(LoraAdapter):
    """LoRA plus a learnable magnitude `m` (d_out,), initialised to the row norms of `base_weight`."""

    def __init__(self, base_weight: torch.Tensor, r: int, scale: float, dropout: float = 0.0,
                 init: str = "default", dtype: torch.dtype = torch.float32, device=None):
        d_out, d_in = base_weight.shape                                          # (d_out, d_in) layout
        super().__init__(d_in, d_out, r, scale, dropout, init, dtype=dtype, device=device)
        with torch.no_grad():
            norm = torch.linalg.norm(base_weight.detach().to(device=self.A.device, dtype=dtype), dim=1)
        self.m = nn.Parameter(norm)                                               # (d_out,)
        self.fast_norm = True            # False: the direct norm in forward too (the reference, for tests)
        self.register_buffer("merged_norm", None, persistent=False)              # peft caches it the same way

    # -- the norm ---------------------------------------------------------------------------
    def weight_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A||_c (d_out,), detached: the direct form."""
        return weight_norm(base_weight, self.A, self.B, self.scale)

    def forward_norm(self, layer: AdapterLayer) -> torch.Tensor:
        """The norm the forward divides by, detached; W0 is the layer's base with no adapter merged."""
        if layer.merged or not self.fast_norm:    # another adapter merged into the base: rare, direct
            return self.weight_norm(layer.unmerged_base_weight())
        with torch.no_grad():
            A, B, s = self.A, self.B, self.scale
            w0 = layer.base_weight().to(A.dtype)                                 # (d_out, d_in)
            p = torch.addmm(B @ (A @ A.T), w0, A.T, beta=s, alpha=2)             # (d_out, r): s B A A^T + 2 W0 A^T
            sq = layer.base_sq_norms().to(A.dtype) + s * (p * B).sum(1)          # ||W0||^2 + rowdot(B, s p)
            return sq.clamp_min(0).sqrt()

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        x = x.to(self.A.dtype)
        g = self.m / self.forward_norm(layer)                                    # (d_out,)
        bias = getattr(layer.base_layer, "bias", None)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)                                                  # (..., d_in)
            base = F.linear(x, layer.base_weight().to(x.dtype))                  # (..., d_out), no bias
            update = F.linear(F.linear(x, self.A), self.B)
            dt = sum_dtype(base_out, x.dtype)
            return base_out.to(dt) + ((g - 1) * base + g * self.scale * update).to(dt)
        update = F.linear(F.linear(x, self.A), self.B)                           # (..., r) -> (..., d_out)
        y, dt = base_out.to(x.dtype), sum_dtype(base_out, x.dtype)
        if bias is None:
            return (g * (y + self.scale * update)).to(dt)
        return (g * (y - bias + self.scale * update) + bias).to(dt)

    # -- merge ------------------------------------------------------------------------------
    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """m * (W0 + s B A) / ||W0 + s B A||_c - W0, for W0 = `base_weight` (d_out, d_in)."""
        return self._factor(base_weight) * (base_weight + super().delta_weight()) - base_weight

    def merge_into(self, weight: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """`weight + delta_weight(weight)` when `weight` is the base; when other adapters are already
        merged into `weight`, they are rescaled with it (as in the forward), the norm still from `base`.
        Records the norm for `unmerge_from`: the merged weight alone cannot give it back."""
        base = weight if base is None else base
        self.merged_norm = self.weight_norm(base)
        g = self._factor(base, self.merged_norm)
        return (g * (weight + super().delta_weight())).to(weight.dtype)

    def unmerge_from(self, weight: torch.Tensor) -> torch.Tensor:
        if self.merged_norm is None:
            raise RuntimeError("this DoRA adapter was not merged (no recorded norm to unmerge with)")
        g = self._factor(weight, self.merged_norm)
        return (weight / g - super().delta_weight()).to(weight.dtype)

    def _factor(self, base_weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
        norm = self.weight_norm(base_weight) if norm is None else norm
        return (self.m / norm).unsqueeze(1)                                       # (d_out, 1), norm detached

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
