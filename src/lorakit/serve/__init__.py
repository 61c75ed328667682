"""Multi-adapter serving: one resident base model, many LoRA/DoRA adapters batched row by row.

`lora_ops` is the batched op (semantics, reference and fast path), `slots` puts it into a
transformers model, `weights` is an adapter as held in RAM, `adapter_cache` pages adapters
disk -> RAM -> slots. The engine, the scheduler and the HTTP layer build on these.
"""
from .adapter_cache import (AdapterCache, AdapterError, AdapterExists, AdapterLoadError, AdapterPathError,
                            NoFreeSlot, UnknownAdapter, confine)
from .lora_ops import RowPlan, SlotWeights, dora_factor, lora_grouped, lora_reference, plan_rows
from .slots import BatchedLoraLinear, ServeHandle, attach
from .weights import AdapterWeights, LayerWeights, read_adapter, weights_from_model

__all__ = [
    "attach", "ServeHandle", "BatchedLoraLinear", "AdapterWeights", "LayerWeights", "read_adapter",
    "weights_from_model", "lora_reference", "lora_grouped", "plan_rows", "RowPlan", "SlotWeights", "dora_factor",
    "AdapterCache", "AdapterError", "AdapterExists", "AdapterLoadError", "AdapterPathError", "NoFreeSlot",
    "UnknownAdapter", "confine",
]
