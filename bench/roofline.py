"""The machine's limits, measured once per benchmark run, and the estimates that turn a benchmark's
figure into a fraction of the limit that binds it.

- compute: dense matmul GFLOP/s in fp32 and bf16 (square, --n 2048 by default, the threads torch uses);
- memory: bandwidth of a large copy (bytes read + bytes written per second);
- training and prefill are compute-bound: model FLOP utilisation (MFU) as PaLM defines it
  (Chowdhery et al. 2022, appendix B) and nanoGPT's `estimate_mfu` computes it: 6 N FLOPs per token
  for forward + backward when all N weights train, plus 12 L H T for attention (L layers, width H,
  context T). With a frozen base (LoRA) the weight gradients of the base are never computed, so the
  model FLOPs are 4 N (forward, input gradients) + 6 N_adapter + the attention term;
- decode is bandwidth-bound: a step must read every weight it uses once, so bytes per step over the
  measured bandwidth is the fastest a step can be.

    .venv/bin/python bench/roofline.py          # prints the machine's figures as JSON
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from lorakit.runtime import best_seconds

ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict:
    """The CPU model, cores and the ISA flags that decide fp32/bf16 speed (from /proc/cpuinfo)."""
    import torch

    info = {"machine": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["model"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line for line in lines if line.startswith("flags")).split(":", 1)[1].split())
        info["flags"] = [f for f in ISA if f in flags]
    except (OSError, StopIteration):
        info["model"], info["flags"] = platform.processor() or "unknown", []
    return info


def matmul_gflops(n: int = 2048, dtype: str = "float32", repeat: int = 5) -> float:
    """Dense (n x n) @ (n x n) GFLOP/s: 2 n^3 FLOPs per product, the best of `repeat`."""
    import torch

    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeat) / 1e9


def bandwidth_gbs(mb: int = 512, repeat: int = 5) -> float:
    """Memory bandwidth of a `mb` MB copy: (read + write) bytes per second, in GB/s (1e9)."""
    import torch

    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), repeat) / 1e9


def machine(n: int = 2048) -> dict:
    """Everything above, once: what every benchmark of the run divides by."""
    return {"cpu": cpu_info(), "matmul_n": n, "fp32_gflops": matmul_gflops(n, "float32"),
            "bf16_gflops": matmul_gflops(n, "bfloat16"), "bandwidth_gbs": bandwidth_gbs()}


def train_flops_per_token(params: int, layers: int, hidden: int, context: int, trainable: int | None = None) -> float:
    """Model FLOPs per trained token (PaLM appendix B; nanoGPT's estimate_mfu). `trainable`: the adapter's
    parameters when the base is frozen (None: every weight trains)."""
    attention = 12 * layers * hidden * context
    if trainable is None:
        return 6 * params + attention
    return 4 * params + 6 * trainable + attention


def mfu(tokens_per_s: float, flops_per_token: float, peak_gflops: float) -> float:
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)


def decode_floor_seconds(bytes_per_step: float, bandwidth: float) -> float:
    """The fastest a decode step can be: every byte it must read, read once at the measured bandwidth."""
    return bytes_per_step / (bandwidth * 1e9)


def decode_bound(rows: int, params: int, adapter_params: int, weight_bytes: float, adapter_bytes: float,
                 limits: dict, dtype: str) -> dict:
    """The two floors of one decode step of `rows` sequences, each on its own adapter: reading the
    base once and every adapter once (bytes / bandwidth), and its matmul FLOPs (2 per weight per row,
    base and adapter) at the dtype's measured peak. A few rows per step are bytes-bound; on a
    2-core CPU 16 rows already cross the machine balance (peak / bandwidth) and are compute-bound."""
    byte_s = decode_floor_seconds(weight_bytes + rows * adapter_bytes, limits["bandwidth_gbs"])
    flop_s = 2 * rows * (params + adapter_params) / (limits[f"{dtype}_gflops"] * 1e9)
    return {"bytes_s": byte_s, "flops_s": flop_s, "floor_s": max(byte_s, flop_s),
            "binds": "bytes" if byte_s >= flop_s else "compute"}


if __name__ == "__main__":
    print(json.dumps(machine(), indent=2))
