"""Putting adapters into a model and taking them out: inject, activate, disable, delete, report.

The model stays the caller's transformers model, changed in place: target layers become
`AdapterLayer`s, `modules_to_save` become `ModulesToSave`, input adapters (prompt, prefix) enter
through hooks on the decoder (`methods/input.py`), and everything else lorakit knows about the
model (configs, targets, the active set) is its `AdapterState` (`state.py`). Which adapter a
config builds is the method registry's business (`methods/registry.py`). Injecting the same name
twice is an error, not a second adapter. At most one input adapter is active at a time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from . import families
from .linear import replace_module
from .methods import fused_mlp
from .methods import input as input_hooks
from .methods import registry
from .methods.base import AdapterLayer
from .methods.modules_to_save import ModulesToSave
from .methods.param import ParamLayer, ParamLora, find_parameters
from .methods.prompt import PromptTuning
from .state import save_pretrained, state
from .targets import TargetError, classifier_heads, kind, resolve, resolve_modules_to_save, role

log = logging.getLogger("lorakit")


def configs(model: nn.Module) -> dict:
    """{adapter name: config} (the state's own dict)."""
    return state(model).configs


def adapter_layers(model: nn.Module):
    """Every module that carries weight adapters: wrapped linear layers and modules with adapted parameters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ParamLayer))]


def saved_wrappers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def input_adapters(model: nn.Module) -> nn.ModuleDict:
    inputs = state(model).inputs
    return inputs if inputs is not None else nn.ModuleDict()


def active_input(model: nn.Module):
    """The input adapter the decoder hooks apply now (None when bypassed by `disabled`)."""
    st = state(model)
    if st.bypass or st.inputs is None:
        return None
    return next((st.inputs[n] for n in st.active if n in st.inputs), None)


def with_classifier_head(model: nn.Module, config):
    """As peft does for SEQ_CLS and TOKEN_CLS: the head ("classifier" or "score") joins modules_to_save,
    so it trains whole and the file holds it (peft cannot load a classifier adapter without it). A head
    the user adapts with LoRA instead is left alone (and refused at save time)."""
    heads = classifier_heads(model)
    keys = list(config.modules_to_save or [])
    if not heads or all(h in keys for h in heads):
        return config
    adapted = set(resolve(model, config.targets, config.exclude)) if config.targets else set()
    if any(n == h or n.endswith("." + h) for n in adapted for h in heads):
        return config
    return dataclasses.replace(config, modules_to_save=keys + [h for h in heads if h not in keys])


def with_experts(model: nn.Module, config):
    """peft's all-linear on Mixtral-style MoE models: the fused experts and the router join as
    target_parameters, the fused gate_up stack at twice the rank and alpha, as peft writes it."""
    params = families.MOE_ALL_LINEAR.get(getattr(getattr(model, "config", None), "model_type", None))
    if config.targets != "all-linear" or config.target_parameters is not None or not params:
        return config
    fused = rf".*\.{families.FUSED_TWICE}"
    return dataclasses.replace(config, target_parameters=sorted(params),
                               rank_pattern={**config.rank_pattern, fused: 2 * config.r},
                               alpha_pattern={**config.alpha_pattern, fused: 2 * config.alpha})


def inject(model: nn.Module, config, name: str = "default", tokenizer=None) -> nn.Module:
    """Add adapter `name` to `model` (in place) and return it. The first adapter becomes active.

    `config`: a LoraConfig (LoRA or DoRA), PromptTuningConfig or PrefixTuningConfig. `tokenizer`
    is needed only for a prompt initialised from text.
    """
    state(model).check_new(name)
    method = registry.of(config)
    if method.family == "weight":
        config = with_experts(model, with_classifier_head(model, config))
    if method.family == "input":
        targets, saved = [], []
        _inject_input(model, method, config, name, tokenizer)
    else:
        targets, saved = _inject_weights(model, method, config, name)
    _finish(model, name, config, targets)
    if method.family == "input":
        log.info("adapter %r: %s with %d virtual tokens", name, type(config).__name__, config.num_virtual_tokens)
    else:
        counts = Counter(kind(t) for t in targets)
        fused = [t for t in targets if role(t) == "qkv"]
        log.info("adapter %r on %d modules: %s%s%s", name, len(targets),
                 ", ".join(f"{k} x{c}" for k, c in counts.items()), f"; modules_to_save: {saved}" if saved else "",
                 f"; {len(fused)} fused q/k/v projections adapted whole (as peft does)" if fused else "")
    return model


def _inject_weights(model: nn.Module, method, config, name: str) -> tuple[list[str], list[str]]:
    targets = resolve(model, config.targets, config.exclude) if config.targets else []   # raises before any change
    params = _find_parameters(model, config)
    if config.targets == "all-linear" and not params:
        _refuse_loudly_what_all_linear_cannot_take(model)
    saved = resolve_modules_to_save(model, config.modules_to_save or [])
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap} are both LoRA targets and modules_to_save; choose one")
    layers = {}  # wrap everything first: a shape error must leave the model untouched
    for module_name in targets:
        layer = model.get_submodule(module_name)
        layers[module_name] = layer if isinstance(layer, AdapterLayer) else AdapterLayer(layer, module_name)
    _freeze_once(model)
    for module_name, layer in layers.items():
        if layer is not model.get_submodule(module_name):
            replace_module(model, module_name, layer)
        layer.adapters[name] = method.build(layer, config, module_name, layer.base_layer.weight)
    for owner, names in params.items():
        layer = model.get_submodule(owner)
        if not isinstance(layer, ParamLayer):
            layer = ParamLayer(layer)
            replace_module(model, owner, layer)
        layer.adapters[name] = nn.ModuleDict({p: ParamLora.of(layer.base_layer, p, config, f"{owner}.{p}")
                                              for p in names})
    for module_name in saved:
        wrapper = model.get_submodule(module_name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            replace_module(model, module_name, wrapper)
        wrapper.add(name)
    if families.swiglu_mlp(getattr(model, "config", None)):
        _install_fused_mlps(model)
    return targets, saved


def _install_fused_mlps(model: nn.Module) -> None:
    """Give every SwiGLU MLP (children by role: gate, up, down, and a SiLU) the fused LoRA block."""
    for name, module in model.named_modules():
        roles = {role(f"{name}.{child}" if name else child): child for child, _ in module.named_children()}
        if all(r in roles for r in ("gate", "up", "down")):
            fused_mlp.install(module, (roles["gate"], roles["up"], roles["down"]))


def _find_parameters(model: nn.Module, config) -> dict[str, list[str]]:
    if not config.target_parameters:
        return {}
    found = find_parameters(model, config.target_parameters)
    if not found:
        raise TargetError(f"target_parameters {config.target_parameters} matched no parameter of this model "
                          "(a key is `module.param`, matched whole or as a `.suffix`)")
    return found


def _refuse_loudly_what_all_linear_cannot_take(model: nn.Module) -> None:
    """Fused MoE experts are 3-D parameters, not linear layers. Where all-linear does not add them
    (`with_experts`: only where peft's does), say so where people look, not at INFO."""
    fused = sorted({f"{n}.{p}" for n, m in model.named_modules() for p, t in m.named_parameters(recurse=False)
                    if t.dim() == 3})
    if fused:
        msg = (f"all-linear on {type(model).__name__}: its fused expert weights "
               f"({', '.join(kind(f) for f in fused[:2])}, ... {len(fused)} tensors) are not linear layers and "
               "are not adapted (peft's all-linear leaves them out on this model too). To adapt them, pass "
               "target_parameters (e.g. ['gate_up_proj', 'down_proj']), as in peft.")
        log.error(msg)
        warnings.warn(msg, stacklevel=3)


def _inject_input(model: nn.Module, method, config, name: str, tokenizer) -> None:
    embedding = model.get_input_embeddings()
    adapter = method.build(model, config, embedding)
    field = "prompt_init" if isinstance(adapter, PromptTuning) else "prefix_init"
    init = getattr(config, field)
    if init == "text" and tokenizer is None:
        raise ValueError(f"{type(config).__name__}({field}='text') needs inject(..., tokenizer=...)")
    if isinstance(adapter, PromptTuning):
        ids = tokenizer(config.init_text, add_special_tokens=False).input_ids if init == "text" else None
        adapter.initialise(config.prompt_init, embedding, ids)
        adapter.bind(embedding)
    else:
        adapter.bind(model)
        if init == "text":          # before any input adapter is active: the base's own k/v
            with disabled(model):
                adapter.initialise_from(model, tokenizer(config.prefix_text, add_special_tokens=False).input_ids)
    _freeze_once(model)
    st = state(model)
    st.add_input(model, name, adapter)
    if not st.hooks:
        st.hooks = input_hooks.install(model, active_input)


def _freeze_once(model: nn.Module) -> None:
    if not configs(model):
        model.requires_grad_(False)                                  # the base is frozen, once


def _finish(model: nn.Module, name: str, config, targets: list[str]) -> None:
    state(model).add(name, config, targets)
    if "save_pretrained" not in model.__dict__ and hasattr(type(model), "save_pretrained"):
        # trainers save through model.save_pretrained: make that write PEFT adapter folders (io/trainers.py)
        model.__dict__["save_pretrained"] = functools.partial(save_pretrained, model)
    if not active_adapters(model):
        set_active(model, name)
    else:  # a later adapter stays inactive (and frozen) until set_active
        _set_trainable(model)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state(model).active)


def set_active(model: nn.Module, names) -> None:
    """Make `names` (one name or a list) the active adapters; only they are trainable."""
    st = state(model)
    names = st.require(names)
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
    st.active = names
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
    st = state(model)
    st.require(name)
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
        st.remove_input(model, name)
    st.remove(name)


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
    st = state(model)
    bypass, st.bypass = st.bypass, True
    try:
        yield model
    finally:
        st.bypass = bypass
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
