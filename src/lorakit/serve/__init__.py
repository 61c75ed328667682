"""Multi-adapter serving: one resident base model, many LoRA/DoRA adapters batched row by row.

`lora_ops` is the batched op (semantics, reference and fast path), `slots` puts it into a
transformers model, `weights` is an adapter as held in RAM, `adapter_cache` pages adapters
disk -> RAM -> slots, `forward` runs a ragged batch of sequences (each its own KV cache and slot),
`scheduler` and `engine` do continuous batching on token ids, `api` is the HTTP layer on top.
"""
from .adapter_cache import (AdapterCache, AdapterError, AdapterExists, AdapterLoadError, AdapterPathError,
                            NoFreeSlot, UnknownAdapter, confine)
from .lora_ops import RowPlan, SlotWeights, dora_factor, lora_grouped, lora_reference, plan_rows
from .engine import Engine, Event
from .forward import Chunk, runner_for
from .sampling import BadParam, SamplingParams
from .scheduler import QueueFull
from .server import ServeConfig, ServedModel, build
from .slots import BatchedLoraLinear, ServeHandle, attach
from .weights import AdapterWeights, LayerWeights, read_adapter, weights_from_model

__all__ = [
    "attach", "ServeHandle", "BatchedLoraLinear", "AdapterWeights", "LayerWeights", "read_adapter",
    "weights_from_model", "lora_reference", "lora_grouped", "plan_rows", "RowPlan", "SlotWeights", "dora_factor",
    "AdapterCache", "AdapterError", "AdapterExists", "AdapterLoadError", "AdapterPathError", "NoFreeSlot",
    "UnknownAdapter", "confine", "Engine", "Event", "Chunk", "runner_for", "SamplingParams", "BadParam", "QueueFull",
    "ServeConfig", "ServedModel", "build",
]
