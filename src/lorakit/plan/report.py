"""`lorakit plan`: the arithmetic of `memory.py` applied to a real model config, as tables or JSON.

`plan_model(ref, method_cfg, PlanConfig)` takes the method's own config (LoraConfig, ...) and the
run's quantities (`PlanConfig`, whose fields are also `lorakit plan`'s flags). The model is built
on the meta device (shapes, no weights) from its config, and the adapter is counted by injecting
into it with the same targeting code training uses, so the planned trainable count is the one
`trainable_report` will show on the real model. It never imports training: training calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .. import families
from ..config import LoraConfig, doc as _doc
from ..inject import inject, trainable_report
from ..linear import shape as linear_shape
from ..methods import registry
from ..methods.prefix import kv_layout
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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanConfig:
    """What the arithmetic needs to know of a run besides its method: flat, documented once; the
    `lorakit plan` flags come from here and training fills it from its own TrainConfig."""

    recipe: str = field(default="12-byte", metadata=_doc(
        "bytes per trainable parameter: 12-byte (fp16 weights and grads, fp32 Adam), 16-byte (+ fp32 master), fp32"))
    optimizer: str = field(default="adamw", metadata=_doc(
        "adamw (8 B/param of state) or adamw8bit (~2 B/param, blockwise 8-bit moments)"))
    dtype: str = field(default="bfloat16", metadata=_doc("storage of the frozen weights: float32, bfloat16, float16"))
    activation_dtype: str = field(default=None, metadata=_doc("storage of activations (default: --dtype)"))
    seq_len: int = field(default=512, metadata=_doc("tokens per row"))
    micro_batch: int = field(default=1, metadata=_doc("rows per forward"))
    grad_checkpointing: bool = field(default=False, metadata=_doc("recompute activations in backward"))
    grad_accum: int = field(default=1, metadata=_doc(
        "micro-batches per optimizer step (gradients then live through the forward)"))
    quantize: bool = field(default=False, metadata=_doc("QLoRA: the base's block linear layers in 4-bit NF4"))
    double_quant: bool = field(default=True, metadata=_doc("QLoRA constants double-quantized (else fp32 absmax per 64-block)"))
    world_size: int = field(default=1, metadata=_doc("ranks the run spreads over (data parallel, each its own micro-batch)"))
    shard: str = field(default="none", metadata=_doc(
        "what is split across the ranks: none (DDP), opt (ZeRO-1), grad-opt (ZeRO-2), full (ZeRO-3 / FSDP)"))

    def __post_init__(self):
        choices = {"recipe": sorted(mem.RECIPES), "optimizer": mem.OPTIMIZERS, "dtype": sorted(DTYPE_BYTES),
                   "activation_dtype": [None, *sorted(DTYPE_BYTES)], "shard": list(mem.SHARDING)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PlanConfig.{name} = {getattr(self, name)!r}: expected one of {list(allowed)}")
        for name in ("seq_len", "micro_batch", "grad_accum", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PlanConfig.{name} = {value!r}: expected an integer >= 1")

    @property
    def frozen_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def activation_bytes(self) -> int:
        return DTYPE_BYTES[self.activation_dtype or self.dtype]


def memory_method(method_cfg, run: PlanConfig) -> str:
    """The name `memory.model_states` uses: the registry's, or qlora for LoRA on a 4-bit base."""
    name = registry.of(method_cfg).name
    if run.quantize:
        if name not in ("lora", "dora"):
            raise ValueError(f"quantize needs LoRA on the frozen base, not method {name!r}")
        return "qlora"
    return name


