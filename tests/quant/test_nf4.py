"""NF4 and 8-bit blockwise quantization against bitsandbytes (installed, CPU) and plain definitions."""
import pytest
import torch

from lorakit.quant import (NF4_CODE, dequantize_blockwise, dequantize_nf4, dequantize_nf4_reference, dynamic_map,
                           quantize_blockwise, quantize_nf4)
from lorakit.quant.nf4 import bits_per_parameter, nf4_from_quantiles

bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [((256, 128), 64, torch.float32), ((1000, 333), 64, torch.float32), ((1001,), 64, torch.float32), ((77, 33), 128, torch.bfloat16),
          ((300, 64), 64, torch.float16), ((96, 200), 256, torch.float32), ((5, 7), 32, torch.float32)]


def _reference_kernel(x, code, blocksize):
    """bitsandbytes' reference (device-independent) blockwise kernel, bypassing its CPU C library."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, code, blocksize)


def test_codebooks_are_bitsandbytes_and_the_papers():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", "cpu"))
    assert (nf4_from_quantiles() - NF4_CODE).abs().max() < 2e-7       # the table is the quantile construction
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnbf.create_dynamic_map(signed))


@pytest.mark.parametrize("shape, blocksize, dtype", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_bitsandbytes(shape, blocksize, dtype, double_quant):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    packed, state = quantize_nf4(x, blocksize, double_quant)
    b_packed, b_state = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert packed.dtype == torch.uint8 and torch.equal(packed, b_packed)           # codes, high nibble first
    if not double_quant:
        assert torch.equal(state.absmax, b_state.absmax)
    else:                                     # nested codes, their scales and the offset
        assert torch.equal(state.absmax, b_state.absmax)
        assert torch.equal(state.offset, b_state.offset)
        assert torch.equal(state.nested.absmax, b_state.state2.absmax)
        assert torch.equal(state.nested.code, b_state.state2.code)
    # dequantization from the same bits is bit-equal across libraries (checkpoints are interchangeable)
    assert torch.equal(dequantize_nf4(b_packed, _from_bnb(b_state)), bnbf.dequantize_4bit(b_packed, b_state))
    assert torch.equal(dequantize_nf4(packed, state), dequantize_nf4_reference(packed, state))
    assert dequantize_nf4(packed, state).dtype == dtype


def _from_bnb(qs):
    from lorakit.quant.linear4bit import state_from_tensors
    return state_from_tensors({k: v for k, v in qs.as_dict(packed=True).items()})


@pytest.mark.parametrize("shape, blocksize, dtype", [((4096,), 4096, torch.float32), ((1000, 37), 256, torch.float32),
                                                      ((12345,), 2048, torch.bfloat16), ((777,), 64, torch.float16)])
def test_8bit_blockwise_matches_the_reference_kernel(shape, blocksize, dtype):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype) * 3
    codes, state = quantize_blockwise(x, blocksize)
    ref_codes, ref_absmax = _reference_kernel(x, dynamic_map(), blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(state.absmax, ref_absmax)
    b_codes, b_state = bnbf.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(dequantize_blockwise(b_codes, state.__class__(b_state.absmax, state.code, blocksize, dtype)),
                       bnbf.dequantize_blockwise(b_codes, b_state))


GRID_CASES = [((4096,), 4096, torch.float32, True), ((1000, 37), 256, torch.float32, True),
              ((12345,), 2048, torch.bfloat16, True), ((777,), 64, torch.float16, True), ((300,), 256, torch.float32, True),
              ((5000,), 256, torch.float32, False), ((3000, 7), 512, torch.bfloat16, False)]


@pytest.mark.parametrize("shape, blocksize, dtype, signed", GRID_CASES)
def test_8bit_grid_rounding_matches_the_cpu_library(shape, blocksize, dtype, signed):
    torch.manual_seed(3)
    x = torch.randn(shape, dtype=dtype) * 3
    x = x if signed else x.abs()
    x.view(-1)[:blocksize] = 0                          # an all-zero block
    code = dynamic_map(signed)
    codes, state = quantize_blockwise(x, blocksize, code, rounding="grid")
    b_codes, b_state = bnbf.quantize_blockwise(x, code=code.clone(), blocksize=blocksize)   # the CPU library
    assert torch.equal(codes, b_codes) and torch.equal(state.absmax, b_state.absmax)


def test_grid_rounding_at_every_grid_boundary():
    """Values on, just above and just below each boundary between grid points, where fp32 rounding decides."""
    k = torch.arange(1 << 16, dtype=torch.float64)
    edges = ((k - 0.5) / 32767.5 - 1.0).float()
    values = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    values = values.clamp(-1, 1)
    rows = -(-values.numel() // 255)
    body = torch.cat([values, values.new_zeros(rows * 255 - values.numel())]).view(rows, 255)
    x = torch.cat([torch.ones(rows, 1), body], dim=1)          # absmax 1 per block: values are scaled exactly
    codes, _ = quantize_blockwise(x, 256, rounding="grid")
    b_codes, _ = bnbf.quantize_blockwise(x, code=dynamic_map().clone(), blocksize=256)
    assert torch.equal(codes, b_codes)


def test_grid_rounding_costs_at_most_one_grid_step():
    """A value is within half a step (1/65535) of its grid point, whose code is the point's nearest:
    so the grid's code is at most 2/65535 farther from the value than the nearest code."""
    torch.manual_seed(4)
    x = torch.rand(200_000) * 2 - 1
    x[::256] = 1.0                                   # absmax 1 per block: values are scaled exactly
    code = dynamic_map()
    near, _ = quantize_blockwise(x, 256)
    grid, _ = quantize_blockwise(x, 256, rounding="grid")
    err_near, err_grid = (code[near.long()] - x).abs(), (code[grid.long()] - x).abs()
    assert 0 < (near != grid).float().mean() < 0.01
    assert (err_grid <= err_near + 2 / 65535 + 1e-7).all()


