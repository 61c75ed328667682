"""Parameter and memory arithmetic for a fine-tuning plan, in closed form.

Model states follow the seed's recipes: full fine-tuning keeps fp16 weights and gradients and
two fp32 Adam moments per parameter (12 bytes), plus an fp32 master copy in the 16-byte recipe.
LoRA keeps the frozen base at its storage precision (the "floor") and pays the recipe only on
adapter parameters. QLoRA stores quantized layers as NF4: 4 bits per weight plus quantization
constants, 0.5 bit/param for an fp32 absmax per 64-block, or 8/64 + 32/(64*256) = 0.127 bit/param
with double quantization (Dettmers et al., 2023, arXiv:2305.14314, sec. 3).

Memory units: GB = 1e9 bytes, as the seed's tables use. Nothing here touches real weights: shapes
come from instantiating the model on the meta device, and the adapter count from injecting into it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

RECIPES = {  # bytes per trainable parameter: weights + gradients + Adam moments (+ master copy)
    "12-byte": {"weights": 2, "gradients": 2, "optimizer": 8, "master": 0},
    "16-byte": {"weights": 2, "gradients": 2, "optimizer": 8, "master": 4},
    # what lorakit's own trainer keeps for adapters: fp32 weights, fp32 gradients, fp32 Adam moments
    "fp32": {"weights": 4, "gradients": 4, "optimizer": 8, "master": 0},
}
NF4_BITS = 4
QUANT_CONSTANT_BITS = {"absmax-fp32": 32 / 64, "double-quant": 8 / 64 + 32 / (64 * 256)}
METHODS = ("full", "lora", "dora", "qlora", "prompt", "prefix")
GB = 1e9


def parse_count(text: str) -> int:
    """'70B' -> 70e9, '135M' -> 135e6, '4096' -> 4096."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--params {text!r}: expected a number with an optional K, M, B or T suffix (e.g. 70B)")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
    return int(round(float(m.group(1)) * scale))


def lora_params(d_in: int, d_out: int, r: int) -> int:
    """A (r x d_in) + B (d_out x r)."""
    return r * (d_in + d_out)


@dataclass
class MemoryPlan:
    """Bytes by component, each with the formula that produced it, and the peak they add up to.

    Not everything is alive at once. Weights and optimizer state are (`state` lines). Gradients
    and activations overlap only in part: backward frees each layer's activations as it writes that
    layer's gradients, starting at the output head, whose gradient is written while every
    activation is still alive. So one micro-batch peaks at max(gradients, activations + head
    gradient); with gradient accumulation the gradients of earlier micro-batches live through the
    next forward, and the peak is gradients + activations. `sum_bytes` is everything at once.
    """

    lines: list = field(default_factory=list)   # (component, bytes, formula, kind)
    accumulate: bool = False                    # gradient accumulation over several micro-batches
    head_gradient: float = 0                    # bytes of the output head's gradient, if it trains

    def add(self, component: str, nbytes: float, formula: str, kind: str = "state") -> None:
        assert kind in ("state", "gradients", "activations"), kind
        self.lines.append((component, nbytes, formula, kind))

    def replace(self, component: str, nbytes: float, formula: str) -> None:
        self.lines = [(c, nbytes, formula, k) if c == component else (c, b, f, k) for c, b, f, k in self.lines]

    def _sum(self, kind: str) -> float:
        return sum(b for _, b, _, k in self.lines if k == kind)

    @property
    def total(self) -> float:
        grads, acts = self._sum("gradients"), self._sum("activations")
        if self.accumulate:
            return self._sum("state") + grads + acts
        return self._sum("state") + max(grads, acts + self.head_gradient if acts else 0)

    @property
    def rule(self) -> str:
        if not self._sum("activations"):
            return "weights + gradients + optimizer state (+ master copy)"
        if self.accumulate:
            return "states + gradients + activations (gradient accumulation keeps gradients through the forward)"
        head = " + head gradient" if self.head_gradient else ""
        return f"states + max(gradients, activations{head}): backward frees activations as it writes gradients"

    def to_dict(self) -> dict:
        sum_bytes = sum(b for _, b, _, _ in self.lines)
        return {"components": [{"component": c, "bytes": b, "gb": b / GB, "formula": f, "kind": k}
                               for c, b, f, k in self.lines],
                "total_bytes": self.total, "total_gb": self.total / GB, "peak_rule": self.rule,
                "head_gradient_bytes": self.head_gradient, "sum_bytes": sum_bytes}


