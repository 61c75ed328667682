"""The numba kernels against the torch path they replace: codes and absmax bit for bit."""
import pytest
import torch

from lorakit.optim import AdamW8bit, adamw8bit
from lorakit.quant import fused
from lorakit.quant.blockwise import BlockState, dequantize_blockwise, quantize_blockwise

pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="numba is not installed")


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 2048 + 700, generator=g) * torch.logspace(-9, 2, 3 * 2048 + 700)  # 7 decades, a short tail
    x[2048:4096] = 0                                               # an all-zero block
    x[5000] = 1e-30                                                # near the 1e-38 clamp
    yield "mixed", x
    yield "short", torch.randn(100, generator=g)                   # one block, shorter than blocksize
    yield "exact", torch.randn(4 * 2048, generator=g).abs() * 1e-6  # whole blocks, positive (v-like)
    zero_tail = torch.randn(2048 + 100, generator=g)
    zero_tail[2048:] = 0                                           # a short all-zero block: absmax stored clamped
    yield "zero-tail", zero_tail
    # values on and one ulp either side of every code midpoint, times an absmax of 3: which side of
    # a midpoint they land on is decided by the last bit of x * (1/absmax) (full block) or x / absmax
    # (short block), so the two kernels must compute exactly what the torch path does
    code = torch.from_numpy(adamw8bit.fused_tables()[2])
    mids = ((code[:-1] + code[1:]) / 2 * 3).float()
    edge = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), torch.tensor([3.0])])
    yield "midpoints-short", edge                                  # 766 values: one short block
    yield "midpoints-full", torch.cat([edge, torch.zeros(2048 - edge.numel())])
    nan = torch.randn(2 * 2048, generator=g)
    nan[10] = float("nan")
    yield "nan", nan


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("name,x", list(_cases()), ids=[n for n, _ in _cases()])
def test_quantize_and_dequantize_equal_the_torch_path(name, x, signed):
    dequantize, quantize, *tables = adamw8bit.fused_tables()
    code, table, ext = tables[:3] if signed else tables[3:]
    x = x if signed else x.abs()
    never_zero = not signed
    ref_codes, state = quantize_blockwise(x, 2048, torch.from_numpy(code))
    if never_zero:
        ref_codes = ref_codes.masked_fill_((ref_codes == 0) & (x > 0), 1)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(state.absmax.numel())
    quantize(x.numpy(), 2048, table, ext, never_zero, codes.numpy(), absmax.numpy())
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32))    # NaN included, bit for bit
    out = torch.empty(x.numel())
    dequantize(codes.numpy(), absmax.numpy(), code, 2048, out.numpy())
    ref = dequantize_blockwise(ref_codes, BlockState(state.absmax, torch.from_numpy(code), 2048, torch.float32))
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def _train(monkeypatch, fast: bool, dtype=torch.float32):
    if not fast:
        monkeypatch.setattr(adamw8bit, "fused_tables", lambda: None)
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in ((300, 100), (16, 576),
                                                                                          (5000,), (64,))]
    opt = AdamW8bit(params, lr=1e-3, weight_decay=0.01)
    for _ in range(10):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
        opt.step()
    monkeypatch.undo()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ten_steps_leave_byte_identical_state(monkeypatch, dtype):
    ref, ref_opt = _train(monkeypatch, fast=False, dtype=dtype)
    got, opt = _train(monkeypatch, fast=True, dtype=dtype)
    assert "exp_avg_codes" in opt.state[got[0]]
    for a, b in zip(got, ref):
        assert torch.equal(a.detach(), b.detach())
        for key, value in ref_opt.state[b].items():
            assert torch.equal(opt.state[a][key], value), key
