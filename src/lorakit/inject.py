"""Putting adapters into a model and taking them out: inject, activate, disable, delete, report.

The model stays the caller's transformers model, changed in place: target layers become
`AdapterLayer`s, `modules_to_save` become `ModulesToSave`, input adapters (prompt, prefix) live in
`model.lorakit_inputs` and enter through hooks on the decoder (`methods/input.py`), and the configs
live in `model.lorakit_configs` ({adapter name: config}). Injecting the same name twice is an
error, not a second adapter. At most one input adapter is active at a time.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import INPUT_CONFIGS, LoraConfig, PromptTuningConfig
from .methods import input as input_hooks
from .methods.base import AdapterLayer
from .methods.dora import DoraAdapter
from .methods.prefix import PrefixTuning, kv_layout
from .methods.prompt import PromptTuning
from .methods.lora import LoraAdapter
from .methods.modules_to_save import ModulesToSave
from .targets import kind, resolve, resolve_modules_to_save

log = logging.getLogger("lorakit")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    return model.__dict__.setdefault("lorakit_configs", {})


def adapter_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def saved_wrappers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 on a half-precision (or quantized) base: they are small, and the
    # low-rank update is where precision matters.
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def input_adapters(model: nn.Module) -> nn.ModuleDict:
    inputs = getattr(model, "lorakit_inputs", None)
    return inputs if inputs is not None else nn.ModuleDict()


def active_input(model: nn.Module):
    """The input adapter the decoder hooks apply now (None when bypassed by `disabled`)."""
    if model.__dict__.get("lorakit_bypass"):
        return None
    inputs = input_adapters(model)
    return next((inputs[n] for n in active_adapters(model) if n in inputs), None)


def inject(model: nn.Module, config, name: str = "default", tokenizer=None) -> nn.Module:
    """Add adapter `name` to `model` (in place) and return it. The first adapter becomes active.

    `config`: a LoraConfig (LoRA or DoRA), PromptTuningConfig or PrefixTuningConfig. `tokenizer`
    is needed only for a prompt initialised from text.
    """
    if not _NAME.match(name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-' (no dots)")
    if name in configs(model):
        raise ValueError(f"adapter {name!r} is already in this model; delete_adapter() it first or pick another name")
    if isinstance(config, INPUT_CONFIGS):
        return _inject_input(model, config, name, tokenizer)
    targets = resolve(model, config.targets, config.exclude)          # raises before anything changes
    saved = resolve_modules_to_save(model, config.modules_to_save or [])
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap} are both LoRA targets and modules_to_save; choose one")

    layers = {}  # wrap everything first: a shape error must leave the model untouched
    for module_name in targets:
        layer = model.get_submodule(module_name)
        layers[module_name] = layer if isinstance(layer, AdapterLayer) else AdapterLayer(layer, module_name)

    if not configs(model):
        model.requires_grad_(False)                                  # the base is frozen, once
    for module_name, layer in layers.items():
        if layer is not model.get_submodule(module_name):
            replace_module(model, module_name, layer)
        weight = layer.base_layer.weight
        r, scale, dtype = config.rank_for(module_name), config.scale_for(module_name), _adapter_dtype(weight)
        if config.use_dora:   # the magnitude starts at the row norms of the base with no adapter merged
            layer.adapters[name] = DoraAdapter(layer.unmerged_base_weight(), r, scale, config.dropout, config.init,
                                               dtype=dtype, device=weight.device)
        else:
            layer.adapters[name] = LoraAdapter(layer.d_in, layer.d_out, r, scale, config.dropout, config.init,
                                               dtype=dtype, device=weight.device)
    for module_name in saved:
        wrapper = model.get_submodule(module_name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            replace_module(model, module_name, wrapper)
        wrapper.add(name)

    configs(model)[name] = config
    model.__dict__.setdefault("lorakit_targets", {})[name] = targets
    if not active_adapters(model):
        set_active(model, name)
    else:  # a later adapter stays inactive (and frozen) until set_active
        _set_trainable(model)
    counts = Counter(kind(t) for t in targets)
    log.info("adapter %r on %d modules: %s%s", name, len(targets), ", ".join(f"{k} x{c}" for k, c in counts.items()),
             f"; modules_to_save: {saved}" if saved else "")
    return model


def _inject_input(model: nn.Module, config, name: str, tokenizer) -> nn.Module:
    embedding = model.get_input_embeddings()
    dtype = _adapter_dtype(embedding.weight)
    if isinstance(config, PromptTuningConfig):
        adapter = PromptTuning(config.num_virtual_tokens, embedding.weight.shape[1], dtype, embedding.weight.device)
        token_ids = None
        if config.prompt_init == "text":
            if tokenizer is None:
                raise ValueError("PromptTuningConfig(prompt_init='text') needs inject(..., tokenizer=...)")
            token_ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
        adapter.initialise(config.prompt_init, embedding, token_ids)
        adapter.bind(embedding)
    else:
        layers, kv_heads, head_dim = kv_layout(model.config)
        adapter = PrefixTuning(config.num_virtual_tokens, layers, kv_heads, head_dim, config.projection, dtype,
                               embedding.weight.device).bind(model)
        if config.prefix_init == "text":          # before any input adapter is active: the base's own k/v
            if tokenizer is None:
                raise ValueError("PrefixTuningConfig(prefix_init='text') needs inject(..., tokenizer=...)")
            with disabled(model):
                adapter.initialise_from(model, tokenizer(config.prefix_text, add_special_tokens=False).input_ids)
    if not configs(model):
        model.requires_grad_(False)
    if getattr(model, "lorakit_inputs", None) is None:
        model.lorakit_inputs = nn.ModuleDict()
    model.lorakit_inputs[name] = adapter
    input_hooks.install(model, active_input)
    configs(model)[name] = config
    model.__dict__.setdefault("lorakit_targets", {})[name] = []
    if not active_adapters(model):
        set_active(model, name)
    else:
        _set_trainable(model)
    log.info("adapter %r: %s with %d virtual tokens", name, type(config).__name__, config.num_virtual_tokens)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("lorakit_active", []))


def set_active(model: nn.Module, names) -> None:
    """Make `names` (one name or a list) the active adapters; only they are trainable."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in configs(model)]
    if unknown:
        raise KeyError(f"no adapter named {unknown} (this model has {list(configs(model))})")
    inputs = [n for n in names if n in input_adapters(model)]
    if len(inputs) > 1:
        raise ValueError(f"only one prompt/prefix adapter can be active at a time, not {inputs}")
    for lname, layer in adapter_layers(model):
        stray = [n for n in layer.merged if n not in names]
        if stray:
            raise RuntimeError(f"adapters {stray} are merged into {lname}; unmerge(model) before switching")
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for _, wrapper in saved_wrappers(model):
        wrapper.active = list(names)
    model.__dict__["lorakit_active"] = names
    _set_trainable(model)


