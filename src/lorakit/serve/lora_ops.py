"""The batched multi-adapter LoRA op: one base matmul for the whole batch, each row its own adapter.

Semantics (x (N, d_in) token rows, y (N, d_out) = the base layer's output for them, bias b (d_out,)
or none; S adapter slots of one layer: A (S, r_max, d_in), Bt (S, r_max, d_out) = each slot's B
(d_out, r) transposed, lower ranks zero-padded; scale s (S,), DoRA factor g (S, d_out), dora (S,)
bool; idx (N,) in [-1, S)):

    for every row i with k = idx[i] >= 0:
        d      = s[k] * (x[i] @ A[k].T) @ Bt[k]       # = s B A x   (d_out,)
        out[i] = y[i] + d                        if not dora[k]     # LoRA
        out[i] = g[k] * (y[i] - b + d) + b       if dora[k]         # DoRA, g = m / ||W0 + s B A||_c
    rows with idx[i] = -1 (base only): out[i] = y[i]

B is stored transposed so that both batched matmuls read whole contiguous rows of each slot and a
lower rank is a prefix of rows: measured on SmolLM2's MLP shapes (32 slots, r=16, 1 token each),
the second bmm takes half the time it takes on a transposed view. The DoRA factor is a constant
per adapter and layer at inference (W0 is frozen, the norm detached: Liu et al., 2024,
arXiv:2402.09353, sec. 4.3), so it is computed once (`methods.dora.dora_factor`, DoRA's own norm) when an adapter is loaded,
never per step; for LoRA slots g is all ones and unused. The scale stays per slot (B is kept as
loaded) and multiplies the rank-r intermediate, the cheapest place for it.

Two implementations of the same semantics: `lora_reference` gathers every row's A and B and uses
einsum (the pure-torch reference the tests hold the fast op to), and `lora_grouped`, which sorts
rows by slot once per forward (`plan_rows`, shared by every layer) and then, per layer, either
- runs two batched matmuls over slot groups padded to the longest group (Punica's BGMV idea,
  Chen et al., 2023, arXiv:2310.18547): when rows are already grouped and every group has the same
  length (a decode step, equal-length prefills) the padding is a free `view`, and the second
  matmul accumulates straight into y (`baddbmm_`, no (N, d_out) temporary); or
- loops over contiguous segments, one pair of matmuls each (SGMV), when padding would more than
  double the work (one long prefill beside many one-token decodes).
What this does not do: dropout, gradients through the slots, or quantized adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.dora import dora_factor  # noqa: F401  (part of this module's surface)

# Below this many padded rows a batched matmul costs about what one small matmul call does, so
# padding a few short groups is cheaper than looping over them.
_FREE_PADDED_ROWS = 256


@dataclass
class SlotWeights:
    """One layer's adapter slots (a view of the tensors a `BatchedLoraLinear` owns)."""

    A: torch.Tensor        # (S, r_max, d_in)
    Bt: torch.Tensor       # (S, r_max, d_out): B transposed
    scale: torch.Tensor    # (S,)
    g: torch.Tensor        # (S, d_out), ones where not DoRA
    dora: torch.Tensor     # (S,) bool
    ranks: list[int]       # per slot, 0 = empty on this layer (the fast op trims padding with it)
    dora_slots: frozenset  # the slots where dora is True, for the fast op's Python-side decisions


def _finish(rows_out: torch.Tensor, dora: torch.Tensor | None, g: torch.Tensor | None, bias) -> torch.Tensor:
    """rows_out = y + d; DoRA rows become g * (y + d - b) + b."""
    if dora is None or not bool(dora.any()):
        return rows_out
    b = 0 if bias is None else bias.to(rows_out.dtype)
    return torch.where(dora[:, None], g * (rows_out - b) + b, rows_out)


