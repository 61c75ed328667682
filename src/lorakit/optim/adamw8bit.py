"""AdamW with both moments stored blockwise-quantized in 8 bits (Dettmers et al., 2021, arXiv:2110.02861).

Each step, per parameter and in chunks of whole blocks: dequantize the first moment m (signed
dynamic codebook) and the second moment v (unsigned dynamic codebook, v >= 0) to fp32, run the
exact torch.optim.AdamW update on them (decoupled weight decay p *= 1 - lr*wd, bias correction),
and quantize them again with a fresh absmax per block. The update itself sees fp32 moments; only
what is carried to the next step is rounded, to the nearest of 256 codes scaled by the block's
absmax, so the error stays relative to each block's largest value (one exception: a positive v is
never stored as zero, see `adamw8bit_update`).

Memory per parameter: one uint8 code per moment (2 bytes) plus two fp32 absmax per block of
`blocksize` values (8/2048 = 0.004 bytes at the default), against 8 bytes for fp32 AdamW. Tensors
with fewer than `min_8bit_size` elements (biases, norms) keep fp32 moments, as bitsandbytes does:
their constants would cost more than they save and they are the most sensitive to noise. fp32
temporaries are bounded by CHUNK elements whatever the parameter size.

On CPU, with numba installed, dequantize and quantize run as one-pass kernels (`quant/fused.py`)
that give the torch path's codes bit for bit; the update between them stays torch's own ops.
What it does not do: the paper's stable embedding layer, percentile clipping, or a fused update.
Paged optimizers (bitsandbytes' PagedAdamW, which put the state in CUDA unified memory so the
driver can evict it to host RAM under GPU memory pressure) have no meaning on CPU, where the state
already lives in host RAM; none is offered here.
"""
from __future__ import annotations

from functools import lru_cache
from itertools import chain

import torch

from ..quant import fused
from ..quant.blockwise import BlockState, _bucket_table, dequantize_blockwise, dynamic_map, quantize_blockwise

BLOCKSIZES = (256, 2048, 4096)   # 256: bitsandbytes' fixed block size, for like-for-like comparisons
CHUNK = 1 << 20          # elements updated at once: fp32 temporaries of 4 MB each (also the fastest on CPU)


