"""Adapter methods. Weight adapters wrap base layers (`base.AdapterLayer`)."""
from .base import AdapterLayer, WeightAdapter
from .dora import DoraAdapter
from .lora import LoraAdapter
from .modules_to_save import ModulesToSave

__all__ = ["AdapterLayer", "WeightAdapter", "LoraAdapter", "DoraAdapter", "ModulesToSave"]
