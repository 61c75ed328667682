"""Blockwise absmax quantization onto a sorted codebook, and the 8-bit dynamic codebook.

A tensor is flattened and cut into blocks of `blocksize` values (the last block may be short). Each
block is scaled by 1/absmax into [-1, 1] and every value is replaced by the index of the nearest
code; a value exactly halfway between two codes takes the lower one. Dequantization is
`code[index] * absmax` in fp32. These rules, the codebooks and the memory layout are the ones
bitsandbytes uses, so codes, scales and files are interchangeable with it: tests check bit equality
against its reference kernel and its 4-bit path. (Its CPU library quantizes 8-bit codes with an
approximate bucket search that picks a farther code for ~0.2% of values with the signed map and
~4% with the unsigned one, never the nearer; stored bits dequantize identically in both libraries.)

The 8-bit dynamic codebook (Dettmers, 2015, arXiv:1511.04561; used for optimizer state and for
QLoRA's second-level quantization of the absmax constants) spends one sign bit, a unary exponent
that scales by powers of ten, and the remaining bits on a linear fraction, so it resolves values
from 1e-7 to 1 with roughly constant relative error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 1 << 22          # elements per chunk: bounds temporaries to a few x 16 MB whatever the tensor size


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


def absmax_codes(flat: torch.Tensor, blocksize: int, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest-code index per value as int64, fp32 absmax per block) for a 1-D tensor.

    `bounds` are the midpoints between consecutive codes; `bucketize` puts a value equal to a
    midpoint into the lower bucket. Runs in chunks of whole blocks to bound temporary memory.
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
            am = part[full:].abs().amax().clamp(min=1e-38)
            absmax[-1] = am
            pieces.append(torch.clamp(part[full:] / am, -1, 1))
        scaled = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        idx[start:start + part.numel()] = nearest(scaled, bounds)
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


def quantize_blockwise(tensor: torch.Tensor, blocksize: int = 4096, code: torch.Tensor | None = None,
                       allowed=(64, 128, 256, 512, 1024, 2048, 4096)) -> tuple[torch.Tensor, BlockState]:
    """8-bit blockwise quantization: (uint8 codes shaped like `tensor`, BlockState)."""
    check(tensor, blocksize, allowed)
    code = dynamic_map() if code is None else code
    code = code.to(tensor.device)
    idx, absmax = absmax_codes(tensor.reshape(-1), blocksize, (code[:-1] + code[1:]) / 2)
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
