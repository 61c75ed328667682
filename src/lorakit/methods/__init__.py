"""Adapter methods. Weight adapters wrap base layers (`base.AdapterLayer`)."""
from .base import AdapterLayer, WeightAdapter
from .lora import LoraAdapter
from .modules_to_save import ModulesToSave

__all__ = ["AdapterLayer", "WeightAdapter", "LoraAdapter", "ModulesToSave"]
