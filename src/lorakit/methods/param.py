"""LoRA on raw parameters: fused MoE expert stacks (3-D) and routers (2-D), peft's `target_parameters`.

Semantics are peft's `ParamWrapper` (peft 0.21), so files move both ways. A targeted parameter W
of a module is used as W + delta in that module's forward; nothing else of the module changes:
- 2-D W (out, in), a router's `weight`: delta = s B A, A (r, in), B (out, r), as for a linear layer.
- 3-D W (E, out, in), an expert stack (transformers stores experts this way unless the module says
  `is_transposed`, then (E, in, out)): one low-rank pair per expert, stored as peft stores them,
  A (r*E, in) with rows expert-major, B (out, r*E) with columns expert-minor:
      A_e = A.reshape(E, r, in)[e],  B_e = B.reshape(out, r, E)[..., e],  delta_e = s B_e A_e.
`ParamLayer` wraps the module that owns the parameters and runs it through `functional_call` with
the adapted tensors, so the module's own forward (routing, gathering experts) is untouched.
What this does not do: dropout or DoRA on parameters (peft refuses both too).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .base import adapter_dtype


class ParamLora(nn.Module):
    def __init__(self, shape: tuple, r: int, scale: float, transposed: bool = False, init: str = "default",
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.ndim = len(shape)
        if len(shape) == 3:
            self.experts, d1, d2 = shape
            self.stored_out_in = not transposed                   # (E, out, in)
            self.d_in, self.d_out = (d2, d1) if self.stored_out_in else (d1, d2)
        elif len(shape) == 2:
            self.experts, self.stored_out_in = 1, True
            self.d_out, self.d_in = shape
        else:
            raise ValueError(f"LoRA on a {len(shape)}-D parameter: only 2-D and 3-D (expert stacks) are supported")
        self.r, self.scale = r, scale
        self.A = nn.Parameter(torch.empty(r * self.experts, self.d_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.d_out, r * self.experts, dtype=dtype, device=device))
        if init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @classmethod
    def of(cls, module: nn.Module, param: str, config, key: str) -> "ParamLora":
        """The adapter for `module.param` under a LoraConfig (`key`: the name rank/alpha patterns match)."""
        w = getattr(module, param)
        return cls(tuple(w.shape), config.rank_for(key), config.scale_for(key),
                   bool(getattr(module, "is_transposed", False)), config.init, adapter_dtype(w), w.device)

    def delta(self) -> torch.Tensor:
        """The update, in the parameter's own shape."""
        if self.ndim == 2:
            return self.scale * (self.B @ self.A)                                    # (out, in)
        A = self.A.reshape(self.experts, -1, self.d_in)                               # (E, r, in)
        B = self.B.reshape(self.d_out, -1, self.experts)                              # (out, r, E)
        layout = "e o i" if self.stored_out_in else "e i o"
        return torch.einsum(f"o r e, e r i -> {layout}", B, A) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.experts}, d_in={self.d_in}, d_out={self.d_out}, scale={self.scale:g}"


class ParamLayer(nn.Module):
    """A module whose parameters carry named adapters: adapters[name][param] is a ParamLora."""

    fan_in_fan_out = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()          # adapter name -> ModuleDict(param name -> ParamLora)
        self.active: list[str] = []
        self.merged: list[str] = []

    def params(self) -> list[str]:
        """The targeted parameter names, in the module's registration order (peft nests them so)."""
        names = {p for a in self.adapters.values() for p in a}
        return [p for p, _ in self.base_layer.named_parameters(recurse=False) if p in names]

    def forward(self, *args, **kwargs):
        live = [n for n in self.active if n in self.adapters and n not in self.merged]
        if not live:
            return self.base_layer(*args, **kwargs)
        weights = {}
        for p in self.params():
            w = getattr(self.base_layer, p)
            deltas = [self.adapters[n][p].delta() for n in live if p in self.adapters[n]]
            weights[p] = w + sum(deltas).to(w.dtype) if deltas else w
        return functional_call(self.base_layer, weights, args, kwargs)

    # -- merge (the same bookkeeping as AdapterLayer) ------------------------------------
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """Every targeted parameter with `names` merged, flattened into one tensor (for the finite check)."""
        with torch.no_grad():
            out = []
            for p in self.params():
                w = getattr(self.base_layer, p).detach().float()
                out.append((w + sum(self.adapters[n][p].delta().float() for n in names if p in self.adapters[n])).flatten())
            return torch.cat(out)

    def merge(self, names: list[str]) -> None:
        todo = [n for n in names if n not in self.merged and n in self.adapters]
        self._shift(todo, +1)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        self._shift(list(reversed(self.merged)), -1)
        self.merged.clear()

    def _shift(self, names: list[str], sign: int) -> None:
        """W <- W + sign * delta for each adapter in `names`, computed in fp32."""
        with torch.no_grad():
            for n in names:
                for p, lora in self.adapters[n].items():
                    w = getattr(self.base_layer, p)
                    w.data.copy_(w.float() + sign * lora.delta().float())

    def extra_repr(self) -> str:
        return f"params={self.params()}, active={self.active}, merged={self.merged}"


def lora_shapes(shape: tuple, r: int, transposed: bool = False) -> tuple[tuple, tuple]:
    """The (A, B) shapes peft stores for a parameter of `shape` at rank r (see ParamLora)."""
    if len(shape) == 2:
        return (r, shape[1]), (shape[0], r)
    e, d1, d2 = shape
    d_in, d_out = (d1, d2) if transposed else (d2, d1)
    return (r * e, d_in), (d_out, r * e)


def find_parameters(model: nn.Module, keys: list[str]) -> dict[str, list[str]]:
    """peft's matching for target_parameters: `module.param` equal to a key or ending with `.key`.
    Returns {owning module name: [param names, registration order]}; wrapped modules by their own name."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamLayer):
            continue
        owner = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        if owner != name and not isinstance(model.get_submodule(owner), ParamLayer):
            continue                                     # a base_layer of something else (an AdapterLayer)
        for p, _ in module.named_parameters(recurse=False):
            key = f"{owner}.{p}"
            if any(key == k or key.endswith("." + k) for k in keys):
                out.setdefault(owner, []).append(p)
    return out


def peft_path(owner: str, params: list[str], param: str) -> str:
    """The module path peft writes for `param`'s tensors: the first-registered parameter is the
    innermost ParamWrapper, one `.base_layer` per wrapper around it."""
    depth = len(params) - 1 - params.index(param)
    return owner + ".base_layer" * depth
