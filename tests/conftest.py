import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # peft looks base models up online when it can; never here

import pytest
import torch

from lorakit.models import TINY_FAMILIES, tiny_model

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=TINY_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def embedded_folder(tmp_path_factory):
    """Convert the embedded GGUF once, into a private cache, so CI exercises the conversion itself."""
    from lorakit import models
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAKIT_CACHE", str(tmp_path_factory.mktemp("lorakit-cache")))
    try:
        yield models.resolve_folder(models.EMBEDDED)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def carrier(tmp_path_factory):
    """A small carrier-policy data set (train + held-out JSONL)."""
    from lorakit.datasets import write
    return write(tmp_path_factory.mktemp("carrier"), n_train=40, n_heldout=12, seed=0)
