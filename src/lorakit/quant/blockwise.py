"""Blockwise absmax quantization onto a sorted codebook, and the 8-bit dynamic codebook.

A tensor is flattened and cut into blocks of `blocksize` values (the last block may be short). Each
block is scaled by 1/absmax into [-1, 1] and every value is replaced by a code index; dequantization
is `code[index] * absmax` in fp32. The codebooks and the memory layout are bitsandbytes', so codes,
scales and files are interchangeable with it. Two roundings, both bitsandbytes':

- "nearest" (the default): the nearest code, a tie to the lower one. This is bitsandbytes'
  reference (device-independent) kernel and the rule for NF4; tests check bit equality with it.
- "grid": bitsandbytes' CPU library. [-1, 1] is cut into a 65,536-point grid, each point holds
  its nearest code, and a value takes the code of its grid point. A value within half a grid step
  (1.5e-5) of a midpoint between codes may land on the farther code: ~0.2% of values with the
  signed map. lorakit uses it for the nested absmax of double quantization, so a quantized base
  is byte-identical to the one bitsandbytes writes on CPU; tests check that too.

The 8-bit dynamic codebook (Dettmers, 2015, arXiv:1511.04561; used for optimizer state and for
QLoRA's second-level quantization of the absmax constants) spends one sign bit, a unary exponent
that scales by powers of ten, and the remaining bits on a linear fraction, so it resolves values
from 1e-7 to 1 with roughly constant relative error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 1 << 22          # elements per chunk: bounds temporaries to a few x 16 MB whatever the tensor size
GRID = 1 << 16           # points of the "grid" rounding over [-1, 1]
ROUNDINGS = ("nearest", "grid")


@lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic-exponent codebook: 2**total_bits sorted fp32 values in [-1, 1], 0 and 1 included.

    Exponent level e (0 .. exponent_bits-1) covers magnitudes 10**(e - exponent_bits + 1) x (0.1, 1]
    with 2**(e + fraction bits) evenly spaced bin midpoints (one fraction bit fewer when signed).
    Codes left over by the bit budget are zeros.
    """
    value_bits = total_bits - 1
    values: list[float] = []

    def level(scale: float, n_edges: int) -> None:
        edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * mids).tolist())           # fp32 products, as the codebook is stored
        if signed:
            values.extend((-scale * mids).tolist())

    for e in range(exponent_bits):
        fraction = e + value_bits - exponent_bits + (0 if signed else 1)
        level(10.0 ** (e - exponent_bits + 1), 2 ** fraction + 1)
    extra = 2 ** (value_bits - exponent_bits) - 1        # codes with no indicator bit at all
    if extra > 0:
        level(1.0, extra + 1)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic map with {exponent_bits} exponent bits does not fill {total_bits} bits")
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class BlockState:
    """How to undo `quantize_blockwise`: fp32 absmax per block, the codebook, the original dtype."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype


def check(tensor: torch.Tensor, blocksize: int, allowed, what: str = "tensor") -> None:
    if blocksize not in allowed:
        raise ValueError(f"blocksize {blocksize} is not allowed for {what}: choose one of {list(allowed)}")
    if tensor.dtype not in DTYPES:
        raise ValueError(f"{what}: dtype {tensor.dtype} cannot be quantized (float32, bfloat16 or float16)")
    if tensor.numel() == 0:
        raise ValueError(f"{what}: an empty tensor cannot be quantized")


def absmax_codes(flat: torch.Tensor, blocksize: int, lookup: Callable[[torch.Tensor], torch.Tensor],
                 divide_tail: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(code index per value as int64, fp32 absmax per block) for a 1-D tensor.

    Full blocks are scaled by the fp32 reciprocal of their absmax; the short last block is divided
    by it (bitsandbytes' torch kernels) unless `divide_tail` is False (its CPU library multiplies
    there too, and keeps a zero absmax as zero). `lookup` maps scaled values in [-1, 1] to
    indices. Runs in chunks of whole blocks to bound temporary memory.
    """
    n = flat.numel()
    blocks = -(-n // blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    idx = torch.empty(n, dtype=torch.int64, device=flat.device)
    step = max(1, CHUNK // blocksize) * blocksize
    for start in range(0, n, step):
        part = flat[start:start + step].float()
        full = part.numel() // blocksize * blocksize
        b0 = start // blocksize
        pieces = []
        if full:
            body = part[:full].view(-1, blocksize)
            am = body.abs().amax(dim=1)
            absmax[b0:b0 + am.numel()] = am
            pieces.append(torch.clamp(body * (1.0 / am.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1))
        if full < part.numel():                            # the short last block
            am = part[full:].abs().amax()
            if divide_tail:                                # ...and stores its absmax clamped, as they do
                am = am.clamp(min=1e-38)
                tail = part[full:] / am
            else:
                tail = part[full:] * (1.0 / am.clamp(min=1e-38))
            absmax[-1] = am
            pieces.append(torch.clamp(tail, -1, 1))
        scaled = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        idx[start:start + part.numel()] = lookup(scaled)
    return idx, absmax


def nearest(scaled: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """`torch.bucketize(scaled, bounds)` for fp32 values in [-1, 1], by table lookup (several x faster).

    The top 16 bits of an fp32 (its bfloat16 truncation) name a small interval of values. A
    64K-entry table holds, per interval, the bucket of its lowest value; at most one midpoint
    lies inside any interval (checked when the table is built), so one comparison finishes the
    job: exact, not approximate. Falls back to `bucketize` if a codebook is too dense for that.
    """
    table = _bucket_table(bounds.cpu().numpy().tobytes())
    if table is None:
        return torch.bucketize(scaled, bounds)
    table = table.to(scaled.device)
    ext = torch.cat([bounds, bounds.new_full((1,), float("inf"))])
    top = (scaled.view(torch.int32) >> 16) & 0xFFFF
    idx = torch.index_select(table, 0, top)                 # index_select: the fast gather on CPU
    return idx + (scaled > torch.index_select(ext, 0, idx))


@lru_cache(maxsize=16)
def _bucket_table(key: bytes) -> torch.Tensor | None:
    bounds = torch.frombuffer(bytearray(key), dtype=torch.float32)
    patterns = torch.arange(1 << 16, dtype=torch.int32)
    ends = torch.stack([(patterns << 16).view(torch.float32), ((patterns << 16) | 0xFFFF).view(torch.float32)])
    lo, hi = ends.min(dim=0).values, ends.max(dim=0).values       # negative numbers truncate toward zero
    inside = torch.isfinite(lo) & torch.isfinite(hi) & (hi >= -1) & (lo <= 1)
    first, last = torch.bucketize(lo, bounds), torch.bucketize(hi, bounds)
    if ((last - first)[inside] > 1).any():
        return None
    return first.to(torch.int32)


def grid_codes(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The "grid" rounding: each value takes the code stored at its point of a 65,536-point grid.

    Point k is -1 + 2k/65535 and holds the number of code midpoints below it (its nearest code, a
    tie to the lower one); value z goes to point trunc((z + 1) * 0.5 * 65535 + 0.5), in fp32.
    """
    table = _grid_table(code.cpu().numpy().tobytes()).to(scaled.device)
    point = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (GRID - 1) + 0.5).to(torch.int32)
    return torch.index_select(table, 0, point)


@lru_cache(maxsize=16)
def _grid_table(key: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(key), dtype=torch.float32)
    mids = (code[:-1] + code[1:]) * 0.5
    points = -1.0 + (2.0 * torch.arange(GRID, dtype=torch.float32)) / (GRID - 1)
    return torch.searchsorted(mids, points)                   # midpoints strictly below each point


def quantize_blockwise(tensor: torch.Tensor, blocksize: int = 4096, code: torch.Tensor | None = None,
                       allowed=(64, 128, 256, 512, 1024, 2048, 4096),
                       rounding: str = "nearest") -> tuple[torch.Tensor, BlockState]:
    """8-bit blockwise quantization: (uint8 codes shaped like `tensor`, BlockState).

    `rounding` is "nearest" or "grid" (bitsandbytes' CPU library; see the module docstring).
    """
    check(tensor, blocksize, allowed)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is not one of {list(ROUNDINGS)}")
    code = dynamic_map() if code is None else code
    code = code.to(tensor.device)
    if rounding == "nearest":
        bounds = (code[:-1] + code[1:]) / 2
        idx, absmax = absmax_codes(tensor.reshape(-1), blocksize, lambda z: nearest(z, bounds))
    else:
        idx, absmax = absmax_codes(tensor.reshape(-1), blocksize, lambda z: grid_codes(z, code), divide_tail=False)
        zero = (absmax == 0).repeat_interleave(blocksize)[:idx.numel()]
        idx[zero] = 0                                      # an all-zero block stores code 0, as the CPU library does
    return idx.to(torch.uint8).view(tensor.shape), BlockState(absmax, code, blocksize, tensor.dtype)


def dequantize_blockwise(codes: torch.Tensor, state: BlockState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`code[codes] * absmax` per block, in fp32, then cast to `dtype` (default: the original dtype)."""
    flat = codes.reshape(-1)
    n, bs = flat.numel(), state.blocksize
    values = state.code.to(codes.device)[flat.long()]
    full = n // bs * bs
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (values[:full].view(-1, bs) * state.absmax[:full // bs].unsqueeze(1)).view(-1)
    if full < n:
        out[full:] = values[full:] * state.absmax[-1]
    return out.view(codes.shape).to(dtype or state.dtype)
