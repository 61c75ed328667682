"""One-pass CPU kernels (numba) for 8-bit blockwise dequantize and nearest-rounding quantize.

The same arithmetic as `blockwise.dequantize_blockwise` and `blockwise.quantize_blockwise(...,
rounding="nearest")`, value for value: code[c] * absmax; absmax = max |x| per block (NaN
propagates, as torch's amax does); full blocks scaled by the fp32 reciprocal of max(absmax, 1e-38),
the short last block divided by it (and its absmax stored clamped); clamp to [-1, 1]; the bucket by
the 64K-entry table of the value's top 16 bits and one comparison (`blockwise.nearest`). Every step
is one IEEE fp32 operation or an integer one, so the codes and absmax are bit-equal to the torch
path (tests/optim/test_fused.py holds them to it). What they save is the torch path's dozen passes
and int64 temporaries per value: one read and one write per value, blocks across threads.

`kernels()` compiles them on first use (numba caches the machine code beside this file: ~4 s the
first time on a machine, ~1 s to load after) and returns None where numba is not installed;
callers keep the torch path then.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import numpy as np

TINY = np.float32(1e-38)     # what the torch path clamps a block's absmax to before dividing
prange = range               # numba.prange once `kernels()` compiles: blocks across threads


@lru_cache(maxsize=None)
def kernels():
    """(dequantize, quantize_nearest) compiled, or None without numba."""
    global prange
    if importlib.util.find_spec("numba") is None:
        return None
    import numba
    prange = numba.prange
    jit = numba.njit(parallel=True, cache=True, nogil=True)
    return jit(dequantize), jit(quantize_nearest)


def dequantize(codes, absmax, code, blocksize, out):
    """out[i] = code[codes[i]] * absmax[i // blocksize]; all 1-D, out fp32."""
    n = codes.size
    for b in prange((n + blocksize - 1) // blocksize):
        a = absmax[b]
        for i in range(b * blocksize, min(n, (b + 1) * blocksize)):
            out[i] = code[codes[i]] * a


def quantize_nearest(x, blocksize, table, ext, never_zero, codes, absmax):
    """codes (uint8) and absmax (fp32 per block) of fp32 `x`, nearest rounding. `table` and `ext`
    are `blockwise.nearest`'s (int32 bucket per top-16-bit pattern; bounds then +inf).
    `never_zero`: a positive value never takes code 0 (the optimizer's v, see adamw8bit)."""
    n = x.size
    full = n // blocksize
    for b in prange((n + blocksize - 1) // blocksize):
        s, e = b * blocksize, min(n, (b + 1) * blocksize)
        am = np.float32(0)
        for i in range(s, e):
            a = abs(x[i])
            if a > am or a != a:           # NaN sticks, as in torch's amax
                am = a
        clamped = am if not am < TINY else TINY
        scaled = np.empty(e - s, np.float32)
        if b < full:
            absmax[b] = am
            r = np.float32(1) / clamped
            for i in range(s, e):
                scaled[i - s] = x[i] * r
        else:
            absmax[b] = clamped
            for i in range(s, e):
                scaled[i - s] = x[i] / clamped
        for j in range(e - s):
            if scaled[j] > 1:
                scaled[j] = 1
            elif scaled[j] < -1:
                scaled[j] = -1
        bits = scaled.view(np.int32)
        for j in range(e - s):
            k = table[(bits[j] >> 16) & 0xFFFF]
            if scaled[j] > ext[k]:
                k += 1
            if never_zero and k == 0 and x[s + j] > 0:
                k = 1
            codes[s + j] = k