def test_unknown_rounding_is_named():
    with pytest.raises(ValueError, match="rounding 'up' is not one of"):
        quantize_blockwise(torch.randn(64), 64, rounding="up")


def test_dequantized_error_is_within_half_a_code_step():
    torch.manual_seed(2)
    x = torch.randn(64 * 50)
    packed, state = quantize_nf4(x, 64, double_quant=False)
    err = (dequantize_nf4(packed, state) - x).abs().view(-1, 64)
    widest_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    assert (err <= widest_gap / 2 * state.absmax.unsqueeze(1) + 1e-6).all()


def test_storage_is_4_127_bits_per_parameter():
    packed, state = quantize_nf4(torch.randn(4096, 4096))
    assert abs(bits_per_parameter(packed, state) - 4.127) <= 0.001
    plain_packed, plain = quantize_nf4(torch.randn(4096, 4096), double_quant=False)
    assert abs(bits_per_parameter(plain_packed, plain) - 4.5) <= 0.001


@pytest.mark.parametrize("blocksize", [16, 100, 8192])
def test_bad_blocksize_is_named(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize} is not allowed"):
        quantize_nf4(torch.randn(256), blocksize)


def test_non_finite_values_are_named():
    x = torch.randn(8, 64)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.q_proj.weight: 1 non-finite"):
        quantize_nf4(x, name="model.layers.0.q_proj.weight")


@pytest.mark.parametrize("codebook", ["nf4", "dynamic", "dynamic-unsigned"])
def test_table_lookup_equals_bucketize_everywhere(codebook):
    from lorakit.quant.blockwise import nearest
    code = {"nf4": NF4_CODE, "dynamic": dynamic_map(True), "dynamic-unsigned": dynamic_map(False)}[codebook]
    bounds = (code[:-1] + code[1:]) / 2
    patterns = torch.arange(1 << 16, dtype=torch.int32) << 16
    values = torch.cat([patterns.view(torch.float32), (patterns | 0xFFFF).view(torch.float32),
                        (patterns | 0x8000).view(torch.float32), bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                        torch.nextafter(bounds, torch.tensor(-2.0)), torch.rand(100_000) * 2 - 1])
    values = values[torch.isfinite(values) & (values.abs() <= 1)]      # every bfloat16 interval, its ends and middle
    assert torch.equal(nearest(values, bounds).long(), torch.bucketize(values, bounds))
