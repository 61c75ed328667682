"""A frozen 4-bit base: `Linear4bit` holds NF4 codes and constants, dequantizes on the fly.

The layer keeps only the packed codes, the (double-quantized) constants and the bias: ~0.52 bytes
per weight instead of 4. Each forward dequantizes the weight into the compute dtype, multiplies,
and lets the temporary go; backward dequantizes again to pass the gradient to the input (the
weight itself never trains), so no float copy of any weight outlives a matmul. LoRA wraps a
`Linear4bit` like any linear layer: that is QLoRA (Dettmers et al., 2023).

State-dict keys are bitsandbytes' (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so a
layer saved here loads into `bitsandbytes.nn.Linear4bit` and the reverse.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .. import linear
from .blockwise import BlockState
from .nf4 import NESTED_BLOCKSIZE, NF4State, dequantize_nf4, quantize_nf4

_QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4 in forward and again in backward (nothing float saved)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, dtype):
        ctx.state, ctx.dtype = state, dtype
        ctx.save_for_backward(packed)
        return F.linear(x, dequantize_nf4(packed, state, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        grad_x = grad @ dequantize_nf4(packed, ctx.state, ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class Linear4bit(nn.Module):
    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, state: NF4State,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"NF4 state shape {tuple(state.shape)} does not match ({out_features}, {in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", packed)          # uint8 (ceil(n/2), 1), as bitsandbytes stores it
        self.quant_state = state
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, layer: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32, name: str = "layer") -> "Linear4bit":
        """Quantize a float base linear layer (nn.Linear, GPT-2's Conv1D) into a new Linear4bit."""
        with torch.no_grad():
            w = linear.dense_weight(layer)                                   # (d_out, d_in)
            packed, state = quantize_nf4(w.detach().contiguous(), blocksize, double_quant, name=f"{name}.weight")
            bias = None if layer.bias is None else layer.bias.detach().clone()
        d_out, d_in = w.shape
        return cls(d_in, d_out, packed, state, bias, compute_dtype)

    @classmethod
    def shell(cls, layer: nn.Module, compute_dtype: torch.dtype = torch.float32) -> "Linear4bit":
        """An empty Linear4bit shaped like `layer`, to be filled by `load_state_dict`."""
        w = linear.dense_weight(layer)                                       # (d_out, d_in)
        n = w.numel()
        state = NF4State(torch.zeros(-(-n // 64)), 64, w.shape, w.dtype)
        bias = None if layer.bias is None else torch.zeros_like(layer.bias)
        return cls(w.shape[1], w.shape[0], torch.zeros(-(-n // 2), 1, dtype=torch.uint8), state, bias, compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight as floats (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain float nn.Linear with this layer's dequantized weight (or `weight`) and bias."""
        w = self.dequantize() if weight is None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = _NF4Linear.apply(x.to(dtype), self.weight, self.quant_state, bias, dtype)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.quant_state = self.quant_state.to(self.weight.device)   # constants follow .to(device)
        return self

    def nbytes(self) -> int:
        """Bytes this layer holds for its weight: packed codes and constants (the bias excluded)."""
        return self.quant_state.nbytes(self.weight)

    # -- bitsandbytes-compatible state dict --------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in state_tensors(self.quant_state).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wp = prefix + "weight."
        mine = {k[len(wp):]: state_dict[k] for k in list(state_dict) if k.startswith(wp)}
        if mine:
            try:
                self.quant_state = state_from_tensors(mine, where=prefix + "weight")
            except ValueError as e:
                error_msgs.append(str(e))
                return
            if tuple(self.quant_state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: quantized shape {tuple(self.quant_state.shape)}, "
                                  f"the layer is ({self.out_features}, {self.in_features})")
                return
            if prefix + "weight" in state_dict:     # the packed codes may change size: take them as they are
                self.weight = state_dict[prefix + "weight"].to(torch.uint8)
        else:
            missing_keys.extend(prefix + "weight." + k for k in ("absmax", "quant_map", _QS_KEY))
        rest = {k: v for k, v in state_dict.items() if not k.startswith(wp)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={s.blocksize}, double_quant={s.double_quant}, compute_dtype={self.compute_dtype}")


linear.register(Linear4bit, linear.Kind(
    shape=lambda m: (m.in_features, m.out_features), weight=lambda m: m.dequantize(),
    write=lambda m, w: m.to_linear(w.to(m.quant_state.dtype)),        # merged weights stay float
    stored=lambda m: m.quant_state.shape))


def state_tensors(state: NF4State) -> dict[str, torch.Tensor]:
    """The quant state as bitsandbytes serialises it (its packed form, safetensors-friendly)."""
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": str(state.dtype).replace("torch.", ""),
            "shape": list(state.shape)}
    out = {"absmax": state.absmax, "quant_map": state.code.clone()}
    if state.nested is not None:
        out["nested_absmax"] = state.nested.absmax
        out["nested_quant_map"] = state.nested.code.clone()
        meta.update(nested_blocksize=state.nested.blocksize, nested_dtype=str(state.nested.dtype).replace("torch.", ""),
                    nested_offset=state.offset.item())
    out[_QS_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def state_from_tensors(tensors: dict[str, torch.Tensor], where: str = "weight") -> NF4State:
    """Rebuild an NF4State from bitsandbytes-style keys (prefix removed); names what is missing."""
    needed = ["absmax", "quant_map", _QS_KEY]
    missing = [k for k in needed if k not in tensors]
    try:
        meta = json.loads(bytes(tensors[_QS_KEY].to(torch.uint8).tolist()).decode()) if _QS_KEY in tensors else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}.{_QS_KEY}: not a bitsandbytes quant state ({e})") from None
    nested = "nested_offset" in meta
    if nested:
        missing += [k for k in ("nested_absmax", "nested_quant_map") if k not in tensors]
    if missing:
        raise ValueError(f"{where}: the quantized checkpoint lacks {[f'{where}.{k}' for k in missing]}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{where}: quant_type {meta.get('quant_type')!r} is not supported (lorakit reads nf4)")
    state = NF4State(tensors["absmax"], int(meta["blocksize"]), torch.Size(meta["shape"]), _DTYPES[meta["dtype"]],
                     tensors["quant_map"].float())
    if nested:
        state.nested = BlockState(tensors["nested_absmax"].float(), tensors["nested_quant_map"].float(),
                                  int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
                                  _DTYPES[meta.get("nested_dtype", "float32")])
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    return state
