"""Frozen base linear layers with their weights prepacked for oneDNN, for serving on a CPU.

`F.linear` on a CPU calls MKL's sgemm, which repacks the weight into its blocked layout on every
call; for the short, wide products of serving (a decode step is N rows of (N, 576) @ (576, 1536)
on SmolLM2) that repacking and MKL's choice of kernel cost as much as the product. oneDNN can pack
a weight once (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing does)
and multiply by the packed form afterwards. Measured on a 2-core AMD EPYC, fp32, 2 threads:
16 x 576 @ 576 x 1536 in 170 us against 300 us, the 49,152-wide head 6.3 ms against 20 ms.

`PackedLinear` replaces an `nn.Linear` in a served model: it keeps only the packed weight (the
dense one is freed; `linear.dense_weight` answers with an unpacked copy, e.g. for DoRA's norms when
an adapter is loaded) and the bias. Whether packing pays is measured on the machine itself
(`packing_pays`: one of the model's own layers, both ways, at the decode batch) rather than assumed
per CPU; `lorakit serve --pack-weights` overrides it. Values agree with `F.linear` to fp32 rounding
(a different summation order), not bit for bit.
What this does not do: training (the backward would need a second packed copy of each weight),
GPUs, quantized or GPT-2 `Conv1D` layers (left as they are).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import linear
from ..runtime import best_seconds

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An inference-only linear layer over a oneDNN-packed weight; same call as the `nn.Linear` it replaces."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype = layer.weight.dtype
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def unpacked(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight: a fresh copy."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, oneDNN-packed"


def _write(layer: PackedLinear, w: torch.Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.requires_grad_(False)


linear.register(PackedLinear, linear.Kind(
    shape=lambda m: (m.in_features, m.out_features),
    weight=PackedLinear.unpacked,
    write=_write,
    stored=lambda m: (m.out_features, m.in_features),
))


def packable(layer: nn.Module) -> bool:
    """A plain frozen nn.Linear on the CPU in fp32 or bf16."""
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and w.device.type == "cpu" and w.dtype in DTYPES
            and not w.requires_grad)


@torch.inference_mode()
def packing_pays(model: nn.Module, rows: int) -> tuple[bool, str]:
    """Time the model's largest packable layer both ways on `rows` rows (a decode step's batch):
    pack when the packed product is at least 10% faster. Returns (pack, why) for the start-up line."""
    if not available():
        return False, "this torch has no oneDNN"
    layers = [m for m in model.modules() if packable(m)]
    if not layers:
        return False, "no fp32/bf16 nn.Linear on the CPU"
    layer = max((m for m in layers if m.out_features < 8 * m.in_features), default=layers[0],
                key=lambda m: m.weight.numel())          # a block's layer, not the vocabulary head
    x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
    packed = PackedLinear(layer)
    dense_s, packed_s = best_seconds(lambda: F.linear(x, layer.weight, layer.bias)), best_seconds(lambda: packed(x))
    shape = f"{rows} x {layer.in_features} @ {layer.in_features} x {layer.out_features}"
    return packed_s < 0.9 * dense_s, f"{shape}: packed {packed_s * 1e6:.0f} us, F.linear {dense_s * 1e6:.0f} us"


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every packable nn.Linear under `model` with a PackedLinear; returns how many.

    A model read from safetensors holds its weights as pages of the file's mmap, which stays mapped
    (and every page read stays resident) while any tensor of the file lives: packing reads them all.
    So the parameters left (embeddings, norms, biases) are copied once and the mapping goes away
    (measured on the embedded model: 1.85 -> 1.41 GB resident after packing)."""
    names = [name for name, m in model.named_modules() if name and packable(m)]
    for name in names:
        model.set_submodule(name, PackedLinear(model.get_submodule(name)))
    if names:
        for p in model.parameters():
            p.data = p.data.clone()
    return len(names)
