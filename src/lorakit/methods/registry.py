"""The methods lorakit trains, by name: one table that the trainer, demo, planner, io and serving read.

Each `Method` says which config class describes it (and the values its name fixes: `dora` is a
LoraConfig with `use_dora=True`), which family it is (`weight` adapters wrap base layers, `input`
adapters feed the decoder, `full` trains the base itself), what peft calls it and which tensors it
writes per module, and how to build its adapter. A new method is one entry here plus its module.
What this does not do: put adapters into a model (`inject.py`) or read files (`io/`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import FullConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from .base import adapter_dtype
from .dora import DoraAdapter
from .lora import LoraAdapter
from .prefix import PrefixTuning, kv_layout
from .prompt import PromptTuning

MAGNITUDE = "lora_magnitude_vector"        # peft's name for DoRA's m, stored without a `.weight`


def _lora(layer, cfg: LoraConfig, module: str, weight: torch.Tensor):
    return LoraAdapter(layer.d_in, layer.d_out, cfg.rank_for(module), cfg.scale_for(module), cfg.dropout, cfg.init,
                       dtype=adapter_dtype(weight), device=weight.device)


def _dora(layer, cfg: LoraConfig, module: str, weight: torch.Tensor):
    # the magnitude starts at the row norms of the base with no adapter merged
    return DoraAdapter(layer.unmerged_base_weight(), cfg.rank_for(module), cfg.scale_for(module), cfg.dropout,
                       cfg.init, dtype=adapter_dtype(weight), device=weight.device)


def _prompt(model, cfg: PromptTuningConfig, embedding):
    weight = embedding.weight
    return PromptTuning(cfg.num_virtual_tokens, weight.shape[1], adapter_dtype(weight), weight.device)


def _prefix(model, cfg: PrefixTuningConfig, embedding):
    layers, kv_heads, head_dim = kv_layout(model.config)
    weight = embedding.weight
    return PrefixTuning(cfg.num_virtual_tokens, layers, kv_heads, head_dim, cfg.projection, adapter_dtype(weight),
                        weight.device)


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    family: str                                 # "weight", "input" or "full"
    summary: str
    fixed: dict = field(default_factory=dict)   # config values the name fixes
    peft_type: str | None = None
    tensors: tuple[str, ...] = ()               # peft's tensor names per adapted module (or for the whole adapter)
    build: Callable | None = None               # weight: (AdapterLayer, cfg, module name, weight); input: (model, cfg, embedding)

    def make(self, **values):
        """This method's config from flat values (as on the command line); unknown names are refused."""
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method {self.name!r}")
        return self.config(**{**values, **self.fixed})

    def option_names(self) -> set[str]:
        """The config fields a caller may set (a fixed one is accepted and then fixed)."""
        return {f.name for f in dataclasses.fields(self.config)}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", LoraConfig, "weight", "LoRA: a low-rank update B A beside each targeted weight",
           peft_type="LORA", tensors=("lora_A.weight", "lora_B.weight"), build=_lora),
    Method("dora", LoraConfig, "weight", "DoRA: LoRA's direction plus a learned magnitude per output row",
           fixed={"use_dora": True}, peft_type="LORA", tensors=("lora_A.weight", "lora_B.weight", MAGNITUDE),
           build=_dora),
    Method("prompt", PromptTuningConfig, "input", "prompt tuning: learned virtual-token embeddings",
           peft_type="PROMPT_TUNING", tensors=("prompt_embeddings",), build=_prompt),
    Method("prefix", PrefixTuningConfig, "input", "prefix tuning: learned keys and values at every layer",
           peft_type="PREFIX_TUNING", tensors=("prompt_embeddings",), build=_prefix),
    Method("full", FullConfig, "full", "full fine-tuning: every parameter of the base trains"),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not available (choose from {sorted(METHODS)})")
    return METHODS[name]


def of(config) -> Method:
    """The method a config describes (a LoraConfig with use_dora is `dora`)."""
    if isinstance(config, LoraConfig):
        return METHODS["dora" if config.use_dora else "lora"]
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"{type(config).__name__} is not the config of any method ({sorted(METHODS)})")