def model_states(total: int, trainable: int, method: str, recipe: str = "12-byte", frozen_bytes: float = 2,
                 quantized: int = 0, double_quant: bool = True) -> MemoryPlan:
    """Weights, gradients, optimizer state and master copy for `method` under `recipe`.

    total: all parameters of the base; trainable: adapter parameters (ignored for full);
    quantized: how many base parameters QLoRA stores in NF4 (the rest stay at `frozen_bytes`).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    rec, plan = RECIPES[recipe], MemoryPlan()
    if method == "full":
        for part in ("weights", "gradients", "optimizer", "master"):
            if rec[part]:
                plan.add(part, total * rec[part], f"{total:,} params x {rec[part]} B", _kind(part))
        return plan
    if method == "qlora":
        c = QUANT_CONSTANT_BITS["double-quant" if double_quant else "absmax-fp32"]
        plan.add("frozen weights (NF4 payload)", quantized * NF4_BITS / 8, f"{quantized:,} params x 4 bit")
        plan.add("quantization constants", quantized * c / 8,
                 f"{quantized:,} params x {c:.3f} bit ({'double quantization' if double_quant else 'fp32 absmax per 64'})")
        if total - quantized:
            plan.add("frozen weights (not quantized)", (total - quantized) * frozen_bytes,
                     f"{total - quantized:,} params x {frozen_bytes:g} B")
    else:
        plan.add("frozen weights", total * frozen_bytes, f"{total:,} params x {frozen_bytes:g} B")
    for part in ("weights", "gradients", "optimizer", "master"):
        if rec[part]:
            plan.add(f"adapter {part}", trainable * rec[part], f"{trainable:,} adapter params x {rec[part]} B",
                     _kind(part))
    return plan


def _kind(part: str) -> str:
    return "gradients" if part == "gradients" else "state"


OPTIMIZERS = ("adamw", "adamw8bit")


def adamw8bit_bytes(numels, blocksize: int = 2048, min_8bit_size: int = 4096) -> tuple[int, str]:
    """State of lorakit's 8-bit AdamW for tensors of these sizes: 2 B/param + 2 fp32 absmax per block,
    fp32 moments (8 B/param) for tensors under `min_8bit_size` elements."""
    numels = list(numels)
    big = [n for n in numels if n >= min_8bit_size]
    small = sum(n for n in numels if n < min_8bit_size)
    blocks = sum(-(-n // blocksize) for n in big)
    total = 2 * sum(big) + 8 * blocks + 8 * small
    return total, f"{sum(big):,} params x 2 B + {blocks:,} blocks x 2 x 4 B + {small:,} small params x 8 B"


def tenant_storage(base_gb: float, adapter_mb: float, tenants: int) -> dict:
    """N merged full checkpoints vs one base + N adapters (MB -> GB at 1024, as the seed computes it)."""
    if tenants < 1:
        raise ValueError(f"--tenants {tenants}: expected >= 1")
    merged = base_gb * tenants
    shared = base_gb + adapter_mb * tenants / 1024
    return {"tenants": tenants, "base_gb": base_gb, "adapter_mb": adapter_mb, "merged_full_models_gb": merged,
            "shared_base_plus_adapters_gb": shared, "reduction_x": merged / shared}


def rank_table(params_at_reference: int, reference_rank: int = 16, ranks=(4, 8, 16, 64, 256)) -> list[dict]:
    """Adapter parameters scale linearly with r for fixed targets."""
    return [{"r": r, "params": params_at_reference * r // reference_rank, "relative": r / reference_rank}
            for r in ranks]


def matrix_plan(d_in: int, d_out: int, r: int, method: str = "lora", dtype_bytes: int = 2) -> dict:
    """One projection: full vs adapter parameters, ratio, bytes at fp16, DoRA's magnitude vector."""
    if r < 1:
        raise ValueError(f"--rank {r}: expected an integer >= 1")
    full, lora = d_in * d_out, lora_params(d_in, d_out, r)
    out = {"d_in": d_in, "d_out": d_out, "r": r, "full_params": full, "lora_params": lora,
           "percent_of_full": 100 * lora / full, "full_bytes": full * dtype_bytes, "lora_bytes": lora * dtype_bytes}
    if method == "dora":
        out.update(dora_magnitude_params=d_out, dora_extra_vs_lora_percent=100 * d_out / lora)
    return out


