"""Files in and out: PEFT-format adapter folders, quantized bases."""
from .peft_format import AdapterFormatError, load_adapter, save_adapter
from .quantized import load_quantized, save_quantized

__all__ = ["AdapterFormatError", "load_adapter", "load_quantized", "save_adapter", "save_quantized"]
