"""Prefix tuning: learned keys and values prepended at every attention layer (Li & Liang, 2021,
arXiv:2101.00190), fed to the model as a pre-filled KV cache.

The prefix is one tensor of shape (n, layers * 2 * kv_dim): for virtual token t, layer l's key is
slice 2l and its value slice 2l+1, each viewed as (kv_heads, head_dim), which is peft's layout. With
grouped-query attention the prefix has the key/value heads' width (SmolLM2: 3 heads x 64, not 9 x 64).
Optionally the prefix is produced during training by a small MLP over n learned embeddings
(the paper's reparameterisation, which stabilises training); what is saved is the MLP's output,
so a saved prefix never needs the MLP again.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .input import InputAdapter, batch_size


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class PrefixTuning(InputAdapter):
    def __init__(self, n_virtual: int, layers: int, kv_heads: int, head_dim: int, projection: int = 0,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.n_virtual, self.layers, self.kv_heads, self.head_dim = n_virtual, layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        if projection:
            kv_dim = kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(n_virtual, kv_dim, dtype=dtype, device=device))
            self.mlp = nn.Sequential(nn.Linear(kv_dim, projection, dtype=dtype, device=device), nn.Tanh(),
                                     nn.Linear(projection, width, dtype=dtype, device=device))
            self.prefix = None
        else:
            self.prefix = nn.Parameter(torch.randn(n_virtual, width, dtype=dtype, device=device))
            self.embedding = self.mlp = None
        self.model_config, self.model_dtype = None, dtype

    def bind(self, model: nn.Module) -> "PrefixTuning":
        """Check the prefix fits `model`'s attention layout and remember its config and dtype."""
        found = kv_layout(model.config)
        if found != (self.layers, self.kv_heads, self.head_dim):
            raise ValueError(f"prefix for (layers, kv_heads, head_dim) = {(self.layers, self.kv_heads, self.head_dim)} "
                             f"does not fit {type(model).__name__} with {found}")
        self.__dict__["model_config"] = model.config
        self.model_dtype = next(model.parameters()).dtype
        return self

    @torch.no_grad()
    def initialise_from(self, model: nn.Module, token_ids: list[int]) -> None:
        """Start from the keys and values `model` computes for `token_ids` (repeated to n tokens): the
        prefix then reads like real text the model has seen, instead of noise (Li & Liang, 2021,
        sec. 7.2: initialising from real words' activations trains better than random)."""
        if self.prefix is None:
            raise ValueError("a prefix produced by the reparameterisation MLP cannot be initialised from text")
        if not token_ids:
            raise ValueError("prefix init 'text' needs a non-empty prefix_text")
        ids = (token_ids * -(-self.n_virtual // len(token_ids)))[: self.n_virtual]
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        per = torch.stack([t for layer in cache.layers for t in (layer.keys[0], layer.values[0])])  # (2L, H, n, d)
        self.prefix.copy_(per.permute(2, 0, 1, 3).reshape(self.n_virtual, -1))

    def values(self) -> torch.Tensor:
        """The prefix, (n, layers * 2 * kv_heads * head_dim): what is saved."""
        return self.mlp(self.embedding) if self.prefix is None else self.prefix

    def enter(self, kwargs: dict, first: bool) -> dict:
        if not first:
            return kwargs
        b = batch_size(kwargs)
        per = self.values().view(self.n_virtual, self.layers * 2, self.kv_heads, self.head_dim)
        per = per.permute(1, 2, 0, 3)                            # (layers*2, kv_heads, n, head_dim)
        legacy = kwargs.pop("past_key_values", None)       # an empty Cache is falsy: test for None
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else legacy
        if cache is None:
            cache = DynamicCache(config=self.model_config)
        device = per.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.model_dtype
        for layer in range(self.layers):
            k = per[2 * layer].unsqueeze(0).expand(b, -1, -1, -1).to(dtype)
            v = per[2 * layer + 1].unsqueeze(0).expand(b, -1, -1, -1).to(dtype)
            cache.update(k, v, layer)
        kwargs["cache"] = cache
        return kwargs

    def extra_repr(self) -> str:
        return (f"n_virtual={self.n_virtual}, layers={self.layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, projection={self.mlp is not None}")

