"""Adapter folders for the serving tests: tiny models, randomized LoRA and DoRA adapters."""
import pytest
import torch

import lorakit as lk
from lorakit.inject import adapter_layers
from lorakit.methods.dora import DoraAdapter

# name -> LoraConfig arguments per family: different ranks, rsLoRA, a rank pattern, DoRA
ADAPTERS = {
    "llama": {
        "lora2": dict(r=2, alpha=4, targets="all-linear"),
        "lora4": dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        "dora4": dict(r=4, alpha=4, targets="all-linear", use_dora=True),
        "lora8": dict(r=8, alpha=8, targets="attention", rank_pattern={"k_proj": 3}),
    },
    "gpt2": {
        "lora2": dict(r=2, alpha=4, targets=["c_attn", "c_fc"]),
        "lora4": dict(r=4, alpha=8, targets="all-linear", use_rslora=True),
        "dora4": dict(r=4, alpha=4, targets="all-linear", use_dora=True),
        "lora8": dict(r=8, alpha=8, targets=["c_proj"], rank_pattern={"mlp.c_proj": 5}),
    },
}


def randomize_adapter(model, seed):
    """Non-trivial A and B; a DoRA magnitude near the base row norms (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for adapter in layer.adapters.values():
                adapter.A.copy_(torch.randn(adapter.A.shape, generator=g) * 0.3)
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=g) * 0.3)
                if isinstance(adapter, DoraAdapter):
                    adapter.m.mul_(1 + 0.3 * torch.randn(adapter.m.shape, generator=g))
    return model


def make_adapter(folder, family, config, seed=1, model=None):
    model = lk.tiny_model(family) if model is None else model
    lk.inject(model, lk.LoraConfig(**config))
    randomize_adapter(model, seed)
    return lk.save_adapter(model, folder)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    """<root>/<family>/<name>: the adapters of ADAPTERS, saved as PEFT folders."""
    root = tmp_path_factory.mktemp("adapters")
    for family, adapters in ADAPTERS.items():
        for i, (name, config) in enumerate(adapters.items()):
            make_adapter(root / family / name, family, config, seed=10 + i)
    return root
