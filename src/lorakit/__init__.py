"""lorakit: parameter-efficient fine-tuning and multi-adapter serving."""
from .config import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from .inject import active_adapters, delete_adapter, disabled, inject, set_active, trainable_report
from .io.peft_format import AdapterFormatError, load_adapter, save_adapter
from .merge import MergeError, merge, merge_and_unload, unmerge
from .models import load_base, tiny_model
from .targets import TargetError
from .training import NonFiniteLoss, TrainConfig, train

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "inject", "save_adapter", "load_adapter", "merge", "unmerge", "merge_and_unload", "disabled",
    "load_base", "trainable_report", "set_active", "active_adapters", "delete_adapter", "tiny_model",
    "AdapterFormatError", "MergeError", "TargetError", "train", "TrainConfig", "NonFiniteLoss",
]
