"""A lorakit model inside transformers' Trainer (and TRL's trainers, which are Trainers): what it saves.

Trainers save a model with `model.save_pretrained(folder)`. On a model with lorakit adapters that
writes what a `PeftModel` writes: the active adapter as a PEFT folder at the top (others in
subfolders by name), so `peft.PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`,
`AutoModelForCausalLM` (through its PEFT integration) and `lorakit.load_adapter` all load it; never
a full `model.safetensors` under lorakit's internal names, which transformers would load silently
wrong. For `resume_from_checkpoint`, the folder also holds `model.safetensors` with the adapter
tensors only, under the model's own parameter names (what `Trainer` reads back with
`load_state_dict(strict=False)`), and no `config.json`, so nothing mistakes it for a whole model.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from ..inject import active_adapters, configs
from ..state import register_saver
from .peft_format import save_adapter

RESUME_NAME = "model.safetensors"


def save_pretrained_as_peft(model: nn.Module, save_directory, *args, is_main_process: bool = True, **kwargs):
    """`save_pretrained` for a model with lorakit adapters (other arguments are accepted and ignored)."""
    if not is_main_process:
        return
    folder = Path(save_directory)
    active = active_adapters(model)
    first = active[0] if active else next(iter(configs(model)))
    for name in configs(model):
        save_adapter(model, folder if name == first else folder / name, name)
    trainable = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    with atomic_path(folder / RESUME_NAME) as tmp:
        save_file(trainable, str(tmp), metadata={"format": "pt", "lorakit": "adapter tensors only, for Trainer resume"})


register_saver(save_pretrained_as_peft)
