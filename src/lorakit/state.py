"""What lorakit keeps on a model besides its modules: one `AdapterState`, under one attribute.

The state owns the adapters' configs and resolved targets, the active set, the bypass flag of
`disabled()`, the input adapters (a ModuleDict that is also registered on the model as
`lorakit_inputs`, so their parameters move with `.to()`, train and checkpoint like any other) and
the decoder hooks that feed them. inject, merge, io and serving call its methods; nothing else
reads a model's `__dict__`. It also holds the one rule for adapter names and the one "no adapter
named" message, and the hook through which `model.save_pretrained` (what trainers call)
writes PEFT folders: `io/trainers.py` registers it, `inject` installs it.
What this does not do: build or wrap modules (`inject.py`), or know what a config means.
"""
from __future__ import annotations

import re

from torch import nn

ATTR = "lorakit"            # model.__dict__[ATTR]: a plain attribute, not a submodule
INPUTS = "lorakit_inputs"   # where the input adapters are registered as a submodule
# Adapter names are ModuleDict keys (no dots), folder names and URL parts: one rule for all of them.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")


def check_name(name, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{what} {name!r}: use 1-128 letters, digits, '_' or '-' (no dots, no slashes)")
    return name


class UnknownAdapter(KeyError):
    """A name that no adapter has."""

    def __str__(self) -> str:          # KeyError would quote the message
        return str(self.args[0])


def unknown(names, known) -> UnknownAdapter:
    return UnknownAdapter(f"no adapter named {names!r} (this model has {sorted(known)})")


class AdapterState:
    def __init__(self):
        self.configs: dict = {}                  # name -> LoraConfig / PromptTuningConfig / PrefixTuningConfig
        self.targets: dict[str, list[str]] = {}  # name -> adapted module names (empty for input adapters)
        self.active: list[str] = []
        self.bypass = False                      # True inside `disabled()`: input adapters stay out
        self.inputs: nn.ModuleDict | None = None
        self.hooks: tuple = ()                   # decoder hook handles, while an input adapter exists

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def require(self, names) -> list[str]:
        """`names` (one or a list) as a list; raises UnknownAdapter for any this model lacks."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.configs]
        if missing:
            raise unknown(missing[0] if len(missing) == 1 else missing, self.configs)
        return names

    def check_new(self, name: str) -> str:
        """`name` follows the rule and no adapter of this model has it yet."""
        check_name(name)
        if name in self.configs:
            raise ValueError(f"adapter {name!r} is already in this model; delete_adapter() it first or pick another name")
        return name

    def add(self, name: str, config, targets: list[str]) -> None:
        self.check_new(name)
        self.configs[name] = config
        self.targets[name] = list(targets)

    def remove(self, name: str) -> None:
        self.require(name)
        del self.configs[name]
        self.targets.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def add_input(self, model: nn.Module, name: str, adapter: nn.Module) -> None:
        if self.inputs is None:
            self.inputs = nn.ModuleDict()
            setattr(model, INPUTS, self.inputs)
        self.inputs[name] = adapter

    def remove_input(self, model: nn.Module, name: str) -> None:
        del self.inputs[name]
        if not len(self.inputs):
            delattr(model, INPUTS)
            self.inputs = None
            for handle in self.hooks:
                handle.remove()
            self.hooks = ()


# How a model with adapters answers `save_pretrained` (what transformers' Trainer and TRL call): the IO
# layer registers it (`io/trainers.py`), inject installs it on the model, so neither imports the other.
_SAVERS: list = []


def register_saver(fn) -> None:
    _SAVERS[:] = [fn]


def save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    if not _SAVERS:
        raise RuntimeError("lorakit.io is not imported: nothing knows how to save this model's adapters")
    return _SAVERS[0](model, save_directory, *args, **kwargs)


def state(model: nn.Module) -> AdapterState:
    """The model's adapter state, created empty on first use."""
    found = model.__dict__.get(ATTR)
    if found is None:
        found = model.__dict__[ATTR] = AdapterState()
    return found


def has_adapters(model: nn.Module) -> bool:
    found = model.__dict__.get(ATTR)
    return bool(found is not None and found.configs)


def detach(model: nn.Module) -> None:
    """Forget the state, its input adapters and hooks (`merge_and_unload`: plain transformers again)."""
    found = model.__dict__.pop(ATTR, None)
    if found is not None:
        for handle in found.hooks:
            handle.remove()
        if found.inputs is not None:
            delattr(model, INPUTS)
