"""The batched LoRA op for a decode step on a CPU: one numba kernel call per layer, row by row
(Punica's BGMV, Chen et al., 2023, arXiv:2310.18547), reading each row's adapter once, in the
slots' own dtype (fp32, or bf16 bits widened to fp32 in registers), accumulating in fp32.

`lora_ops.lora_grouped` runs a decode step's adapters as bmm, scale, baddbmm: three calls per
layer and, for bf16 slots on a CPU without AMX, bf16 kernels 4-6x slower than fp32 ones
(BENCHMARKS.md). A decode step's adapter work is bytes, not FLOPs (16 rows x r=16 against 19.5 MB
of fp32 slots per adapter), so reading the slots once, in half the bytes where the base is bf16,
is what bounds it. Per row i with slot k = idx[i] >= 0 and rank r = ranks[k]:

    out[i] += scale[k] * (x[i] @ A[k, :r].T) @ Bt[k, :r]       (A (S, r_max, d_in), Bt (S, r_max, d_out))

rows across threads; rows with idx -1 untouched. `lora_ops.lora_reference` is the oracle
(tests/serve/test_lora_rows.py). Used for steps of at most `MAX_ROWS` rows (decodes, short
chunks); longer prompt chunks keep the grouped bmm path, where a matmul beats a row loop.
What this does not do: DoRA's rescaling (the caller applies it after, per row), GPUs.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import numpy as np
import torch

from .decode_attention import DTYPES, raw

MAX_ROWS = 64           # above this many rows per layer call, the grouped bmm path
prange = range          # numba.prange once compiled
_widen = None           # fp32 value, or bf16 bits -> fp32 (decode_attention's intrinsic)


@lru_cache(maxsize=None)
def kernel():
    """The compiled `lora_rows`, or None without numba."""
    global prange, _widen
    if importlib.util.find_spec("numba") is None:
        return None
    import numba

    from .decode_attention import _intrinsics
    _widen = _intrinsics()[1]
    prange = numba.prange
    return numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)(lora_rows)


def lora_rows(x, idx, A, Bt, scale, ranks, out):
    """out[i] += scale[k] (x[i] A[k,:r]^T) Bt[k,:r] for every row i with k = idx[i] >= 0 (module notes)."""
    d_in, d_out, r_max = x.shape[1], out.shape[1], A.shape[1]
    for i in prange(x.shape[0]):
        k = idx[i]
        if k < 0 or ranks[k] == 0:
            continue
        r = ranks[k]
        xi = np.empty(d_in, np.float32)
        for c in range(d_in):
            xi[c] = _widen(x[i, c])
        h = np.empty(r_max, np.float32)
        for j in range(r):
            acc = np.float32(0)
            a = A[k, j]
            for c in range(d_in):
                acc += xi[c] * _widen(a[c])
            h[j] = acc * scale[k]
        for j in range(r):
            hj = h[j]
            b = Bt[k, j]
            for c in range(d_out):
                out[i, c] += hj * _widen(b[c])


def usable(slots_dtype: torch.dtype, x: torch.Tensor) -> bool:
    """Whether a layer call on input rows `x` (N, d_in) takes the kernel."""
    return (x.device.type == "cpu" and x.shape[0] <= MAX_ROWS and slots_dtype in DTYPES and x.dtype in DTYPES
            and kernel() is not None)


def apply(y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
          scale: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """y (N, d_out) plus every row's adapter, summed in fp32; y itself when it is fp32, else a new tensor
    of y's dtype. A, Bt, scale: a layer's slot tensors; ranks (S,) int64."""
    out = y if y.dtype == torch.float32 and y.is_contiguous() else y.float()
    kernel()(raw(x.contiguous()), idx.numpy(), raw(A), raw(Bt), scale.float().numpy(), ranks.numpy(), out.numpy())
    return out if out is y else out.to(y.dtype)
