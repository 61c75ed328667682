"""What a base linear layer is: its shape, its dense weight, and how a module is swapped for another.

Every layer above this one (adapters, targeting, merge, the planner, serving) asks here instead of
testing types. Two kinds are built in: `nn.Linear` (weight `(d_out, d_in)`) and GPT-2's `Conv1D`,
whose weight is stored transposed, `(d_in, d_out)` (PEFT calls it `fan_in_fan_out`). Quantization
registers its own (`quant.linear4bit.Linear4bit`) when it is imported, so a new kind of base layer
is one `register` call and nothing else changes.

`dense_weight` always answers in the `(d_out, d_in)` layout; for the float kinds it is a view of
the parameter (differentiable, no copy), for a quantized kind a fresh dequantized tensor.
What this module does not do: build adapters, or decide which layers to adapt (`targets.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Kind:
    """How one base-layer class answers the protocol."""

    shape: Callable[[nn.Module], tuple[int, int]]               # (d_in, d_out)
    weight: Callable[[nn.Module], torch.Tensor]                 # (d_out, d_in)
    write: Callable[[nn.Module, torch.Tensor], nn.Module]       # the layer now holding w (d_out, d_in)
    stored: Callable[[nn.Module], tuple]                        # the shape of what it stores, its own layout
    transposed: bool = False                                    # stored as (d_in, d_out)


_KINDS: dict[type, Kind] = {}


def register(cls: type, kind: Kind) -> None:
    """Make `cls` a base linear layer: adapters wrap it, targets see it, merge writes it."""
    _KINDS[cls] = kind


def kind_of(layer: nn.Module) -> Kind | None:
    for cls in type(layer).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


def is_linear(layer: nn.Module) -> bool:
    return kind_of(layer) is not None


def _kind(layer: nn.Module) -> Kind:
    kind = kind_of(layer)
    if kind is None:
        names = ", ".join(c.__name__ for c in _KINDS)
        raise TypeError(f"{type(layer).__name__} is not a linear layer ({names})")
    return kind


def shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out)."""
    return _kind(layer).shape(layer)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight in the (d_out, d_in) layout: a view for float layers, dequantized for quantized ones."""
    return _kind(layer).weight(layer)


def write_weight(layer: nn.Module, w_out_in: torch.Tensor) -> nn.Module:
    """Store `w_out_in` (d_out, d_in) as the layer's weight; returns the layer that now holds it
    (a quantized layer becomes a float `nn.Linear`: a merged weight is not re-rounded silently)."""
    return _kind(layer).write(layer, w_out_in)


def stored_shape(layer: nn.Module) -> tuple:
    return tuple(_kind(layer).stored(layer))


def transposed(layer: nn.Module) -> bool:
    return _kind(layer).transposed


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` ("model.layers.0.self_attn.q_proj") is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _copy_into(layer: nn.Module, w: torch.Tensor, transpose: bool) -> nn.Module:
    layer.weight.data.copy_(w.T if transpose else w)
    return layer


register(nn.Linear, Kind(shape=lambda m: (m.in_features, m.out_features), weight=lambda m: m.weight,
                         write=lambda m, w: _copy_into(m, w, False), stored=lambda m: m.weight.shape))
register(Conv1D, Kind(shape=lambda m: (m.nx, m.nf), weight=lambda m: m.weight.T,
                      write=lambda m, w: _copy_into(m, w, True), stored=lambda m: m.weight.shape, transposed=True))
