"""`lorakit plan`: the arithmetic of `memory.py` applied to a real model config, as tables or JSON.

The model is built on the meta device (shapes, no weights) from its config, and the adapter is
counted by injecting into it with the same targeting code training uses, so the planned trainable
count is the one `trainable_report` will show on the real model.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ..config import LoraConfig
from ..inject import inject, trainable_report
from ..linear import shape as linear_shape
from ..models import EMBEDDED, TINY_FAMILIES, model_class, resolve_folder, tiny_config
from ..targets import TargetError, kind, resolve
from . import memory as mem

TINY_CLASSES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2LMHeadModel"}


def load_config(ref: str):
    ref = str(ref)
    if ref.startswith("tiny-") and ref[5:] in TINY_FAMILIES:
        config = tiny_config(ref[5:])
        config.architectures = [TINY_CLASSES.get(ref[5:], type(config).__name__.replace("Config", "ForCausalLM"))]
        return config
    path = Path(ref)
    if path.suffix == ".gguf" and ref.lower() != EMBEDDED:   # read the metadata only, no conversion
        return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    folder = resolve_folder(ref)
    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{folder / 'config.json'}: not a usable model config ({e})") from None


def meta_model(config, ref: str = ""):
    try:
        with torch.device("meta"):
            return model_class(config)(config)
    except Exception as e:  # transformers raises many types for configs it cannot build
        raise ValueError(f"cannot derive layer shapes from the config of {ref!r}: {e}") from None


def _needed(config, *names):
    missing = [n for n in names if getattr(config, n, None) is None]
    if missing:
        raise ValueError(f"the model config lacks {missing}, which the activation estimate needs")
    return [getattr(config, n) for n in names]


def plan_model(ref: str, r: int = 16, alpha: float = 32, targets="all-linear", method: str = "lora",
               recipe: str = "12-byte", frozen_bytes: float = 2, seq_len: int = 512, micro_batch: int = 1,
               grad_checkpointing: bool = False, activation_bytes: int = 2, double_quant: bool = True,
               config=None, grad_accum: int = 1, optimizer: str = "adamw", virtual_tokens: int = 20,
               projection: int = 0) -> dict:
    """The plan for model `ref` (or for an already-loaded `config`, whose `architectures` names the class)."""
    if method not in mem.METHODS:
        raise ValueError(f"--method {method!r}: expected one of {mem.METHODS}")
    if optimizer not in mem.OPTIMIZERS:
        raise ValueError(f"--optimizer {optimizer!r}: expected one of {mem.OPTIMIZERS}")
    config = config if config is not None else load_config(ref)
    model = meta_model(config, ref)
    total = sum(p.numel() for p in model.parameters())
    cfg = LoraConfig(r=r, alpha=alpha, targets=targets)        # validates r, alpha, targets
    adapted = resolve(model, cfg.targets, cfg.exclude)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in adapted}
    by_kind: dict[str, dict] = {}
    for n, (d_in, d_out) in shapes.items():
        row = by_kind.setdefault(kind(n), {"modules": 0, "d_in": d_in, "d_out": d_out, "lora_params_per_module":
                                           mem.lora_params(d_in, d_out, cfg.rank_for(n)), "params": 0})
        row["modules"] += 1
        row["params"] += mem.lora_params(d_in, d_out, cfg.rank_for(n))
    # what QLoRA quantizes (every linear layer in the blocks, never the head) and the targets table,
    # read before injection changes the modules
    block_linear = resolve(model, "all-linear")
    quantized = sum(d_in * d_out for d_in, d_out in (linear_shape(model.get_submodule(n)) for n in block_linear))
    targets_table = {"all-linear": sum(mem.lora_params(*linear_shape(model.get_submodule(n)), r) for n in block_linear)}
    try:
        targets_table["qv"] = sum(mem.lora_params(*linear_shape(model.get_submodule(n)), r) for n in resolve(model, "qv"))
    except TargetError:   # a family without a qv preset
        targets_table["qv"] = None
    if targets_table["qv"] and targets_table["all-linear"]:
        targets_table["all_linear_vs_qv"] = targets_table["all-linear"] / targets_table["qv"]
    if method in ("prompt", "prefix"):       # input adapters: counted by injecting them, like LoRA
        from ..config import PrefixTuningConfig, PromptTuningConfig
        model = meta_model(config, ref)
        inject(model, PromptTuningConfig(num_virtual_tokens=virtual_tokens) if method == "prompt" else
               PrefixTuningConfig(num_virtual_tokens=virtual_tokens, projection=projection))
        total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        seq_len += virtual_tokens if method == "prompt" else 0      # the virtual tokens run through every layer
    else:
        inject(model, cfg)
    trainable = trainable_report(model).trainable if method != "full" else total
    dora_extra = sum(d_out for _, d_out in shapes.values())
    if method == "dora":
        trainable += dora_extra
    states = mem.model_states(total, trainable, method, recipe, frozen_bytes, quantized if method == "qlora" else 0,
                              double_quant)
    if optimizer == "adamw8bit":         # per tensor: small ones keep fp32 moments
        numels = [p.numel() for p in (model.parameters() if method == "full" else
                                      (p for p in model.parameters() if p.requires_grad))]
        nbytes, formula = mem.adamw8bit_bytes(numels)
        if method == "dora":
            nbytes, formula = nbytes + 8 * dora_extra, formula + f" + {dora_extra:,} DoRA magnitudes x 8 B"
        states.replace("optimizer" if method == "full" else "adapter optimizer", nbytes, "8-bit AdamW: " + formula)
    activations = None
    if getattr(config, "model_type", None) in ("llama", "mistral", "qwen2", "qwen3"):
        hidden, layers, heads, inter = _needed(config, "hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        tokens = seq_len * micro_batch
        full = method == "full"
        census = f"({9 if full else 7}h + 4kv + 4i)"
        per_layer = mem.activation_bytes_per_layer(tokens, hidden, kv_dim, inter, activation_bytes, grad_checkpointing, full)
        total_act = per_layer * layers
        formula = f"{layers} layers x {tokens} tokens x {'h' if grad_checkpointing else census} x {activation_bytes} B"
        if grad_checkpointing:   # backward recomputes one layer at a time, holding that layer's full set
            total_act += mem.activation_bytes_per_layer(tokens, hidden, kv_dim, inter, activation_bytes, False, full)
            formula += f" + one recomputed layer: {tokens} tokens x {census} x {activation_bytes} B"
        activations = {"per_layer_bytes": per_layer, "layers": layers, "bytes": total_act, "formula": formula}
        states.add("activations", activations["bytes"], activations["formula"], "activations")
    states.accumulate = grad_accum > 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if method == "full" and head is not None:       # written first in backward, while activations live
        states.head_gradient = head.weight.numel() * mem.RECIPES[recipe]["gradients"]
    adapter_bytes = (trainable if method != "full" else 0) * 4   # lorakit writes adapters in fp32
    if method == "prefix":                                       # the file holds the prefix after the MLP
        from ..methods.prefix import kv_layout
        layers_, kv_heads, head_dim = kv_layout(config)
        adapter_bytes = virtual_tokens * layers_ * 2 * kv_heads * head_dim * 4
    return {
        "model": str(ref), "architecture": type(model).__name__, "method": method, "recipe": recipe,
        "optimizer": optimizer,
        "r": r, "alpha": alpha, "targets": targets,
        **({"virtual_tokens": virtual_tokens, "projection": projection} if method in ("prompt", "prefix") else {}),
        "parameters": {"total": total, "trainable": trainable, "percent": 100 * trainable / total,  # of the base
                       "adapted_modules": len(adapted), "by_kind": by_kind,
                       "dora_extra_magnitude": dora_extra},
        "memory": states.to_dict(),
        "adapter_file_bytes": adapter_bytes,
        "rank_table": mem.rank_table(targets_table["all-linear"] * 16 // r if targets_table["all-linear"] else 0),
        "targets_table": targets_table,
    }


def plan_params(count: int, recipe: str = "12-byte", double_quant: bool = True) -> dict:
    """The seed's headline tables for a model known only by its parameter count."""
    out = {"params": count}
    for name in mem.RECIPES:
        out[f"full_{name}_gb"] = mem.model_states(count, 0, "full", name).total / mem.GB
    out["lora_fp16_floor_gb"] = count * 2 / mem.GB
    out["nf4_payload_gb"] = count * mem.NF4_BITS / 8 / mem.GB
    c = mem.QUANT_CONSTANT_BITS["double-quant" if double_quant else "absmax-fp32"]
    out["nf4_with_constants_gb"] = count * (mem.NF4_BITS + c) / 8 / mem.GB
    out["quant_constant_bits"] = c
    return out
