"""Modules trained in full beside an adapter (e.g. a fresh classification head).

Each adapter name gets its own trainable copy; the original stays frozen and is what runs when
adapters are disabled or when the active adapter has no copy.
"""
from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add(self, name: str) -> nn.Module:
        self.copies[name] = copy.deepcopy(self.original)
        return self.copies[name]

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, attr: str):
        # transformers reads attributes of heads (e.g. `lm_head.weight` when tying); answer with
        # the module currently in use so the wrapper is transparent.
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr in ("original", "copies"):
                raise
            return getattr(self.current(), attr)
