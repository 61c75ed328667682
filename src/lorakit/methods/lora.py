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
        x = self.dropout(x.to(self.A.dtype))                  # (..., d_in)
        update = F.linear(F.linear(x, self.A), self.B)         # (..., r) -> (..., d_out)
        dt = sum_dtype(base_out, self.A.dtype)
        return base_out.to(dt) + (self.scale * update).to(dt)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.B @ self.A)                  # (d_out, d_in)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, d_in={self.A.shape[1]}, d_out={self.B.shape[0]}"