def lora_reference(y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, slots: SlotWeights,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The semantics above, row by row through gathered weights. y (N, d_out), x (N, d_in), idx (N,)."""
    rows = (idx >= 0).nonzero().squeeze(1)                        # (n,)
    if rows.numel() == 0:
        return y
    k = idx[rows].long()                                          # (n,)
    dt = slots.A.dtype
    xa = torch.einsum("nd,nrd->nr", x[rows].to(dt), slots.A[k]) * slots.scale[k, None]   # (n, r_max)
    d = torch.einsum("nr,nro->no", xa, slots.Bt[k])                                     # (n, d_out)
    new = _finish(y[rows].to(dt) + d, slots.dora[k], slots.g[k], bias)
    out = y.clone()
    out[rows] = new.to(y.dtype)
    return out


@dataclass
class RowPlan:
    """Rows grouped by slot, computed once per forward from idx and shared by every layer."""

    idx: torch.Tensor              # (N,) the token rows' slots, on the rows' device (for the reference)
    order: torch.Tensor | None     # (n,) rows with an adapter, sorted by slot; None: already so, and n = N
    slots: list[int]               # the used slots, ascending (U of them)
    starts: list[int]              # each slot's first position in sorted order
    counts: list[int]              # and its number of rows
    mode: str                      # "view", "padded" or "segments"
    lo: int = 0                    # padded/view: groups are slots lo .. lo+G-1 (a slice of the slot tensors)...
    groups: torch.Tensor | None = None   # ... or these slots (G,), gathered, when the used slots are sparse
    G: int = 0
    width: int = 0                 # rows per group after padding
    group_of_row: torch.Tensor | None = None   # (n,) padded mode: each sorted row's group
    pos_of_row: torch.Tensor | None = None     # (n,) and its position in it

    @property
    def n(self) -> int:
        return sum(self.counts)


def plan_rows(idx: torch.Tensor) -> RowPlan | None:
    """Group the rows of idx (N,) by slot. None when no row uses an adapter (nothing to do)."""
    idx = idx.long().flatten()
    n_all = idx.numel()
    sorted_idx, order = torch.sort(idx, stable=True)
    n_base = int((sorted_idx < 0).sum())
    if n_base == n_all:
        return None
    sorted_idx, order = sorted_idx[n_base:], order[n_base:]
    used, counts_t = torch.unique_consecutive(sorted_idx, return_counts=True)
    slots, counts = used.tolist(), counts_t.tolist()
    starts = [0] * len(counts)
    for i in range(1, len(counts)):
        starts[i] = starts[i - 1] + counts[i - 1]
    n = n_all - n_base
    identity = n_base == 0 and bool((order == torch.arange(n_all, device=order.device)).all())
    U, width = len(slots), max(counts)
    lo, span = slots[0], slots[-1] - slots[0] + 1
    plan = RowPlan(idx=idx, order=None if identity else order, slots=slots, starts=starts, counts=counts,
                   mode="segments", width=width)
    # A slice of the slot tensors is free; gathering sparse slots copies their weights. Reading a few
    # unused slots inside the span is cheaper than that copy, up to about twice the used ones.
    if span <= 2 * U:
        plan.lo, plan.G = lo, span
        group = used - lo
    else:
        plan.groups, plan.G = used, U
        group = torch.arange(U, device=idx.device)
    if identity and span == U and all(c == width for c in counts):
        plan.mode = "view"                                         # x.view(G, width, d_in), no copy
    elif plan.G * width <= max(2 * n, _FREE_PADDED_ROWS):
        plan.mode = "padded"
        plan.group_of_row = group.repeat_interleave(counts_t)                        # (n,)
        first = torch.tensor(starts, device=idx.device).repeat_interleave(counts_t)  # (n,)
        plan.pos_of_row = torch.arange(n, device=idx.device) - first
    return plan


def lora_grouped(y: torch.Tensor, x: torch.Tensor, plan: RowPlan | None, slots: SlotWeights,
                 bias: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """The semantics above, rows grouped by `plan` (from `plan_rows(idx)`). y (N, d_out), x (N, d_in).
    `inplace`: update and return y itself (a layer's fresh output) instead of a copy."""
    if plan is None:
        return y
    ranks = slots.ranks
    r = max(ranks[k] for k in plan.slots)
    if r == 0:                                                     # no used adapter touches this layer
        return y
    out = y if inplace else y.clone()
    dt = slots.A.dtype
    xs = (x if plan.order is None else x[plan.order]).to(dt)      # (n, d_in), sorted by slot
    ys = (out if plan.order is None else out[plan.order]).to(dt)  # (n, d_out): out itself when sorted
    n, d_in, d_out = xs.shape[0], xs.shape[1], ys.shape[1]

    if plan.mode == "segments":
        for k, a, c in zip(plan.slots, plan.starts, plan.counts):
            rk = ranks[k]
            if rk:
                h = (xs[a:a + c] @ slots.A[k, :rk].T) * slots.scale[k]          # (c, rk)
                ys[a:a + c].addmm_(h, slots.Bt[k, :rk])                         # (c, d_out)
    else:
        if plan.groups is None:
            A = slots.A[plan.lo:plan.lo + plan.G, :r]                          # (G, r, d_in), a view
            Bt = slots.Bt[plan.lo:plan.lo + plan.G, :r]                        # (G, r, d_out), a view
            s = slots.scale[plan.lo:plan.lo + plan.G]
        else:
            A = slots.A.index_select(0, plan.groups)[:, :r]
            Bt = slots.Bt.index_select(0, plan.groups)[:, :r]
            s = slots.scale.index_select(0, plan.groups)
        if plan.mode == "view":
            xp = xs.reshape(plan.G, plan.width, d_in)                           # (G, W, d_in)
        else:
            xp = xs.new_zeros(plan.G, plan.width, d_in)
            xp[plan.group_of_row, plan.pos_of_row] = xs
        h = torch.bmm(xp, A.transpose(1, 2)) * s[:, None, None]                # (G, W, r)
        if plan.mode == "view" and ys.is_contiguous():
            ys.view(plan.G, plan.width, d_out).baddbmm_(h, Bt)                  # ys += h @ Bt, in place
        else:
            dp = torch.bmm(h, Bt)                                               # (G, W, d_out)
            ys += dp.reshape(n, d_out) if plan.mode == "view" else dp[plan.group_of_row, plan.pos_of_row]

    if slots.dora_slots:
        b = 0 if bias is None else bias.to(dt)
        for k, a, c in zip(plan.slots, plan.starts, plan.counts):
            if k in slots.dora_slots:
                ys[a:a + c] = slots.g[k] * (ys[a:a + c] - b) + b
    if plan.order is not None:
        out[plan.order] = ys.to(out.dtype)
    elif ys is not out:                                            # computed in the slots' dtype
        out.copy_(ys)
    return out
