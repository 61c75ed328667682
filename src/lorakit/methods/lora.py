"""LoRA: h = W0 x + s * B A dropout(x), s = alpha/r (or alpha/sqrt(r) with rsLoRA).

B starts at zero so the adapter starts as a no-op (Hu et al., 2021, arXiv:2106.09685, sec. 4.1);
rsLoRA scaling from Kalajdzievski, 2023, arXiv:2312.03732. Dropout masks the input x, not A.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, WeightAdapter, sum_dtype


class LoraAdapter(WeightAdapter):
    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0,
                 init: str = "default", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.r, self.scale = r, scale
        self.A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))   # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))  # (d_out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / r)
        else:  # what nn.Linear does to its own weight
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):             # under autocast the matmul casts x itself
            x = x.to(self.A.dtype)
        mid = F.linear(self.dropout(x), self.A)                # (..., d_in) -> (..., r)
        dt = sum_dtype(base_out, self.A.dtype)
        if dt != self.A.dtype:                                 # a half-precision base without autocast
            return base_out + (self.scale * F.linear(mid, self.B)).to(dt)
        with torch.autocast(device, enabled=False):            # W0 x + s B mid in one fused addmm, in fp32
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]).to(dt), mid.reshape(-1, self.r).to(dt),
                              self.B.t(), alpha=self.scale)
        return out.view(base_out.shape)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.B @ self.A)                  # (d_out, d_in)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, d_in={self.A.shape[1]}, d_out={self.B.shape[0]}"
