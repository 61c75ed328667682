import pytest

from lorakit.datasets import write


@pytest.fixture(scope="session")
def carrier(tmp_path_factory):
    """A small carrier-policy data set (train + held-out JSONL)."""
    return write(tmp_path_factory.mktemp("carrier"), n_train=40, n_heldout=12, seed=0)
