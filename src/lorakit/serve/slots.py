"""A transformers model served with many adapters at once: each targeted linear layer gets slots.

`attach(model, targets, slots, r_max)` replaces every targeted nn.Linear / Conv1D / Linear4bit by a
`BatchedLoraLinear` that keeps the base layer (resident once) and per-layer slot tensors
(A (S, r_max, d_in), Bt (S, r_max, d_out) = B transposed, scale (S,), DoRA factor g (S, d_out)). Before a forward
the caller says which slot each batch row uses (`handle.rows(idx)`, -1 = base only); every position
of a row uses the row's slot. The row plan is built once per forward and shared by all layers.
What this does not do: choose slots, load from disk or evict (the adapter cache does), or train.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .. import linear
from ..linear import replace_module
from ..methods.base import AdapterLayer, adapter_dtype
from ..targets import linear_names, resolve
from . import lora_rows
from .lora_ops import SlotWeights, _finish, lora_grouped, lora_reference, plan_rows
from .weights import AdapterWeights, LayerWeights, check_served, read_adapter


class Router:
    """Which slot each batch row uses in the current forward; the row plan, cached per input shape.
    One forward at a time: the engine sets rows, runs the model, sets the next rows."""

    def __init__(self):
        self.rows: torch.Tensor | None = None      # (n_rows,) long, CPU
        self.reference = False                     # True: the pure-torch reference op (tests, debugging)
        self._plans: dict = {}

    def set(self, idx) -> None:
        self.rows = None if idx is None else torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
        self._plans = {}

    def plan_for(self, x: torch.Tensor):
        """(token idx (N,), plan) for input x (n_rows, ..., d_in); None when no row has an adapter."""
        if self.rows is None:
            return None
        key = (tuple(x.shape[:-1]), x.device)
        if key not in self._plans:
            n_rows = self.rows.numel()
            if x.dim() < 2 or x.shape[0] != n_rows:
                raise ValueError(f"rows were set for {n_rows} batch rows, but a layer got input of shape "
                                 f"{tuple(x.shape)}: call handle.set_rows with one slot per batch row")
            per_row = x.numel() // (n_rows * x.shape[-1])                            # positions per row
            idx = self.rows.to(x.device).repeat_interleave(per_row)                   # (N,) per token
            plan = plan_rows(idx)
            self._plans[key] = None if plan is None else (idx, plan)
        return self._plans[key]


class BatchedLoraLinear(nn.Module):
    """A frozen base linear layer plus S adapter slots, applied per row by the batched op."""

    def __init__(self, base_layer: nn.Module, router: Router, n_slots: int, r_max: int,
                 dtype: torch.dtype | None = None, name: str = ""):
        super().__init__()
        if isinstance(base_layer, AdapterLayer) or not linear.is_linear(base_layer):
            raise TypeError(f"{name or type(base_layer).__name__}: expected a plain linear layer, found "
                            f"{type(base_layer).__name__} (serve a model without lorakit adapters injected)")
        self.base_layer, self.router, self.name = base_layer, router, name
        self.d_in, self.d_out = linear.shape(base_layer)
        weight = getattr(base_layer, "weight", None)            # Linear4bit keeps packed codes instead
        device = next((t.device for t in (*base_layer.parameters(), *base_layer.buffers())), None)
        if dtype is None:   # adapters stay fp32 on a half-precision or quantized base, as in training
            dtype = adapter_dtype(weight) if weight is not None else torch.float32
        kw = dict(dtype=dtype, device=device)
        self.register_buffer("A", torch.zeros(n_slots, r_max, self.d_in, **kw), persistent=False)
        self.register_buffer("Bt", torch.zeros(n_slots, r_max, self.d_out, **kw), persistent=False)  # B transposed
        self.register_buffer("scale", torch.zeros(n_slots, **kw), persistent=False)
        self.register_buffer("g", torch.ones(n_slots, self.d_out, **kw), persistent=False)
        self.register_buffer("dora", torch.zeros(n_slots, dtype=torch.bool, device=device), persistent=False)
        self.ranks = [0] * n_slots
        self._ranks = torch.zeros(n_slots, dtype=torch.long)        # the same, for the row kernel
        self._dora_slots: frozenset = frozenset()

    @property
    def slots(self) -> SlotWeights:
        return SlotWeights(self.A, self.Bt, self.scale, self.g, self.dora, self.ranks, self._dora_slots)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        routed = self.router.plan_for(x)
        if routed is None:
            return y
        idx, plan = routed
        x2, y2 = x.reshape(-1, self.d_in), y.reshape(-1, self.d_out)              # (N, d_in), (N, d_out)
        bias = getattr(self.base_layer, "bias", None)
        if self.router.reference:
            out = lora_reference(y2, x2, idx, self.slots, bias)
        elif lora_rows.usable(self.A.dtype, x2):      # a decode step on a CPU: one kernel call, row by row
            out = self._dora_rows(lora_rows.apply(y2, x2, idx, self.A, self.Bt, self.scale, self._ranks), idx, bias)
        else:
            out = lora_grouped(y2, x2, plan, self.slots, bias, inplace=True)   # y is ours to change
        return out.view(y.shape)

    def _dora_rows(self, out: torch.Tensor, idx: torch.Tensor, bias) -> torch.Tensor:
        """DoRA rows of y + d become g * (y + d - b) + b (lora_ops' semantics), after the row kernel."""
        if not self._dora_slots:
            return out
        k = idx.clamp(min=0)
        done = _finish(out.float(), self.dora[k] & (idx >= 0), self.g[k].float(), bias)   # in fp32
        return done if done.dtype == out.dtype else done.to(out.dtype)

    def check(self, w: LayerWeights) -> None:
        r = w.A.shape[0]
        if tuple(w.A.shape) != (r, self.d_in) or tuple(w.B.shape) != (self.d_out, r) or \
                (w.g is not None and tuple(w.g.shape) != (self.d_out,)):
            raise ValueError(f"{self.name}: adapter shapes A {tuple(w.A.shape)}, B {tuple(w.B.shape)} do not fit a "
                             f"layer with d_in={self.d_in}, d_out={self.d_out}")
        if r > self.A.shape[1]:
            raise ValueError(f"{self.name}: rank {r} is above r_max = {self.A.shape[1]}")

    @torch.no_grad()
    def write(self, k: int, w: LayerWeights | None) -> None:
        """Put `w` into slot k (None: clear it). Lower ranks are zero-padded up to r_max."""
        r = 0 if w is None else w.A.shape[0]
        if w is not None:
            self.check(w)
            self.A[k, :r].copy_(w.A)
            self.Bt[k, :r].copy_(w.B.T)
        self.A[k, r:].zero_()
        self.Bt[k, r:].zero_()
        if w is not None and w.g is not None:
            self.g[k].copy_(w.g)
        else:
            self.g[k].fill_(1)
        self.scale[k] = 0 if w is None else w.scale
        self.dora[k] = w is not None and w.g is not None
        self.ranks[k] = r
        self._ranks[k] = r
        self._dora_slots = frozenset(i for i, d in enumerate(self.dora.tolist()) if d)

    def slot_bytes(self) -> int:
        return sum(t.nbytes for t in (self.A, self.Bt, self.scale, self.g, self.dora))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, slots={self.A.shape[0]}, r_max={self.A.shape[1]}"


class ServeHandle:
    """What `attach` returns: set rows per forward, write and clear slots, load folders, detach."""

    def __init__(self, model: nn.Module, layers: dict[str, BatchedLoraLinear], router: Router, n_slots: int,
                 r_max: int):
        self.model, self.layers, self.router = model, layers, router
        self.n_slots, self.r_max = n_slots, r_max
        self.served = {name: (layer.d_in, layer.d_out) for name, layer in layers.items()}

    # -- per forward --------------------------------------------------------------------------
    def set_rows(self, idx) -> None:
        """The slot of each batch row for the next forwards (-1: base only; None: every row base)."""
        if idx is not None:
            t = torch.as_tensor(idx, dtype=torch.long)
            bad = t[(t < -1) | (t >= self.n_slots)]
            if bad.numel():
                raise ValueError(f"slot indices {bad.tolist()[:8]} out of range [-1, {self.n_slots})")
        self.router.set(idx)

    @contextlib.contextmanager
    def rows(self, idx):
        self.set_rows(idx)
        try:
            yield self.model
        finally:
            self.router.set(None)

    @property
    def reference(self) -> bool:
        return self.router.reference

    @reference.setter
    def reference(self, value: bool) -> None:
        self.router.reference = bool(value)

    # -- slots --------------------------------------------------------------------------------
    def write_slot(self, k: int, weights: AdapterWeights) -> None:
        """Put an adapter into slot k of every served layer (layers it does not target: cleared).
        Everything is checked before any layer is written."""
        if not 0 <= k < self.n_slots:
            raise ValueError(f"slot {k} out of range [0, {self.n_slots})")
        outside = [m for m in weights.layers if m not in self.layers]
        if outside:
            raise ValueError(f"adapter {weights.name!r} targets modules without slots: {sorted(outside)[:8]}")
        for m, w in weights.layers.items():
            self.layers[m].check(w)
        for m, layer in self.layers.items():
            layer.write(k, weights.layers.get(m))

    def clear_slot(self, k: int) -> None:
        for layer in self.layers.values():
            layer.write(k, None)

    def slot_bytes(self) -> int:
        """Bytes of all slot tensors (allocated once at attach, whatever is in them)."""
        return sum(layer.slot_bytes() for layer in self.layers.values())

    # -- loading ------------------------------------------------------------------------------
    def read(self, folder: str | Path, name: str = "adapter") -> AdapterWeights:
        """A PEFT folder as CPU weights for this model (lorakit's loader, checks and messages)."""
        return read_adapter(folder, self.model, self.served, self.r_max, name)

    def check(self, folder: str | Path) -> None:
        """Raise what `read` would for the folder's config, names and shapes, reading only headers."""
        check_served(folder, self.model, self.served, self.r_max, lazy=True)

    def detach(self) -> nn.Module:
        """Put the plain base layers back; the slots are dropped."""
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model


def attach(model: nn.Module, targets="all-linear", slots: int = 8, r_max: int = 16,
           dtype: torch.dtype | None = None) -> ServeHandle:
    """Give every linear layer that `targets` selects (lorakit/PEFT rules) `slots` adapter slots of rank
    up to `r_max`, in place; the base weights stay as they are. Returns the handle that drives them."""
    if slots < 1 or r_max < 1:
        raise ValueError(f"slots = {slots} and r_max = {r_max} must be >= 1")
    if any(isinstance(m, (AdapterLayer, BatchedLoraLinear)) for m in model.modules()):
        raise ValueError("this model already has adapters injected or attached; serve a plain base model")
    chosen = resolve(model, targets)
    model.requires_grad_(False)
    router = Router()
    layers = {}
    for name in chosen:
        layers[name] = BatchedLoraLinear(model.get_submodule(name), router, slots, r_max, dtype, name)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return ServeHandle(model, layers, router, slots, r_max)
