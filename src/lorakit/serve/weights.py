"""An adapter as the server holds it in RAM: per layer A, B, scale and (DoRA) the factor g.

`read_adapter` checks a folder with lorakit's own loader (`check_adapter`: every check and message
of `load_adapter`, no injection) against the served model itself: its slot layers count as the
linear layers they wrap, so target rules resolve exactly as in training, and nothing of the
served model changes. The DoRA factor g = m / ||W0 + s B A||_c (DoRA's own `dora_factor`) is
computed here, once, on the loading thread; a slot write is then a plain copy.
What this does not do: prompt/prefix adapters or modules_to_save (they are not per-row weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..inject import adapter_layers
from ..io.peft_format import AdapterFormatError, check_adapter, read_config
from ..linear import dense_weight
from ..methods.dora import dora_factor
from ..methods.registry import MAGNITUDE
from ..state import state


@dataclass
class LayerWeights:
    A: torch.Tensor                 # (r, d_in)
    B: torch.Tensor                 # (d_out, r)
    scale: float
    g: torch.Tensor | None = None   # (d_out,) DoRA factor; None for LoRA

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.A, self.B, self.g) if t is not None)


@dataclass
class AdapterWeights:
    name: str
    layers: dict[str, LayerWeights]          # module name -> weights
    source: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.layers.values())

    @property
    def rank(self) -> int:
        return max(w.A.shape[0] for w in self.layers.values())

    @property
    def dora(self) -> bool:
        return any(w.g is not None for w in self.layers.values())


def weights_from_model(model: nn.Module, name: str, dtype: torch.dtype | None = None) -> AdapterWeights:
    """Adapter `name` of a lorakit model (injected or loaded) as CPU tensors, g computed for DoRA."""
    state(model).require(name)
    layers = {}
    for lname, layer in adapter_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            continue
        if not hasattr(adapter, "A"):
            raise ValueError(f"adapter {name!r} adapts raw parameters of {lname} (target_parameters), which cannot "
                             "be served per row yet; merge it and serve the merged model")
        dt = dtype or adapter.A.dtype
        A = adapter.A.detach().to("cpu", dt).clone()
        B = adapter.B.detach().to("cpu", dt).clone()
        g = None
        if hasattr(adapter, "m"):                                   # DoRA's magnitude
            w0 = layer.unmerged_base_weight().to("cpu")
            g = dora_factor(w0, adapter.A.detach().cpu().float(), adapter.B.detach().cpu().float(),
                            adapter.scale, adapter.m.detach().cpu()).to(dt)
        layers[lname] = LayerWeights(A, B, float(adapter.scale), g)
    if not layers:
        raise ValueError(f"adapter {name!r} has no weight layers (prompt/prefix adapters cannot be served per row)")
    return AdapterWeights(name, layers)


def read_adapter(folder: str | Path, model: nn.Module, served: dict[str, tuple[int, int]], r_max: int,
                 name: str = "adapter") -> AdapterWeights:
    """Load a PEFT folder for serving: lorakit's loader on the served `model`, then the serving limits.

    `served`: module name -> (d_in, d_out) of the layers that have slots. Raises AdapterFormatError
    (or FileNotFoundError) with the folder's problem; the caller adds the adapter's name.
    """
    cfg, targets, found, config_path = check_served(folder, model, served, r_max)
    layers = {}
    for t in targets:
        A, B = found[f"{t}.lora_A"].float(), found[f"{t}.lora_B"].float()     # (r, d_in), (d_out, r)
        scale, g = cfg.scale_for(t), None
        if cfg.use_dora:
            w0 = dense_weight(model.get_submodule(t).base_layer).detach().float()
            g = dora_factor(w0, A, B, scale, found[f"{t}.{MAGNITUDE}"].float())
        layers[t] = LayerWeights(A, B, scale, g)
    weights = AdapterWeights(name, layers, Path(folder))
    everything = [t.flatten() for w in weights.layers.values() for t in (w.A, w.B, w.g) if t is not None]
    if not bool(torch.isfinite(torch.cat(everything)).all()):             # one pass; find the culprits only if needed
        bad = [m for m, w in weights.layers.items()
               if not all(torch.isfinite(t).all() for t in (w.A, w.B, w.g) if t is not None)]
        raise AdapterFormatError(f"{config_path}: non-finite values in the weights of {sorted(bad)[:8]}")
    return weights


def check_served(folder: str | Path, model: nn.Module, served: dict[str, tuple[int, int]], r_max: int,
                 lazy: bool = False):
    """Every check of `read_adapter` that needs no weight values: method, targets, names, shapes, the
    serving limits. `lazy`: read only the file's header (start-up checks a thousand folders this way).
    Returns (config, targets, tensors, config path)."""
    raw, config_path = read_config(folder)
    if raw.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{config_path}: peft_type {raw.get('peft_type')!r} cannot be served per row "
                                 "(the server batches LoRA and DoRA adapters)")
    if raw.get("target_parameters"):
        raise AdapterFormatError(f"{config_path}: target_parameters {raw['target_parameters']} (LoRA on MoE expert "
                                 "stacks or routers) cannot be served per row yet; merge it (lorakit merge) and "
                                 "serve the merged model")
    if raw.get("modules_to_save"):
        raise AdapterFormatError(f"{config_path}: modules_to_save {raw['modules_to_save']} cannot be served per row "
                                 "(they are whole copies of a module, not low-rank updates)")
    cfg, targets, _, found = check_adapter(model, folder, lazy)   # no injection: no modules built, no init
    outside = [m for m in targets if m not in served]
    if outside:
        raise AdapterFormatError(f"{config_path}: targets modules this server has no slots for: "
                                 f"{sorted(outside)[:8]} (served: {_kinds(served)})")
    ranks = {t: found[f"{t}.lora_A"].shape[0] for t in targets}
    if max(ranks.values(), default=0) > r_max:
        raise AdapterFormatError(f"{config_path}: rank {max(ranks.values())} is above the server's r_max = {r_max}")
    return cfg, targets, found, config_path


def _kinds(served) -> str:
    kinds = sorted({m.rsplit(".", 1)[-1] for m in served})
    return ", ".join(kinds)
