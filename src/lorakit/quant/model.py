"""Whole-model QLoRA plumbing: quantize a model's linear layers, save and load it, re-quantize a merge.

`quantize` swaps the targeted linear layers (by default every linear layer inside the decoder
blocks: never the output head, never embeddings) for `Linear4bit`. Everything else (embeddings,
norms, the head) stays as it was; `prepare_for_training` then freezes all of it, keeps norms in
fp32 and makes the embeddings' output require grad so gradient checkpointing works on a frozen
base. Inject LoRA afterwards, as on any base. Saving and loading a quantized base is `io/quantized.py`.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..linear import replace_module
from ..state import has_adapters, state
from ..targets import resolve
from .linear4bit import Linear4bit

QUANT_CONFIG = "quantization_config"


def quantize(model: nn.Module, targets="all-linear", blocksize: int = 64, double_quant: bool = True,
             compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace the `targets` linear layers of `model` by NF4 `Linear4bit`s in place; returns their names."""
    if has_adapters(model):
        raise ValueError("quantize the base before injecting adapters (this model already has "
                         f"{sorted(state(model).names)})")
    names = [n for n in resolve(model, targets) if not isinstance(model.get_submodule(n), Linear4bit)]
    for name in names:
        layer = model.get_submodule(name)
        replace_module(model, name, Linear4bit.from_linear(layer, blocksize, double_quant, compute_dtype, name=name))
    model.config.__dict__[QUANT_CONFIG] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": str(compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_blocksize": blocksize,
        "llm_int8_skip_modules": None, "lorakit_quantized_modules": names}
    return names


def quantized_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def weight_bytes(model: nn.Module) -> dict:
    """Bytes held for the quantized layers' weights vs what they took in fp32."""
    layers = quantized_layers(model)
    held = sum(m.nbytes() for _, m in layers)
    fp32 = sum(m.in_features * m.out_features * 4 for _, m in layers)
    return {"layers": len(layers), "nf4_bytes": held, "fp32_bytes": fp32, "ratio": held / fp32 if fp32 else None}


def prepare_for_training(model: nn.Module) -> nn.Module:
    """QLoRA's base preparation: freeze everything, norms (and other small float params) in fp32,
    input embeddings' output requiring grad (needed by gradient checkpointing over a frozen base).
    Float weights that remain are copied out of the checkpoint file's memory map, so that after
    `lorakit.training.memory.trim_heap()` the process holds the 4-bit model, not the float one."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and p.dim() == 1:     # norms and biases
            p.data = p.data.float()
        else:          # own the memory: a weight still backed by the loaded file keeps all its pages resident
            p.data = p.data.clone()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


@torch.no_grad()
def requantize(model: nn.Module, probe: dict[str, torch.Tensor], blocksize: int = 64,
               double_quant: bool = True) -> dict:
    """Re-quantize a merged float model's formerly-4-bit layers to NF4, and say what it cost.

    Measures the logits on `probe` before and after and warns with the max and mean absolute change:
    re-quantizing a merged weight rounds the adapter's update into the NF4 grid, which is lossy.
    """
    names = (model.config.__dict__.get(QUANT_CONFIG) or {}).get("lorakit_quantized_modules")
    if not names:
        raise ValueError("requantize: the model records no formerly quantized modules (was it quantized?)")
    before = model(**probe).logits.float()
    model.config.__dict__.pop(QUANT_CONFIG)
    quantize(model, names, blocksize, double_quant)
    after = model(**probe).logits.float()
    change = {"max_abs_logit_change": (after - before).abs().max().item(),
              "mean_abs_logit_change": (after - before).abs().mean().item()}
    warnings.warn(f"re-quantized {len(names)} merged layers to NF4: logits on the probe batch changed by "
                  f"max {change['max_abs_logit_change']:.4g}, mean {change['mean_abs_logit_change']:.4g} "
                  "(the merge is no longer exact)", stacklevel=2)
    return change

