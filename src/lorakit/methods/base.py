"""The weight-adapter interface: a base layer wrapped with named adapters.

`AdapterLayer` owns the bookkeeping every weight adapter shares (which adapters exist, which are
active, which are merged into the base weight); a `WeightAdapter` owns only its own math.
Input adapters (prompt, prefix) do not wrap layers and do not live here.

The base layer is anything `linear.py` knows (nn.Linear, GPT-2's Conv1D, a quantized layer);
adapters always see and return the `(d_out, d_in)` layout, and `AdapterLayer` asks `linear` for it.
Merging into a 4-bit base dequantizes it and keeps the merged result as a float `nn.Linear`.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from .. import linear


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on a half-precision (or quantized) base: they are small, and the
    low-rank update is where precision matters."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def sum_dtype(base_out: torch.Tensor, adapter: torch.dtype) -> torch.dtype:
    """The dtype an adapted layer adds its update in, and returns.

    Under autocast the base layer answers in bf16/fp16, whose 8 (or 11) mantissa bits round away an
    update smaller than ~0.4% of the base output: early in training a LoRA update is that small,
    so a bf16 sum loses most of it and bf16 runs learn markedly slower than fp32 ones (measured in
    BENCHMARKS.md). Under autocast the sum is therefore taken, and returned, in the adapter's
    precision; the next autocast op casts its input anyway. Without autocast (a base stored in
    bf16 end to end) the layer must answer in the base's dtype for the next layer to accept it.
    """
    if adapter.itemsize > base_out.dtype.itemsize and torch.is_autocast_enabled(base_out.device.type):
        return adapter
    return base_out.dtype


class _SharedCast(threading.local):
    """The last input cast to the autocast dtype, while that input lives: q/k/v (gate/up) are called
    with one tensor, and under autocast each would otherwise cast it again, for its base matmul and
    for its adapter's, and keep each copy for backward."""
    entry = None      # (weakref to the input, its version, grad mode, autocast dtype, the cast)

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        e, key = self.entry, (x._version, torch.is_grad_enabled(), dtype)
        if e is not None and e[0]() is x and e[1:4] == key:
            return e[4]
        cast = x.to(dtype)
        ref = weakref.ref(x, lambda r: setattr(self, "entry", None) if self.entry and self.entry[0] is r else None)
        self.entry = (ref, *key, cast)
        return cast


_shared_cast = _SharedCast()


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in the autocast dtype when autocast is on for its device (what the base and adapter
    matmuls would each cast it to), cast once for every layer that reads the same tensor."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x
    dtype = torch.get_autocast_dtype(device)
    return x if x.dtype == dtype else _shared_cast.get(x, dtype)


class WeightAdapter(nn.Module):
    """One named adapter on one base layer. Subclasses define the math, nothing else."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: "AdapterLayer") -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """The update to the `(d_out, d_in)` base weight; the one source for forward, merge, unmerge."""
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` with this adapter merged in. `base` is the layer's weight with no adapter merged
        (default: `weight`), the W0 the forward sees; only adapters whose update depends on W0 (DoRA) read it."""
        return weight + self.delta_weight(weight if base is None else base).to(weight.dtype)

    def unmerge_from(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(weight).to(weight.dtype)


class AdapterLayer(nn.Module):
    """A frozen base layer plus named weight adapters: out = base(x), then each active unmerged adapter."""

    def __init__(self, base_layer: nn.Module, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = linear.shape(base_layer)
        self.fan_in_fan_out = linear.transposed(base_layer)
        expected = (self.d_in, self.d_out) if self.fan_in_fan_out else (self.d_out, self.d_in)
        found = linear.stored_shape(base_layer)
        if found != expected:
            raise ValueError(f"{name or type(base_layer).__name__}: weight shape {found} does not match its "
                             f"declared features (d_in={self.d_in}, d_out={self.d_out}): expected {expected}")
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self._sq_norms = None   # (weight tensor, its version, ||W0||^2 per row): see base_sq_norms

    # Model code reads a projection's own attributes (T5: `self.wo.weight.dtype`); answer with the base
    # layer's, as stored, the way peft's wrapped layers do.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if type(self.base_layer) is nn.Linear:    # its matmul would cast x under autocast anyway
            x = autocast_input(x)
        out = self.base_layer(x, *args, **kwargs)
        for name in self.active:
            if name in self.adapters and name not in self.merged:
                out = self.adapters[name](x, out, self)
        return out

    # -- the base weight in (d_out, d_in) layout ------------------------------------------
    def base_weight(self) -> torch.Tensor:
        return linear.dense_weight(self.base_layer)

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight (float) with every merged adapter taken out: the W0 the forward's adapters see."""
        with torch.no_grad():
            w = self.base_weight().detach().float()
            for name in reversed(self.merged):
                w = self.adapters[name].unmerge_from(w)
        return w

    def base_sq_norms(self) -> torch.Tensor:
        """||W||^2 of each output row of the base weight as it stands, (d_out,), at least fp32; cached.

        The cache holds the weight tensor itself and its version counter, so an in-place write
        (`load_state_dict`, `copy_`) or a replaced tensor misses it; `_write_base_weight` (merge,
        unmerge) and `_apply` (`.to()`, `.half()`: the Parameter object survives those) drop it.
        """
        t = self.base_layer.weight
        cached = self._sq_norms
        if cached is None or cached[0] is not t or cached[1] != t._version:
            with torch.no_grad():
                w = self.base_weight().detach()
                w = w.to(torch.promote_types(w.dtype, torch.float32))
                cached = self._sq_norms = (t, t._version, w.square().sum(1))   # (d_out,)
        return cached[2]

    def _apply(self, fn, recurse=True):
        self._sq_norms = None
        return super()._apply(fn, recurse)

    def _write_base_weight(self, w_out_in: torch.Tensor) -> None:
        self._sq_norms = None
        self.base_layer = linear.write_weight(self.base_layer, w_out_in)

    # -- merge ------------------------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with `names` merged in, computed without touching the layer."""
        with torch.no_grad():
            w = self.base_weight().detach().float()
            base = self.unmerged_base_weight() if self.merged else w
            for name in names:
                w = self.adapters[name].merge_into(w, base)
        return w

    def merge(self, names: list[str]) -> None:
        todo = [n for n in names if n not in self.merged]
        if todo:
            with torch.no_grad():
                self._write_base_weight(self.merged_weight(todo))
            self.merged.extend(todo)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_weight().detach().float()
            for name in reversed(self.merged):
                w = self.adapters[name].unmerge_from(w)
            self._write_base_weight(w)
        self.merged.clear()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, active={self.active}, merged={self.merged}"
