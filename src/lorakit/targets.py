"""Which modules an adapter attaches to: presets per architecture family and PEFT's matching rules.

Rules (the same as PEFT's, so saved configs mean the same thing everywhere):
- a preset name (`qv`, `attention`, `mlp`, `all-linear`) resolves per family;
- any other string is a regex that must match the *whole* module name;
- a list matches a module whose name equals an entry or ends with `.entry`.
Only linear layers (nn.Linear, GPT-2 Conv1D) are candidates, and `all-linear` never includes the
output head. This module finds names; it never changes a model.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from . import families, linear

# Each family's presets as full-match regexes over module names.
_LLAMA = {
    "qv": r".*\.(q_proj|v_proj)",                              # the original LoRA paper's choice
    "attention": r".*\.(q_proj|k_proj|v_proj|o_proj)",
    "mlp": r".*\.(gate_proj|up_proj|down_proj)",
}
_GPT2 = {
    "qv": r".*\.attn\.c_attn",       # q, k and v share one fused projection in GPT-2
    "attention": r".*\.attn\.(c_attn|c_proj)",
    "mlp": r".*\.mlp\.(c_fc|c_proj)",
}
_BERT = {
    "qv": r".*\.attention\.self\.(query|value)",
    "attention": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
    "mlp": r".*\.layer\.\d+\.(intermediate|output)\.dense",
}
FAMILIES = {"llama": _LLAMA, "gpt2": _GPT2, "bert": _BERT}
PRESETS = ("qv", "attention", "mlp", "all-linear")
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "model.layers.3.self_attn.q_proj" -> ("model.layers", "3", "self_attn.q_proj")


class TargetError(ValueError):
    """No module, or the wrong modules, matched a targeting rule."""


def family(model: nn.Module) -> str | None:
    """The preset table this model's projections follow (`families.MODEL_TYPES`), or None."""
    return families.presets(getattr(model, "config", None))


def _wrapped(module: nn.Module) -> bool:
    """A wrapper of a base linear layer (an AdapterLayer, a served slot layer): it counts as that layer."""
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and linear.is_linear(base)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (already-wrapped ones count by their own name)."""
    names = []
    for name, module in model.named_modules():
        if _wrapped(module) or (linear.is_linear(module) and not _inside_adapter_layer(name)):
            names.append(name)
    return names


def _inside_adapter_layer(name: str) -> bool:
    return name.endswith(".base_layer") or ".adapters." in name or ".copies." in name or name.endswith(".original")


def kind(name: str) -> str:
    """A module's name relative to its block: 'model.layers.3.mlp.up_proj' -> 'mlp.up_proj'."""
    m = _BLOCK.match(name)
    return m.group(3) if m else name


def _head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {name for name, module in model.named_modules() if head is not None and module is head}
    for name, module in model.named_modules():  # classification heads and poolers sit outside blocks
        if (linear.is_linear(module) or _wrapped(module)) and not _inside_adapter_layer(name) and not _BLOCK.match(name):
            heads.add(name)
    return heads


def _matches(rule, name: str, presets: dict) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(presets.get(rule, rule), name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in rule)


def _presets_for(model: nn.Module, candidates: list[str]) -> dict[str, str]:
    fam = FAMILIES.get(family(model), {})
    presets = dict(fam)
    heads = _head_names(model)
    if fam:
        presets["all-linear"] = "|".join(f"(?:{fam[p]})" for p in ("attention", "mlp"))
    else:  # unknown family: every linear layer inside a numbered block, never a head
        presets["all-linear"] = "|".join(re.escape(n) for n in candidates if _BLOCK.match(n) and n not in heads) or r"(?!)"
    return presets


def resolve(model: nn.Module, targets, exclude=None, what: str = "targets") -> list[str]:
    """The linear-module names that `targets` selects minus `exclude`, in model order."""
    candidates = linear_names(model)
    presets = _presets_for(model, candidates)
    heads = _head_names(model)
    chosen = [n for n in candidates if _matches(targets, n, presets)]
    if targets == "all-linear":
        chosen = [n for n in chosen if n not in heads]
    if isinstance(targets, list):
        unmatched = [e for e in targets if not any(_matches([e], n, presets) for n in candidates)]
        if unmatched:
            raise TargetError(f"{what} {unmatched} matched no linear module of this model.\n" + describe(model, candidates, presets))
    if exclude is not None:
        chosen = [n for n in chosen if not _matches(exclude, n, presets)]
    if not chosen:
        raise TargetError(f"{what} {targets!r}" + (f" minus exclude {exclude!r}" if exclude else "")
                          + " matched no linear module.\n" + describe(model, candidates, presets))
    return chosen


def describe(model: nn.Module, candidates: list[str] | None = None, presets: dict | None = None) -> str:
    """What a user needs to write a rule: the linear modules by kind, and the presets that match."""
    candidates = linear_names(model) if candidates is None else candidates
    presets = _presets_for(model, candidates) if presets is None else presets
    kinds = Counter(kind(n) for n in candidates)
    lines = [f"Linear modules ({family(model) or 'unknown'} family, by kind): "
             + ", ".join(f"{k} x{c}" for k, c in kinds.items())]
    working = [p for p in PRESETS if p in presets and any(re.fullmatch(presets[p], n) for n in candidates)]
    lines.append("Presets that match this model: " + (", ".join(working) or "none"))
    return "\n".join(lines)


def preset_matches(model: nn.Module) -> dict[str, list[str]]:
    """For `lorakit inspect`: each preset and what it would adapt (empty if it matches nothing)."""
    out = {}
    for p in PRESETS:
        try:
            out[p] = resolve(model, p)
        except TargetError:
            out[p] = []
    return out


def portable_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """The shortest list (PEFT list semantics) that selects exactly `chosen` on this model.

    Written to adapter_config.json so other tools adapt the same modules without our presets.
    """
    candidates = linear_names(model)
    kinds = sorted(set(kind(n) for n in chosen))
    selected = [n for n in candidates if any(n == k or n.endswith("." + k) for k in kinds)]
    return kinds if selected == chosen else list(chosen)


def resolve_modules_to_save(model: nn.Module, keys: list[str]) -> list[str]:
    """PEFT's rule for modules_to_save: a module whose name equals a key or ends with `.key`."""
    names = [n for n, _ in model.named_modules() if n]
    found, missing = [], []
    for key in keys:
        hits = [n for n in names if (n == key or n.endswith("." + key)) and not _inside_adapter_layer(n)]
        (found.extend(hits) if hits else missing.append(key))
    if missing:
        raise TargetError(f"modules_to_save {missing} matched no module of this model "
                          f"(top-level modules: {[n for n, _ in model.named_children()]})")
    return list(dict.fromkeys(found))
