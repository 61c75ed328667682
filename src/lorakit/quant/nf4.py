"""NF4: 4-bit NormalFloat quantization with double quantization (Dettmers et al., 2023, arXiv:2305.14314).

NF4's 16 codes are quantiles of N(0, 1), normalised to [-1, 1]: 8 for the positive half, 7 for the
negative half and an exact zero (asymmetric, so zero is representable). A weight is cut into blocks
of 64 values; each block stores its absmax (fp32) and one 4-bit code per value, two per byte with the
first value in the high nibble. The absmax vector costs 32/64 = 0.5 bit per weight; double
quantization subtracts its mean and stores it blockwise (256) in 8 bits with the dynamic codebook,
plus an fp32 scale per 256 blocks: 8/64 + 32/(64*256) = 0.127 bit. 4.127 bits per weight in all.

The layout, codebooks and rounding are bitsandbytes': 4-bit codes are the nearest code (a tie goes
to the lower one); the nested absmax codes are rounded as bitsandbytes' CPU library rounds them (the
"grid" rounding of `blockwise`). A weight quantized here is byte-identical to one quantized by
bitsandbytes on CPU, and packed weights and constants move between the two libraries unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import BlockState, absmax_codes, check, dequantize_blockwise, nearest, quantize_blockwise

# The QLoRA paper's NF4 values (appendix E), as fp32: quantiles of N(0,1) at evenly spaced
# probabilities from 1 - 0.9677083 to 0.9677083, each half scaled to reach +-1 (see `nf4_from_quantiles`).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def nf4_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the NF4 codebook from normal quantiles (float64), to check the table above."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


@dataclass
class NF4State:
    """What `dequantize_nf4` needs besides the packed codes.

    absmax: fp32 per block, or (double quantization) uint8 codes of absmax - offset, undone with
    `nested` (a BlockState of fp32 scales per 256 blocks) and `offset` (fp32 scalar).
    """

    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    code: torch.Tensor = NF4_CODE
    nested: BlockState | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block (undoing double quantization if needed)."""
        if self.nested is None:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.nested, torch.float32) + self.offset

    def nbytes(self, packed: torch.Tensor | None = None) -> int:
        """Bytes of the constants (and of `packed`, if given), codebooks included."""
        n = self.absmax.numel() * self.absmax.element_size() + self.code.numel() * 4
        if self.nested is not None:
            n += self.nested.absmax.numel() * 4 + self.nested.code.numel() * 4 + 4
        return n + (packed.numel() * packed.element_size() if packed is not None else 0)

    def to(self, device) -> "NF4State":
        nested = None if self.nested is None else BlockState(self.nested.absmax.to(device), self.nested.code.to(device),
                                                             self.nested.blocksize, self.nested.dtype)
        return NF4State(self.absmax.to(device), self.blocksize, self.shape, self.dtype, self.code.to(device), nested,
                        None if self.offset is None else self.offset.to(device))


def quantize_nf4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 name: str = "tensor") -> tuple[torch.Tensor, NF4State]:
    """Quantize to NF4: (packed uint8 codes of shape (ceil(n/2), 1), NF4State)."""
    check(tensor, blocksize, NF4_BLOCKSIZES, name)
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(f"{name}: {bad} non-finite values (NaN or inf) cannot be quantized to NF4")
    bounds = _BOUNDS.to(tensor.device)
    idx, absmax = absmax_codes(tensor.reshape(-1), blocksize, lambda z: nearest(z, bounds))
    if idx.numel() % 2:                       # an odd count: pad with the code of 0.0
        idx = torch.cat([idx, idx.new_full((1,), 7)])
    idx = idx.to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)
    state = NF4State(absmax, blocksize, tensor.shape, tensor.dtype, NF4_CODE.to(tensor.device))
    if double_quant:
        offset = absmax.mean()
        codes, nested = quantize_blockwise(absmax - offset, NESTED_BLOCKSIZE, rounding="grid")
        state.absmax, state.nested, state.offset = codes, nested, offset
    return packed, state


def dequantize_nf4_reference(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain definition: unpack nibbles, look up codes, scale by each block's absmax (fp32)."""
    flat = packed.reshape(-1)
    n = state.shape.numel()
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = state.code.to(packed.device)[idx]
    absmax = state.block_absmax()
    bs = state.blocksize
    out = torch.cat([values, values.new_zeros(-n % bs)]).view(-1, bs) * absmax.unsqueeze(1)
    return out.reshape(-1)[:n].view(state.shape).to(dtype or state.dtype)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize NF4 into `dtype` (default: the original dtype), bit-equal to the reference.

    One gather per byte through a 256 x 2 table of code pairs, scaled in fp32 chunk by chunk, so
    temporaries stay at a few x 16 MB for any weight size; `out` may be a preallocated result.
    """
    dtype = dtype or state.dtype
    n, bs = state.shape.numel(), state.blocksize
    if n % bs or bs % 2:
        return dequantize_nf4_reference(packed, state, dtype)
    flat = packed.reshape(-1)
    code = state.code.to(packed.device)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)   # byte -> (high, low) codes
    absmax = state.block_absmax()
    out = torch.empty(state.shape, dtype=dtype, device=packed.device) if out is None else out
    view = out.view(-1, bs)
    step = max(1, (1 << 18) // bs)                         # blocks per chunk: 256K values, cache-sized
    for b in range(0, absmax.numel(), step):
        codes = flat[b * bs // 2:(b + step) * bs // 2].to(torch.int32)
        part = torch.index_select(pairs, 0, codes).view(-1, bs)          # the fast gather on CPU
        if dtype == torch.float32:
            torch.mul(part, absmax[b:b + step].unsqueeze(1), out=view[b:b + step])
        else:
            view[b:b + step] = part * absmax[b:b + step].unsqueeze(1)
    return out


def bits_per_parameter(packed: torch.Tensor, state: NF4State) -> float:
    """Storage per weight, codes and constants, codebooks excluded (they are per tensor, not per weight)."""
    constants = state.nbytes() - state.code.numel() * 4 - (state.nested.code.numel() * 4 if state.nested else 0)
    return 8 * (packed.numel() + constants) / state.shape.numel()