def activation_bytes_per_layer(tokens: int, hidden: int, kv_dim: int, intermediate: int, dtype_bytes: int = 4,
                               checkpointing: bool = False, norms_train: bool = False) -> float:
    """Activations autograd keeps for one decoder layer (RMSNorm, RoPE, SDPA, SwiGLU MLP).

    Korthikanti et al., 2022 (arXiv:2205.05198, sec. 4.1) count 34*s*b*h bytes per layer for a
    GPT block in fp16 with flash-style attention. The same census for a Llama block, in elements
    per token: residual inputs of the two norms (2h), their outputs (2h), q, k, v before and after
    RoPE and the attention output (2h + 4*kv + 2h), the o_proj input copy (h), and the MLP's gate,
    up, SiLU(gate) and product (4i). When the norms' weights train (full fine-tuning) each norm
    also keeps its normalised input for the weight's gradient (2h more). With checkpointing only
    the layer input (h) is kept.
    """
    if checkpointing:
        per_token = hidden
    else:
        per_token = (9 if norms_train else 7) * hidden + 4 * kv_dim + 4 * intermediate
    return tokens * per_token * dtype_bytes


# -- past one device: what each of N ranks holds ---------------------------------------------------
SHARDING = {  # which model states are split across the ranks (ZeRO stage / FSDP)
    "none": (),                                             # DDP: every rank holds everything
    "opt": ("optimizer", "master"),                         # ZeRO-1
    "grad-opt": ("optimizer", "master", "gradients"),       # ZeRO-2
    "full": ("optimizer", "master", "gradients", "weights"),  # ZeRO-3 / FSDP (FULL_SHARD)
}


def _part(component: str) -> str:
    """Which state a plan line is: weights (frozen ones and NF4 bytes too), gradients, optimizer, master."""
    for part in ("gradients", "optimizer", "master"):
        if part in component:
            return part
    return "weights" if component != "activations" else "activations"


def shard(plan: MemoryPlan, world_size: int, strategy: str = "full", largest_unit: float = 0,
          largest_unit_gradients: float = 0, root_unit: float = 0, root_unit_gradients: float = 0) -> MemoryPlan:
    """The plan of one rank out of `world_size` under `strategy` (the seed's "spreading weights,
    gradients, and optimizer state across GPUs"). Sharded states are divided by N (rounded up to
    whole shards: FSDP pads each parameter to a multiple of N, ignored here); activations are
    not, each rank runs its own micro-batch. Full sharding pays back part of the saving, as FSDP2
    runs it: a decoder block is all-gathered before it runs while the next one is prefetched (two
    copies of the largest block's weights), the root unit (embeddings, final norm, head) stays
    gathered from the start of forward to the end of backward (FSDP2 does not reshard the root
    after forward), and in backward a block's full gradient is copied into the reduce-scatter's
    flat buffer (two copies) while the root's full gradient waits for the embeddings' backward.
    `largest_unit`/`largest_unit_gradients`: the largest block's weight and gradient bytes;
    `root_unit`/`root_unit_gradients`: the root's.
    """
    if strategy not in SHARDING:
        raise ValueError(f"--shard {strategy!r}: expected one of {list(SHARDING)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size {world_size!r}: expected an integer >= 1")
    out = MemoryPlan(accumulate=plan.accumulate, head_gradient=plan.head_gradient)
    split = SHARDING[strategy] if world_size > 1 else ()
    for component, nbytes, formula, kind in plan.lines:
        if _part(component) in split:
            out.add(component, nbytes / world_size, f"({formula}) / {world_size} ranks", kind)
        else:
            out.add(component, nbytes, formula, kind)
    if "weights" in split and (largest_unit or root_unit):
        out.add("all-gathered weights", 2 * largest_unit + root_unit, "the root unit's weights + 2 x the largest "
                f"block's (the running one and the prefetched next): {root_unit:,.0f} + 2 x {largest_unit:,.0f} B")
    if "gradients" in split and (largest_unit_gradients or root_unit_gradients):
        out.add("unsharded gradients", 2 * largest_unit_gradients + root_unit_gradients, "the root's full gradient + "
                "the largest block's and its reduce-scatter copy: "
                f"{root_unit_gradients:,.0f} + 2 x {largest_unit_gradients:,.0f} B", "gradients")
    if "gradients" in split and plan.head_gradient:
        out.head_gradient = plan.head_gradient / world_size
    return out
