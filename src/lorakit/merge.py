"""Merge adapters into base weights, take them back out, or bake them in for good.

`merge` is all-or-nothing: every candidate weight is checked for non-finite values before any
layer is written, so a bad adapter leaves the model exactly as it was. Merging twice merges once.
"""
from __future__ import annotations

import torch
from torch import nn

from .inject import active_adapters, adapter_layers, input_adapters, saved_wrappers
from .linear import replace_module
from .state import detach, state


class MergeError(RuntimeError):
    pass


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold adapters `names` (default: the active ones) into the base weights."""
    names = active_adapters(model) if names is None else state(model).require(names)
    _no_input_adapters(model, names)
    plan = []
    for lname, layer in adapter_layers(model):
        todo = [n for n in names if n in layer.adapters and n not in layer.merged]
        if todo:
            plan.append((lname, layer, todo))
    bad = [lname for lname, layer, todo in plan if not torch.isfinite(layer.merged_weight(todo)).all()]
    if bad:
        raise MergeError(f"merging {names} would put non-finite values into {len(bad)} layers "
                         f"(first: {bad[0]}); the model is unchanged")
    for _, layer, todo in plan:
        layer.merge(todo)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights (exact up to float rounding)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def _no_input_adapters(model: nn.Module, names: list[str]) -> None:
    inputs = [n for n in names if n in input_adapters(model)]
    if inputs:
        raise MergeError(f"adapters {inputs} are prompt/prefix adapters: they live in the inputs and the KV cache, "
                         "not in any weight, so they cannot be merged")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain transformers model, adapters removed."""
    _no_input_adapters(model, active_adapters(model))
    merge(model)
    active = active_adapters(model)
    for lname, layer in adapter_layers(model):
        replace_module(model, lname, layer.base_layer)
    for wname, wrapper in saved_wrappers(model):
        replace_module(model, wname, wrapper.current() if active else wrapper.original)
    detach(model)
    model.__dict__.pop("save_pretrained", None)     # a plain transformers model saves as one again
    for p in model.parameters():
        p.requires_grad_(True)
    return model
