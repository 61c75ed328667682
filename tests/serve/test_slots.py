"""A mixed batch through the attached model equals each row on its own merged model."""
import pytest
import torch

import lorakit as lk
from lorakit.serve import LayerWeights, attach
from lorakit.serve.slots import BatchedLoraLinear
from tests.helpers import inputs, logits
from tests.serve.conftest import ADAPTERS

# each batch row's adapter (None: the base); DoRA, LoRA of ranks 2/4/8 (and a rank pattern), base rows
ROWS = ["lora2", None, "dora4", "lora8", "dora4", "lora4", None, "lora2"]


def merged_logits(family, folder, x):
    model = lk.tiny_model(family)
    if folder is not None:
        model = lk.merge_and_unload(lk.load_adapter(model, folder))
    return logits(model, x)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request, adapter_root):
    family = request.param
    model = lk.tiny_model(family)
    handle = attach(model, "all-linear", slots=6, r_max=8)
    slot = {}
    for k, name in enumerate(reversed(list(ADAPTERS[family]))):      # slot order unrelated to ROWS order
        handle.write_slot(k + 1, handle.read(adapter_root / family / name, name))
        slot[name] = k + 1
    x = inputs(model, seed=3, batch=len(ROWS), length=6)
    expected = torch.cat([merged_logits(family, None if a is None else adapter_root / family / a, x[i:i + 1])
                          for i, a in enumerate(ROWS)])
    return family, handle, slot, x, expected


@pytest.mark.parametrize("op", ["reference", "fast"])
def test_mixed_batch_equals_each_row_merged(served, op):
    family, handle, slot, x, expected = served
    handle.reference = op == "reference"
    with handle.rows([-1 if a is None else slot[a] for a in ROWS]) as model:
        got = logits(model, x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    base = merged_logits(family, None, x)
    for i, a in enumerate(ROWS):      # the adapters change the logits, so equality means something
        assert ((got[i] - base[i]).abs().max() > 0.05) == (a is not None)
    handle.reference = False


def test_one_row_per_slot_decode_and_prefill(served):
    """Rows grouped by slot with equal lengths: the copy-free path, for 1 and for 6 tokens a row."""
    family, handle, slot, x, expected = served
    names = list(slot)
    rows = [slot[n] for n in names]
    order = [ROWS.index(n) for n in names]
    with handle.rows(sorted(rows)) as model:
        by_slot = sorted(zip(rows, order))
        xs = x[[i for _, i in by_slot]]
        torch.testing.assert_close(logits(model, xs), expected[[i for _, i in by_slot]], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits(model, xs[:, :1]), expected[[i for _, i in by_slot]][:, :1], atol=1e-4, rtol=0)


def test_no_rows_set_is_the_base_and_detach_restores(adapter_root):
    model = lk.tiny_model("llama")
    x = inputs(model)
    base = logits(model, x)
    handle = attach(model, "all-linear", slots=2, r_max=4)
    handle.write_slot(0, handle.read(adapter_root / "llama" / "lora2", "lora2"))
    assert sum(isinstance(m, BatchedLoraLinear) for m in model.modules()) == 14
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    with handle.rows([-1, -1]):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    with handle.rows([0, 0]):
        assert (logits(model, x) - base).abs().max() > 0.05
    handle.clear_slot(0)
    with handle.rows([0, 0]):
        torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    handle.detach()
    assert not any(isinstance(m, BatchedLoraLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)


def test_bad_uses_are_refused(adapter_root):
    model = lk.tiny_model("llama")
    handle = attach(model, "attention", slots=2, r_max=4)
    with pytest.raises(ValueError, match="out of range"):
        handle.set_rows([0, 2])
    with handle.rows([0, 1, 0]):
        with pytest.raises(ValueError, match="rows were set for 3 batch rows"):
            logits(model, inputs(model, batch=2))
    with pytest.raises(Exception, match="targets modules this server has no slots for"):
        handle.read(adapter_root / "llama" / "lora2")                        # all-linear: MLP too
    with pytest.raises(Exception, match="rank 8 is above the server's r_max = 4"):
        handle.read(adapter_root / "llama" / "lora8")
    q = handle.layers["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="do not fit"):
        q.write(0, LayerWeights(torch.zeros(2, 31), torch.zeros(32, 2), 1.0))
    with pytest.raises(ValueError, match="already has adapters"):
        attach(model)