def plan_model(ref: str, method_cfg=None, run: PlanConfig | None = None, config=None) -> dict:
    """The plan for model `ref` (or an already-loaded `config`, whose `architectures` names the class)
    trained with `method_cfg` (default: LoRA r=16, alpha=32, all-linear) under `run`."""
    method_cfg = LoraConfig() if method_cfg is None else method_cfg
    run = PlanConfig() if run is None else run
    method = memory_method(method_cfg, run)
    config = config if config is not None else load_config(ref)
    model = meta_model(config, ref)
    total = sum(p.numel() for p in model.parameters())
    lora = method_cfg if isinstance(method_cfg, LoraConfig) else LoraConfig()
    shapes, by_kind, quantized, targets_table = _lora_tables(model, lora)
    virtual = getattr(method_cfg, "num_virtual_tokens", 0)
    seq_len = run.seq_len
    if registry.of(method_cfg).family == "input":     # counted by injecting them, like LoRA
        inject(model, method_cfg)
        total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        seq_len += virtual if method == "prompt" else 0      # the virtual tokens run through every layer
    else:
        inject(model, lora)
    trainable = trainable_report(model).trainable if method != "full" else total
    dora_extra = sum(d_out for _, d_out in shapes.values())
    if method == "dora":
        trainable += dora_extra
    states = _model_states(model, method, run, total, trainable, quantized, dora_extra)
    _add_activations(states, config, method, run, seq_len)
    states.accumulate = run.grad_accum > 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if method == "full" and head is not None:       # written first in backward, while activations live
        states.head_gradient = head.weight.numel() * mem.RECIPES[run.recipe]["gradients"]
    per_rank = _per_rank(model, states, method, run, total, quantized)
    adapter_bytes = (trainable if method != "full" else 0) * 4   # lorakit writes adapters in fp32
    if method == "prefix":                                       # the file holds the prefix after the MLP
        layers_, kv_heads, head_dim = kv_layout(config)
        adapter_bytes = virtual * layers_ * 2 * kv_heads * head_dim * 4
    return {
        "model": str(ref), "architecture": type(model).__name__, "method": method, "recipe": run.recipe,
        "optimizer": run.optimizer, "r": lora.r, "alpha": lora.alpha, "targets": lora.targets,
        **({"virtual_tokens": virtual, "projection": getattr(method_cfg, "projection", 0)}
           if method in ("prompt", "prefix") else {}),
        "parameters": {"total": total, "trainable": trainable, "percent": 100 * trainable / total,  # of the base
                       "adapted_modules": len(shapes), "by_kind": by_kind, "dora_extra_magnitude": dora_extra},
        "memory": states.to_dict(),
        **per_rank,
        "adapter_file_bytes": adapter_bytes,
        "rank_table": mem.rank_table(targets_table["all-linear"] * 16 // lora.r if targets_table["all-linear"] else 0),
        "targets_table": targets_table,
    }


def fsdp_blocks(model) -> list:
    """The modules of the model's largest ModuleList: its decoder blocks."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []


def fsdp_units(model) -> list:
    """FSDP's units (lists of parameters) as torchtune wraps them: each decoder block, and the root
    (embeddings, final norm, head) as one more."""
    blocks = fsdp_blocks(model)
    inside = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in inside]
    return [list(b.parameters()) for b in blocks] + [root]


def _per_rank(model, states, method: str, run: PlanConfig, total: int, quantized: int) -> dict:
    """`memory_per_rank` (one of `world_size` ranks under `shard`), when the run is past one device."""
    if run.world_size == 1 and run.shard == "none":
        return {}
    rec = mem.RECIPES[run.recipe]
    nf4 = (mem.NF4_BITS + mem.QUANT_CONSTANT_BITS["double-quant" if run.double_quant else "absmax-fp32"]) / 8
    weight_bytes = rec["weights"] if method == "full" else nf4 if method == "qlora" else run.frozen_bytes
    sizes = []                      # (weight bytes, gradient bytes) of each unit; the root comes last
    for params in fsdp_units(model):      # the meta model carries an injected adapter: the trainable ones
        base = sum(p.numel() for p in params if not p.requires_grad)
        adapter = sum(p.numel() for p in params if p.requires_grad)
        if method == "full":                # every base weight trains; the adapter is not there
            sizes.append((base * rec["weights"], base * rec["gradients"]))
        else:
            sizes.append((base * weight_bytes + adapter * rec["weights"], adapter * rec["gradients"]))
    (root, root_grad), blocks = sizes[-1], sizes[:-1] or [(0, 0)]
    plan = mem.shard(states, run.world_size, run.shard, max(w for w, _ in blocks), max(g for _, g in blocks),
                     root, root_grad)
    return {"world_size": run.world_size, "shard": run.shard, "memory_per_rank": plan.to_dict()}


def _lora_tables(model, cfg: LoraConfig):
    """Read before injection changes the modules: the adapted shapes, per-kind counts, what QLoRA
    quantizes (every linear layer in the blocks, never the head) and the qv vs all-linear table."""
    adapted = resolve(model, cfg.targets, cfg.exclude)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in adapted}
    by_kind: dict[str, dict] = {}
    for n, (d_in, d_out) in shapes.items():
        row = by_kind.setdefault(kind(n), {"modules": 0, "d_in": d_in, "d_out": d_out, "lora_params_per_module":
                                           mem.lora_params(d_in, d_out, cfg.rank_for(n)), "params": 0})
        row["modules"] += 1
        row["params"] += mem.lora_params(d_in, d_out, cfg.rank_for(n))
    block_linear = [linear_shape(model.get_submodule(n)) for n in resolve(model, "all-linear")]
    quantized = sum(d_in * d_out for d_in, d_out in block_linear)
    table = {"all-linear": sum(mem.lora_params(d_in, d_out, cfg.r) for d_in, d_out in block_linear)}
    try:
        table["qv"] = sum(mem.lora_params(*linear_shape(model.get_submodule(n)), cfg.r) for n in resolve(model, "qv"))
    except TargetError:   # a family without a qv preset
        table["qv"] = None
    if table["qv"] and table["all-linear"]:
        table["all_linear_vs_qv"] = table["all-linear"] / table["qv"]
    return shapes, by_kind, quantized, table


def _model_states(model, method: str, run: PlanConfig, total: int, trainable: int, quantized: int, dora_extra: int):
    states = mem.model_states(total, trainable, method, run.recipe, run.frozen_bytes,
                              quantized if method == "qlora" else 0, run.double_quant)
    if run.optimizer == "adamw8bit":         # per tensor: small ones keep fp32 moments
        numels = [p.numel() for p in (model.parameters() if method == "full" else
                                      (p for p in model.parameters() if p.requires_grad))]
        nbytes, formula = mem.adamw8bit_bytes(numels)
        if method == "dora":
            nbytes, formula = nbytes + 8 * dora_extra, formula + f" + {dora_extra:,} DoRA magnitudes x 8 B"
        states.replace("optimizer" if method == "full" else "adapter optimizer", nbytes, "8-bit AdamW: " + formula)
    return states


def _add_activations(states, config, method: str, run: PlanConfig, seq_len: int) -> None:
    """Saved activations, for the families whose layer census is known (families.ACTIVATION_CENSUS)."""
    if not families.activation_census(config):
        return
    hidden, layers, heads, inter = _needed(config, "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    tokens, nbytes, ckpt = seq_len * run.micro_batch, run.activation_bytes, run.grad_checkpointing
    full = method == "full"
    census = f"({9 if full else 7}h + 4kv + 4i)"
    per_layer = mem.activation_bytes_per_layer(tokens, hidden, kv_dim, inter, nbytes, ckpt, full)
    total_act = per_layer * layers
    formula = f"{layers} layers x {tokens} tokens x {'h' if ckpt else census} x {nbytes} B"
    if ckpt:   # backward recomputes one layer at a time, holding that layer's full set
        total_act += mem.activation_bytes_per_layer(tokens, hidden, kv_dim, inter, nbytes, False, full)
        formula += f" + one recomputed layer: {tokens} tokens x {census} x {nbytes} B"
    states.add("activations", total_act, formula, "activations")


def plan_params(count: int, recipe: str = "12-byte", double_quant: bool = True, world_size: int = 1,
                shard: str = "none") -> dict:
    """The seed's headline tables for a model known only by its parameter count; per rank too when
    the run spreads over `world_size` ranks (no layer sizes here, so no all-gather buffers)."""
    out = {"params": count}
    if world_size > 1 or shard != "none":
        out["per_rank"] = {"world_size": world_size, "shard": shard, **{
            f"full_{name}_gb": mem.shard(mem.model_states(count, 0, "full", name), world_size, shard).total / mem.GB
            for name in mem.RECIPES},
            "lora_fp16_floor_gb": mem.shard(mem.model_states(count, 0, "lora", recipe, 2), world_size, shard).total
            / mem.GB,
            "nf4_with_constants_gb": mem.shard(mem.model_states(count, 0, "qlora", recipe, 2, count, double_quant),
                                               world_size, shard).total / mem.GB}
    for name in mem.RECIPES:
        out[f"full_{name}_gb"] = mem.model_states(count, 0, "full", name).total / mem.GB
    out["lora_fp16_floor_gb"] = count * 2 / mem.GB
    out["nf4_payload_gb"] = count * mem.NF4_BITS / 8 / mem.GB
    c = mem.QUANT_CONSTANT_BITS["double-quant" if double_quant else "absmax-fp32"]
    out["nf4_with_constants_gb"] = count * (mem.NF4_BITS + c) / 8 / mem.GB
    out["quant_constant_bits"] = c
    return out
