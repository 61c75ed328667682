"""The row kernel (serve/lora_rows.py) against the op's semantics, and a slotted layer that takes it
against the same layer on the reference op (DoRA rows, bf16 slots, base rows)."""
import dataclasses

import pytest
import torch
from torch import nn

from lorakit.serve import lora_rows
from lorakit.serve.slots import BatchedLoraLinear, Router
from lorakit.serve.weights import LayerWeights
from tests.serve.test_lora_ops import DORA, IDX, RANKS, S, loop_semantics, random_slots

pytestmark = pytest.mark.skipif(lora_rows.kernel() is None, reason="numba is not installed")
SHORT = {case: idx for case, idx in IDX.items() if len(idx) <= lora_rows.MAX_ROWS}


@pytest.mark.parametrize("case", list(SHORT))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_kernel_adds_every_rows_adapter(case, dtype, tol):
    """LoRA semantics with DoRA off (the kernel's part); bf16 slots and inputs: their values, summed in fp32."""
    idx = torch.tensor(SHORT[case])
    g = torch.Generator().manual_seed(idx.numel())
    slots = random_slots(S, 8, 40, 24, RANKS, [False] * S)
    slots.A, slots.Bt = slots.A.to(dtype), slots.Bt.to(dtype)
    x = torch.randn(idx.numel(), 40, generator=g).to(dtype)
    y = torch.randn(idx.numel(), 24, generator=g)
    want = loop_semantics(y, x.float(), idx, dataclasses.replace(slots, A=slots.A.float(), Bt=slots.Bt.float()), None)
    before = y.clone()
    got = lora_rows.apply(y, x, idx, slots.A, slots.Bt, slots.scale, torch.tensor(RANKS))
    assert got is y                                               # fp32 y: updated in place
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(got[idx < 0], before[idx < 0])
    y16 = before.bfloat16()
    got16 = lora_rows.apply(y16, x, idx, slots.A, slots.Bt, slots.scale, torch.tensor(RANKS))
    assert got16.dtype == torch.bfloat16 and torch.equal(y16, before.bfloat16())     # a bf16 y: a new tensor
    torch.testing.assert_close(got16.float(), (y16.float() + (want - before)).bfloat16().float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slotted_layer_on_the_kernel_equals_the_reference_op(dtype):
    torch.manual_seed(0)
    base = nn.Linear(40, 24, dtype=dtype).requires_grad_(False)
    router = Router()
    layer = BatchedLoraLinear(base, router, n_slots=S, r_max=8, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for k, (r, dora) in enumerate(zip(RANKS, DORA)):
        if r:
            gain = torch.rand(24, generator=g) + 0.5 if dora else None
            layer.write(k, LayerWeights(torch.randn(r, 40, generator=g), torch.randn(24, r, generator=g), 0.7 + k,
                                        gain))
    idx = IDX["shuffled with base rows"]
    x = torch.randn(len(idx), 40, generator=g).to(dtype)
    router.set(idx)
    assert lora_rows.usable(layer.A.dtype, x)
    fast = layer(x)
    router.reference = True
    ref = layer(x)
    tol = 1e-6 if dtype == torch.float32 else 1e-2           # the bf16 reference rounds its rank-r product
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol * float(ref.abs().max()), rtol=0)
    router.set(None)
    assert torch.equal(layer(x), base(x))
