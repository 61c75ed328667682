"""Files in and out: PEFT-format adapter folders, atomic writes."""
from .peft_format import AdapterFormatError, load_adapter, save_adapter

__all__ = ["AdapterFormatError", "load_adapter", "save_adapter"]