@lru_cache(maxsize=None)
def codebooks(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed dynamic map (for m) and the unsigned one (for v >= 0, code 0 is 0.0), on `device`."""
    return dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device)


@lru_cache(maxsize=None)
def fused_tables() -> tuple | None:
    """For `quant.fused` on CPU: its two compiled kernels, then (signed code, its bucket table, its
    bounds + inf, the same three for unsigned) as numpy arrays, the ones `blockwise.nearest` builds;
    None (numba missing): the torch path."""
    compiled = fused.kernels()
    if compiled is None:
        return None
    out = list(compiled)
    for code in codebooks(torch.device("cpu")):
        bounds = (code[:-1] + code[1:]) / 2
        table = _bucket_table(bounds.numpy().tobytes())
        if table is None:
            return None
        out += [code.numpy(), table.numpy(), torch.cat([bounds, bounds.new_full((1,), float("inf"))]).numpy()]
    return tuple(out)


def adamw_fp32(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: float, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update in place on fp32 tensors of one shape: the op sequence of torch's single-tensor AdamW."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def adamw8bit_update(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                     v_codes: torch.Tensor, v_absmax: torch.Tensor, *, blocksize: int, chunk: int = CHUNK,
                     **hyper) -> None:
    """`adamw_fp32` on the dequantized moments, requantized in place, `chunk` elements (whole blocks) at a time.

    p and the codes are contiguous and shaped alike; m_absmax and v_absmax hold one fp32 per block
    of `blocksize` elements of the flattened tensor. `hyper` are `adamw_fp32`'s keywords.
    """
    n = p.numel()
    if m_absmax.numel() != -(-n // blocksize) or v_absmax.numel() != m_absmax.numel():
        raise ValueError(f"8-bit state for a parameter of {n} elements has {m_absmax.numel()} and "
                         f"{v_absmax.numel()} absmax values; blocksize {blocksize} needs {-(-n // blocksize)}")
    flat_p, flat_g = p.view(-1), grad.reshape(-1)
    flat_m, flat_v = m_codes.view(-1), v_codes.view(-1)
    step = max(1, chunk // blocksize) * blocksize
    tables = fused_tables() if p.device.type == "cpu" else None
    for start in range(0, n, step):
        end, b0, b1 = min(start + step, n), start // blocksize, -(-min(start + step, n) // blocksize)
        part = flat_p[start:end]
        work = part if part.dtype == torch.float32 else part.float()
        if tables is not None:
            _fused_chunk(work, flat_g[start:end].float(), flat_m[start:end], m_absmax[b0:b1], flat_v[start:end],
                         v_absmax[b0:b1], blocksize, tables, hyper)
        else:
            _torch_chunk(work, flat_g[start:end].float(), flat_m[start:end], m_absmax[b0:b1], flat_v[start:end],
                         v_absmax[b0:b1], blocksize, hyper)
        if work is not part:
            part.copy_(work)


def _fused_chunk(p, g, m_codes, m_absmax, v_codes, v_absmax, blocksize: int, tables: tuple, hyper: dict) -> None:
    """One chunk of `adamw8bit_update` with the moments read and written by `quant.fused`'s kernels."""
    dequantize, quantize, signed, s_table, s_ext, unsigned, u_table, u_ext = tables
    m, v = torch.empty_like(p), torch.empty_like(p)
    dequantize(m_codes.numpy(), m_absmax.numpy(), signed, blocksize, m.numpy())
    dequantize(v_codes.numpy(), v_absmax.numpy(), unsigned, blocksize, v.numpy())
    adamw_fp32(p, g, m, v, **hyper)
    quantize(m.numpy(), blocksize, s_table, s_ext, False, m_codes.numpy(), m_absmax.numpy())
    quantize(v.numpy(), blocksize, u_table, u_ext, True, v_codes.numpy(), v_absmax.numpy())


def _torch_chunk(p, g, flat_m, m_absmax, flat_v, v_absmax, blocksize: int, hyper: dict) -> None:
    """One chunk of `adamw8bit_update` in torch ops (any device)."""
    signed, unsigned = codebooks(p.device)
    m = dequantize_blockwise(flat_m, BlockState(m_absmax, signed, blocksize, torch.float32))
    v = dequantize_blockwise(flat_v, BlockState(v_absmax, unsigned, blocksize, torch.float32))
    adamw_fp32(p, g, m, v, **hyper)
    flat_m[:], state = quantize_blockwise(m, blocksize, signed)
    m_absmax[:] = state.absmax
    codes, state = quantize_blockwise(v, blocksize, unsigned)
    # A positive v never rounds to code 0 (the value 0) but to code 1 (3.3e-7 x absmax): m is
    # quantized on its own scale and can stay nonzero, and m / (sqrt(0) + eps) is a step of
    # lr * m / eps, thousands of times too large. Rounding v up only shortens the step.
    flat_v[:] = codes.masked_fill_((codes == 0) & (v > 0), 1)
    v_absmax[:] = state.absmax


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW with 8-bit blockwise moments for tensors of at least `min_8bit_size` elements.

    State per parameter, all plain tensors (a checkpoint that saves and restores them by key
    round-trips): `step` (fp32 scalar, as torch's), then either `exp_avg_codes`, `exp_avg_absmax`,
    `exp_avg_sq_codes`, `exp_avg_sq_absmax` (uint8 shaped like the parameter, fp32 per block) or,
    below `min_8bit_size`, fp32 `exp_avg` and `exp_avg_sq`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, blocksize: int = 2048, min_8bit_size: int = 4096):
        if not lr > 0:
            raise ValueError(f"AdamW8bit: lr must be > 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"AdamW8bit: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"AdamW8bit: weight_decay must be >= 0, got {weight_decay}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"AdamW8bit: blocksize {blocksize} is not supported; choose one of {list(BLOCKSIZES)}")
        if min_8bit_size < 1:
            raise ValueError(f"AdamW8bit: min_8bit_size must be >= 1, got {min_8bit_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.blocksize, self.min_8bit_size = blocksize, min_8bit_size

    def init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if p.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            return state
        blocks = -(-p.numel() // self.blocksize)
        for name in ("exp_avg", "exp_avg_sq"):   # zero absmax: every code dequantizes to 0
            state[f"{name}_codes"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients; use torch.optim.SparseAdam")
                state = self.state[p] or self.init_state(p)
                state["step"] += 1
                hyper = dict(step=state["step"].item(), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"])
                target = p if p.is_contiguous() else p.contiguous()
                if "exp_avg" in state:
                    work = target if target.dtype == torch.float32 else target.float()
                    adamw_fp32(work, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], **hyper)
                    if work is not target:
                        target.copy_(work)
                else:
                    adamw8bit_update(target, p.grad, state["exp_avg_codes"], state["exp_avg_absmax"],
                                     state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], blocksize=self.blocksize,
                                     **hyper)
                if target is not p:
                    p.copy_(target)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then the state tensors again as saved: torch casts every floating-point
        state tensor to the parameter's dtype, which would turn uint8 codes into floats."""
        super().load_state_dict(state_dict)
        saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in `optimizer.state` (any optimizer); a tensor shared by several
    parameters (bitsandbytes' codebooks) counts once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel():
                key = (value.device, value.data_ptr(), value.numel(), value.dtype)
                if key not in seen:
                    seen.add(key)
                    total += value.numel() * value.element_size()
    return total
