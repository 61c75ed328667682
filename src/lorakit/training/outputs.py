"""What a run writes and resumes from: an adapter (PEFT folder) or, for full fine-tuning, a model.

Both kinds have the same three verbs, so the trainer and its checkpoints never ask which method
trained: `folder` (the name inside a run or checkpoint folder), `save(model, path)` and
`load(model, path)`. Every write replaces the target atomically.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..atomic import atomic_folder
from ..io.peft_format import load_adapter, read_tensors, save_adapter


class AdapterWeights:
    folder = "adapter"

    def __init__(self, name: str = "default"):
        self.name = name

    def save(self, model: nn.Module, path: Path) -> Path:
        return save_adapter(model, path, name=self.name)

    def load(self, model: nn.Module, path: Path) -> None:
        load_adapter(model, path, name=self.name)


class ModelWeights:
    """A transformers folder (config, safetensors weights, tokenizer), loadable by `load_base`."""

    folder = "model"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path) -> Path:
        path = Path(path)
        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp)            # safetensors; tied weights stored once
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
        return path

    def load(self, model: nn.Module, path: Path) -> None:
        """Copy a saved model's weights into `model` in place (shapes and names must match exactly)."""
        path = Path(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors weights to resume from")
        tensors = {}
        for f in files:
            tensors.update(read_tensors(f))
        params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        unexpected = sorted(set(tensors) - set(params))
        if unexpected:
            raise ValueError(f"{path}: weights for parameters this model lacks: {unexpected[:5]}")
        loaded = {id(params[k]) for k in tensors}
        missing = sorted(k for k, p in params.items() if id(p) not in loaded and k in dict(model.named_parameters()))
        if missing:
            raise ValueError(f"{path}: no weights for {missing[:5]}")
        for key, value in tensors.items():
            target = params[key]
            if target.shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
            target.data.copy_(value)
