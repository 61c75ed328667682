"""Files in and out: PEFT-format adapter folders, quantized bases, merging a folder into a state dict."""
from .peft_format import AdapterFormatError, load_adapter, save_adapter
from .merge import merged_state_dict
from .peft_format import read_folder
from .quantized import load_quantized, save_quantized
from .trainers import save_pretrained_as_peft

__all__ = ["AdapterFormatError", "load_adapter", "load_quantized", "merged_state_dict", "read_folder", "save_adapter",
           "save_quantized"]
