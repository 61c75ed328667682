"""A 4-bit base on disk: config.json with a bitsandbytes `quantization_config`, and model.safetensors.

The tensors are bitsandbytes' own (`Linear4bit`'s state dict), so a base written here loads into
transformers + bitsandbytes and the reverse. Written atomically; read through `read_tensors`
(safetensors only).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from torch import nn

from ..atomic import atomic_folder
from ..linear import replace_module
from ..models import model_class
from ..quant.linear4bit import Linear4bit
from ..quant.model import QUANT_CONFIG, quantized_layers
from .peft_format import read_tensors


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Write config.json (with a bitsandbytes `quantization_config`) and model.safetensors, atomically."""
    if not quantized_layers(model):
        raise ValueError("save_quantized: the model has no Linear4bit layers (call quantize first)")
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_quantized(folder: str | Path, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a quantized base written by `save_quantized` (or by transformers + bitsandbytes, nf4)."""
    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    qc = getattr(config, QUANT_CONFIG, None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or qc.get("bnb_4bit_quant_type") != "nf4" or not qc.get("load_in_4bit"):
        raise ValueError(f"{folder / 'config.json'}: no 4-bit nf4 quantization_config")
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(read_tensors(f))
    if not tensors:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    dtype = compute_dtype or getattr(torch, qc.get("bnb_4bit_compute_dtype", "float32"))
    cls = model_class(config)                            # a float skeleton; every weight is replaced below
    model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    quantized = sorted(k[:-len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8)
    if not quantized:
        raise ValueError(f"{folder}: no quantized weights (no uint8 '*.weight' tensors)")
    for name in quantized:
        replace_module(model, name, Linear4bit.shell(model.get_submodule(name), dtype))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{folder / 'model.safetensors'}: {e}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    problems = [k for k in missing if k not in tied]
    if problems or unexpected:
        raise ValueError(f"{folder}: weights do not fit the model: missing {problems[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model.eval()
    return model
