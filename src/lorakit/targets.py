"""Which modules an adapter attaches to: presets by role and PEFT's matching rules.

Rules (the same as PEFT's, so saved configs mean the same thing everywhere):
- a preset name (`qv`, `attention`, `mlp`, `all-linear`) selects layers by role (`role()`: query,
  key, value, output, fused qkv, gate, up, down, fused gate-up, router), read from each layer's
  name in its context, so it works on architectures no table lists;
- any other string is a regex that must match the *whole* module name;
- a list matches a module whose name equals an entry or ends with `.entry`.
Only linear layers (`linear.py`'s kinds) are candidates. `all-linear` is peft's: every linear
layer except the output head (for a sequence classifier with no output embeddings, its
`score`/`classifier` head), on every architecture, poolers included. This module finds names; it never changes a model.
"""
from __future__ import annotations

import re
from collections import Counter

from torch import nn

from . import families, linear

# Roles, not per-family tables: a layer's role comes from its own name read in its context (is it
# inside an attention module?), so one map covers Llama, GPT-2, BERT, Falcon, T5, Phi, OPT, MoE, ...
# Attention roles need an attention module around the layer, MLP roles need its absence.
_IN_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_ATTENTION_LEAVES = {
    "q_proj": "query", "query": "query", "q": "query", "q_lin": "query", "wq": "query",
    "k_proj": "key", "key": "key", "k": "key", "k_lin": "key", "wk": "key",
    "v_proj": "value", "value": "value", "v": "value", "v_lin": "value", "wv": "value",
    "o_proj": "output", "out_proj": "output", "o": "output", "out_lin": "output", "dense": "output",
    "c_proj": "output", "wo": "output",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv", "Wqkv": "qkv", "qkv": "qkv",
}
_MLP_LEAVES = {
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate",
    "up_proj": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up", "wi": "up", "fc_in": "up", "w3": "up",
    "wi_1": "up",
    "down_proj": "down", "fc2": "down", "c_proj": "down", "dense_4h_to_h": "down", "wo": "down", "fc_out": "down",
    "w2": "down",
    "gate_up_proj": "gate_up",
    "gate": "router", "router": "router", "shared_expert_gate": "router",
}
_DENSE_BY_PARENT = {"intermediate": "up", "output": "down"}     # BERT's layer MLP: intermediate.dense, output.dense
ROLES = ("query", "key", "value", "output", "qkv", "gate", "up", "down", "gate_up", "router")
PRESET_ROLES = {
    "qv": ("query", "value", "qkv"),     # the original LoRA paper's choice; a fused qkv is adapted whole, as peft does
    "attention": ("query", "key", "value", "output", "qkv"),
    "mlp": ("gate", "up", "down", "gate_up"),
}


def role(name: str) -> str | None:
    """The role of linear layer `name`: 'model.layers.0.self_attn.q_proj' -> 'query' (None: no known role)."""
    *context, leaf = name.split(".")
    if any(_IN_ATTENTION.search(part) for part in context):
        return _ATTENTION_LEAVES.get(leaf)
    if leaf == "dense":
        return _DENSE_BY_PARENT.get(context[-1] if context else "")
    return _MLP_LEAVES.get(leaf)


PRESETS = ("qv", "attention", "mlp", "all-linear")
SEQ_CLS_HEADS = ("score", "classifier")          # peft's SEQ_CLS_HEAD_NAMES, in its order
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # "model.layers.3.self_attn.q_proj" -> ("model.layers", "3", "self_attn.q_proj")


class TargetError(ValueError):
    """No module, or the wrong modules, matched a targeting rule."""


def family(model: nn.Module) -> str | None:
    """The family label of this model (`families.MODEL_TYPES`), or None; presets do not depend on it."""
    return families.label(getattr(model, "config", None))


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
    """What `all-linear` leaves out, by peft's rule: the output embeddings, or for a sequence classifier
    without them its head (`score` or `classifier`, the first that exists). A pooler is not a head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and families.task_type(model) == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _matches(rule, name: str, presets: dict) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(presets.get(rule, rule), name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in rule)


def _presets_for(model: nn.Module, candidates: list[str]) -> dict[str, str]:
    heads = _head_names(model)       # all-linear: every linear layer but the head, on every architecture (peft's rule)
    by_role = {p: [n for n in candidates if role(n) in roles] for p, roles in PRESET_ROLES.items()}
    by_role["all-linear"] = [n for n in candidates if n not in heads]
    return {p: "|".join(re.escape(n) for n in names) or r"(?!)" for p, names in by_role.items()}


def resolve(model: nn.Module, targets, exclude=None, what: str = "targets") -> list[str]:
    """The linear-module names that `targets` selects minus `exclude`, in model order."""
    candidates = linear_names(model)
    presets = _presets_for(model, candidates)          # all-linear there already leaves the head out
    chosen = [n for n in candidates if _matches(targets, n, presets)]
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
    lines.append("Roles: " + (roles_summary(candidates) or "none recognised (name the modules, or use a regex)"))
    return "\n".join(lines)


def roles_summary(names: list[str]) -> str:
    """'query x2 (self_attn.q_proj), ...'; a fused qkv says that qv adapts the whole projection."""
    found: dict[str, Counter] = {}
    for n in names:
        if (r := role(n)) is not None:
            found.setdefault(r, Counter())[kind(n)] += 1
    parts = []
    for r in ROLES:
        if r in found:
            kinds = ", ".join(found[r])
            parts.append(f"{r} x{sum(found[r].values())} ({kinds})"
                         + (": fused q, k and v; qv adapts the whole projection, as peft does" if r == "qkv" else ""))
    return "; ".join(parts)


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


def classifier_heads(model: nn.Module) -> list[str]:
    """peft's default modules_to_save for a classifier (SEQ_CLS, TOKEN_CLS): ["classifier", "score"],
    added to whatever the user asked for; [] for other models."""
    if families.task_type(model) not in ("SEQ_CLS", "TOKEN_CLS"):
        return []
    return list(SEQ_CLS_HEADS[::-1])       # peft's order: classifier, score


def resolve_modules_to_save(model: nn.Module, keys: list[str]) -> list[str]:
    """PEFT's rule for modules_to_save: a module whose name equals a key or ends with `.key`."""
    names = [n for n, _ in model.named_modules() if n]
    found, missing = [], []
    for key in keys:
        hits = [n for n in names if (n == key or n.endswith("." + key)) and not _inside_adapter_layer(n)]
        (found.extend(hits) if hits else missing.append(key))
    if found:   # peft's classifier default names both heads; a model has one of them
        missing = [k for k in missing if k not in SEQ_CLS_HEADS]
    if missing:
        raise TargetError(f"modules_to_save {missing} matched no module of this model "
                          f"(top-level modules: {[n for n, _ in model.named_children()]})")
    return list(dict.fromkeys(found))
