"""Peak memory, measured: the RSS high-water mark above a baseline on CPU, allocator peak on CUDA,
and (opt-in, any device) the peak of live tensor bytes, counted op by op.

On Linux, writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so a
measurement can start from "now" instead of from process start.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after
which activation-sized tensors come from the heap and their memory stays with the process when
freed: on SmolLM2 that inflates training RSS by ~0.9 GB over what autograd actually keeps.
`return_freed_memory()` (the trainer's `release_memory` option) pins the threshold, as
MALLOC_MMAP_THRESHOLD_ would, so blocks of 64 KiB and more are mmapped and go back to the OS on
free. Measured on SmolLM2, 4x128 tokens: peak RSS 2.15 -> 1.39 GB, step time 2.05 -> 3.9 s (every
step faults its activations in afresh), hence opt-in.
"""
from __future__ import annotations

import ctypes
import weakref
import ctypes.util
import resource
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Serve allocations >= `threshold` bytes with mmap, so freed tensors leave RSS. glibc only."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError, TypeError):   # not glibc (musl, macOS): nothing to tune
        return False
    return ok


def trim_heap() -> bool:
    """Hand freed heap memory back to the OS now (glibc `malloc_trim`), e.g. after quantizing a
    loaded float model, whose freed weights would otherwise stay in RSS. False off glibc."""
    import gc
    gc.collect()
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0) == 1
    except (OSError, AttributeError, TypeError):
        return False


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


class TensorPeak(TorchDispatchMode):
    """The most tensor bytes alive at once while active: CUDA's `max_memory_allocated`, on any device.

    Every tensor an aten op returns is counted once per storage (views share their base's) until
    that storage is freed, which a weak reference reports. `seed()` adds tensors that existed
    before (the model's weights). Allocator overheads (rounding, caching, a heap keeping freed
    pages) are not tensor bytes and are not counted: this is what the planner predicts, and the
    RSS or allocator peak minus this is what the allocator costs. Python work per op: a few
    percent of a step on SmolLM2, so the trainer traces only when asked (`trace_memory`).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.sizes: dict[int, int] = {}
        self.bytes = 0
        self.peak = 0

    def __enter__(self):
        self._unwatch = _watch_fsdp_storage(self._resized)
        return super().__enter__()

    def __exit__(self, *exc):
        self._unwatch()
        return super().__exit__(*exc)

    def seed(self, tensors) -> "TensorPeak":
        for t in tensors:
            self._count(t)
        return self

    def reset_peak(self) -> None:
        self.peak = self.bytes

    def _count(self, t: torch.Tensor) -> None:
        t = _local(t)
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.sizes[key] = n
        self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def _free(self, key: int) -> None:
        if self.live.pop(key, None) is not None:
            self.bytes -= self.sizes.pop(key)

    def _resized(self, t: torch.Tensor) -> None:
        """A storage grown or freed in place (FSDP2 frees a gathered weight with resize_(0), which
        no aten op reports): count its new size."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self._count(t)
            return
        self.bytes += storage.nbytes() - self.sizes[key]
        self.sizes[key] = storage.nbytes()
        self.peak = max(self.peak, self.bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


def model_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Weights, buffers, gradients and optimizer state: what exists before a traced step."""
    for t in (*model.parameters(), *model.buffers()):
        yield t
        if t.grad is not None:
            yield t.grad
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def _watch_fsdp_storage(resized):
    """Call `resized(tensor)` after FSDP2 allocates or frees a gathered weight's storage in place;
    returns the undo. (FSDP2 does this in `alloc_storage`/`free_storage`, private names of
    torch 2.x: if they move, the tracer counts gathered weights as never freed, an overestimate.)"""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    except ImportError:
        return lambda: None
    patched = []
    for module in (_fsdp_param, _fsdp_param_group):
        for name in ("alloc_storage", "free_storage"):
            original = getattr(module, name, None)
            if original is None:
                continue

            def watched(tensor, _original=original):
                _original(tensor)
                resized(tensor)
            setattr(module, name, watched)
            patched.append((module, name, original))

    def undo():
        for module, name, original in patched:
            setattr(module, name, original)
    return undo


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding a DTensor's (an FSDP shard's) bytes on this rank; any other tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of this rank's weights, buffers, gradients and optimizer state (a shard's, when sharded)."""
    seen, total = set(), 0
    for t in model_tensors(model, optimizer):
        storage = _local(t).untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total