def _set_trainable(model: nn.Module) -> None:
    active = set(active_adapters(model))
    for _, layer in adapter_layers(model):
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in active)
    for _, wrapper in saved_wrappers(model):
        for n, copy in wrapper.copies.items():
            copy.requires_grad_(n in active)
    for n, adapter in input_adapters(model).items():
        adapter.requires_grad_(n in active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; layers left with no adapter become plain base layers again."""
    if name not in configs(model):
        raise KeyError(f"no adapter named {name!r} (this model has {list(configs(model))})")
    for lname, layer in adapter_layers(model):
        if name not in layer.adapters:
            continue
        if name in layer.merged:
            keep = [n for n in layer.merged if n != name]
            layer.unmerge()
            layer.merge(keep)
        del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
        if not layer.adapters:
            replace_module(model, lname, layer.base_layer)
    for wname, wrapper in saved_wrappers(model):
        if name in wrapper.copies:
            del wrapper.copies[name]
        wrapper.active = [n for n in wrapper.active if n != name]
        if not wrapper.copies:
            replace_module(model, wname, wrapper.original)
    if name in input_adapters(model):
        del model.lorakit_inputs[name]
        if not len(model.lorakit_inputs):
            del model.lorakit_inputs
            input_hooks.uninstall(model)
    del configs(model)[name]
    model.__dict__.get("lorakit_targets", {}).pop(name, None)
    model.__dict__["lorakit_active"] = [n for n in active_adapters(model) if n != name]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model with adapters present but bypassed (merged ones are unmerged meanwhile)."""
    layers, wrappers = adapter_layers(model), saved_wrappers(model)
    merged = {lname: list(layer.merged) for lname, layer in layers}
    actives = {lname: list(layer.active) for lname, layer in layers}
    for _, layer in layers:
        layer.unmerge()
        layer.active = []
    for _, wrapper in wrappers:
        wrapper.disabled = True
    bypass = model.__dict__.get("lorakit_bypass", False)
    model.__dict__["lorakit_bypass"] = True
    try:
        yield model
    finally:
        model.__dict__["lorakit_bypass"] = bypass
        for lname, layer in layers:
            layer.active = actives[lname]
            layer.merge(merged[lname])
        for _, wrapper in wrappers:
            wrapper.disabled = False


@dataclass
class Report:
    """Trainable parameters: the numbers behind the seed's tables."""

    trainable: int
    total: int
    matched_modules: int
    by_kind: dict = field(default_factory=dict)   # kind -> {"modules": n, "params": p}
    adapters: list = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent,
                "matched_modules": self.matched_modules, "by_kind": self.by_kind, "adapters": self.adapters}

    def __str__(self) -> str:
        rows = [f"  {k:<28} {v['modules']:>5} modules {v['params']:>14,} params" for k, v in self.by_kind.items()]
        return "\n".join([
            f"adapters {self.adapters or '(none)'}: {self.matched_modules} modules adapted",
            *rows,
            f"trainable {self.trainable:,} / total {self.total:,} = {self.percent:.2f}%",
        ])


def trainable_report(model: nn.Module) -> Report:
    by_kind: dict[str, dict] = {}
    matched = 0
    active = set(active_adapters(model))
    for lname, layer in adapter_layers(model):
        n = sum(p.numel() for a, adapter in layer.adapters.items() if a in active for p in adapter.parameters())
        if n:
            matched += 1
            row = by_kind.setdefault(kind(lname), {"modules": 0, "params": 0})
            row["modules"] += 1
            row["params"] += n
    for wname, wrapper in saved_wrappers(model):
        n = sum(p.numel() for a, c in wrapper.copies.items() if a in active for p in c.parameters())
        row = by_kind.setdefault(f"{kind(wname)} (full)", {"modules": 0, "params": 0})
        row["modules"] += 1
        row["params"] += n
    for a, adapter in input_adapters(model).items():
        if a in active:
            what = "prompt" if isinstance(adapter, PromptTuning) else "prefix"
            by_kind[f"{what} ({adapter.n_virtual} virtual tokens)"] = {
                "modules": 1, "params": sum(p.numel() for p in adapter.parameters())}
    seen = {}
    for p in model.parameters():   # parameters() already skips tied duplicates
        seen[id(p)] = p
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    total = sum(p.numel() for p in seen.values())
    return Report(trainable, total, matched, by_kind, sorted(configs(model)))
