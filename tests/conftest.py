import os
import warnings

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
