"""Peak memory, measured: the RSS high-water mark above a baseline on CPU, allocator peak on CUDA.

On Linux, writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so a
measurement can start from "now" instead of from process start.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`start()` before the model loads; `peak()` = bytes above that baseline at the high-water mark."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.baseline = 0

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.baseline = rss_bytes()
        return self

    def reset_peak(self) -> None:
        """Forget the high-water mark so far (e.g. a load spike), keeping the baseline."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.baseline
        return max(0, peak_rss_bytes() - self.baseline)

    def summary(self) -> dict:
        kind = "cuda_max_memory_allocated" if self.cuda else "rss_high_water_mark"
        return {"kind": kind, "baseline_bytes": self.baseline, "peak_above_baseline_bytes": self.peak()}
