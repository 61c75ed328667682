"""Merge as a pure function on state dicts (torchtune's shape): base weights and an adapter folder
in, merged weights out. No module is built or changed; the in-place merge is `lorakit.merge`.

For every adapted module `t` with base weight W = base[f"{t}.weight"] (stored (d_out, d_in), or
(d_in, d_out) when the adapter's config sets peft's `fan_in_fan_out`, as GPT-2's Conv1D does):
    LoRA:  W' = W + s B A
    DoRA:  W' = g (W + s B A),  g = m / ||W + s B A||_c   (methods/dora.py's own factor)
computed in fp32 and stored back in W's dtype and layout; modules_to_save tensors replace the
base's. Everything is checked before anything is computed, and a non-finite result is refused.
"""
from __future__ import annotations

import torch

from ..merge import MergeError
from ..methods.dora import dora_factor
from ..methods.registry import MAGNITUDE
from .peft_format import AdapterFolder, AdapterFormatError


def merged_state_dict(base: dict[str, torch.Tensor], folder: AdapterFolder) -> dict[str, torch.Tensor]:
    """A new state dict: `base` with the adapter in `folder` (from `read_folder`) merged in."""
    cfg, found = folder.config, folder.tensors
    transposed = bool(folder.raw.get("fan_in_fan_out"))
    modules = sorted(k[: -len(".lora_A")] for k in found if k.endswith(".lora_A"))
    saved = [k for k in found if not k.endswith((".lora_A", ".lora_B", "." + MAGNITUDE))]
    missing = [f"{t}.weight" for t in modules if f"{t}.weight" not in base] + [k for k in saved if k not in base]
    if missing:
        raise AdapterFormatError(f"{folder.weights_path}: the base state dict has no {missing[:8]}")
    out = dict(base)
    for t in modules:
        w = base[f"{t}.weight"]
        w0 = (w.T if transposed else w).float()                                   # (d_out, d_in)
        A, B = found[f"{t}.lora_A"].float(), found[f"{t}.lora_B"].float()        # (r, d_in), (d_out, r)
        if A.shape[1] != w0.shape[1] or B.shape[0] != w0.shape[0] or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(f"{folder.weights_path}: {t}: lora_A {tuple(A.shape)} and lora_B "
                                     f"{tuple(B.shape)} do not fit the base weight (d_out, d_in) = {tuple(w0.shape)}")
        s = cfg.scale_for(t)
        merged = w0 + s * (B @ A)
        if cfg.use_dora:
            merged = dora_factor(w0, A, B, s, found[f"{t}.{MAGNITUDE}"].float()).unsqueeze(1) * merged
        if not torch.isfinite(merged).all():
            raise MergeError(f"merging {folder.config_path} would put non-finite values into {t}")
        out[f"{t}.weight"] = (merged.T if transposed else merged).to(w.dtype).contiguous()
    for key in saved:
        out[key] = found[key].to(base[key].dtype)
    return out
