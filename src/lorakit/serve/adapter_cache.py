"""Adapters paged disk -> RAM -> device slots, two LRU tiers (as S-LoRA and vLLM keep them).

- Registered: name -> folder, confined to one adapter root (no `..`, no absolute path or symlink
  that leaves it). Registering validates by loading, and a folder that fails leaves nothing behind.
- RAM tier: up to `max_cpu_adapters` (and optionally `max_cpu_bytes`) adapters as CPU tensors,
  least recently used evicted first. Reading from disk runs on a thread pool, one future per
  adapter: a request waits for its own adapter only, never for another tenant's.
- Device tier: up to `max_active_adapters` adapters in the served model's slots. `acquire` pins an
  adapter's slot for a running request, `release` unpins it; only unpinned slots are evicted (LRU).
  With every slot pinned, `acquire` raises `NoFreeSlot` (the scheduler should wait, not us).
Counters (hits, misses, evictions per tier, resident bytes) come out of `metrics()` as a flat dict.
A slot is written only while no request pins it, and a forward reads only its rows' slots (or
multiplies a spanned, unused one by zero rows), so `acquire` may run beside a forward.
Messages name adapters and paths relative to the root, never the server's filesystem: the full
story of a failed read goes to the server log. A failed read is `AdapterLoadError` (status 500: the
file on the server is at fault, not the request that asked for it).
What this does not do: decide which requests run (the scheduler) or speak HTTP (the API); each
error carries a `status` the API can answer with.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..io.peft_format import CONFIG_NAME, WEIGHTS_NAME
from ..state import NAME
from .slots import ServeHandle
from .weights import AdapterWeights

log = logging.getLogger(__name__)

MAX_PATH_BYTES, MAX_PART_BYTES = 4096, 255        # PATH_MAX and NAME_MAX on Linux


class AdapterError(Exception):
    status = 400


class UnknownAdapter(AdapterError):
    status = 404

    @classmethod
    def named(cls, name: str) -> "UnknownAdapter":
        return cls(f"no adapter named {name!r} is registered")


class AdapterExists(AdapterError):
    status = 400


class AdapterPathError(AdapterError):
    status = 400


class AdapterLoadError(AdapterError):
    status = 500


class NoFreeSlot(AdapterError):
    status = 503


def confine(root: Path, lora_path) -> Path:
    """The real folder `lora_path` names (relative to `root`, or absolute), if it lies inside `root`."""
    if not isinstance(lora_path, (str, Path)) or not str(lora_path).strip():
        raise AdapterPathError("lora_path must be a non-empty string")
    shown = _short(str(lora_path))
    try:
        raw = str(lora_path).encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterPathError(f"lora_path {shown}: not valid UTF-8 (it cannot name a folder here)") from None
    if b"\x00" in raw:
        raise AdapterPathError(f"lora_path {shown}: contains a NUL character")
    if len(raw) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_PART_BYTES for part in Path(lora_path).parts):
        raise AdapterPathError(f"lora_path {shown}: longer than {MAX_PATH_BYTES} bytes, or a part longer than "
                               f"{MAX_PART_BYTES}")
    p = Path(lora_path)
    if ".." in p.parts:
        raise AdapterPathError(f"lora_path {shown} contains '..'; adapter paths must stay inside the adapter root")
    root_real = root.resolve()
    if p.is_absolute() and not (p.is_relative_to(root) or p.is_relative_to(root_real)):
        raise AdapterPathError(f"lora_path {shown} is outside the adapter root")
    try:
        real = (p if p.is_absolute() else root / p).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):       # missing, too long, a symlink loop
        raise AdapterPathError(f"lora_path {shown}: no such folder in the adapter root") from None
    if not real.is_relative_to(root_real):
        raise AdapterPathError(f"lora_path {shown} leaves the adapter root through a symlink")
    if not real.is_dir():
        raise AdapterPathError(f"lora_path {shown} is not a folder")
    for f in (CONFIG_NAME, WEIGHTS_NAME):       # the files themselves may be symlinks too
        if (real / f).exists() and not (real / f).resolve().is_relative_to(root_real):
            raise AdapterPathError(f"lora_path {shown}: {f} leaves the adapter root through a symlink")
    return real


def _short(text: str, limit: int = 80) -> str:
    """A client's string for a message: repr'd (NULs and surrogates visible), cut to `limit`."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


@dataclass
class _Entry:
    path: Path        # the real folder, checked at registration and again before every read
    given: str        # the path as registered, to check again
    gen: int          # a new number per registration, so a stale load never fills a newer entry


class AdapterCache:
    """Registered adapters -> RAM (LRU) -> device slots (LRU among the unpinned) for one `ServeHandle`."""

    def __init__(self, handle: ServeHandle, adapter_root: str | Path, max_cpu_adapters: int = 32,
                 max_active_adapters: int | None = None, max_cpu_bytes: int | None = None, workers: int = 2,
                 loader: Callable[[str, Path], AdapterWeights] | None = None, reserved=("base",)):
        active = handle.n_slots if max_active_adapters is None else max_active_adapters
        if not 1 <= active <= handle.n_slots:
            raise ValueError(f"max_active_adapters = {active}: the model has {handle.n_slots} slots")
        if max_cpu_adapters < 1:
            raise ValueError(f"max_cpu_adapters = {max_cpu_adapters} must be >= 1")
        self.handle, self.root = handle, Path(adapter_root).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"adapter root {self.root} is not a folder")
        self.max_cpu, self.max_cpu_bytes, self.max_active = max_cpu_adapters, max_cpu_bytes, active
        self.reserved = set(reserved)
        self._loader = loader or (lambda name, path: handle.read(path, name))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-adapter-load")
        self._lock = threading.RLock()
        self._gen = 0
        self._registry: dict[str, _Entry] = {}
        self._cpu: OrderedDict[str, AdapterWeights] = OrderedDict()   # LRU first
        self._loading: dict[str, tuple[int, Future]] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()          # LRU first
        self._slot_nbytes: dict[str, int] = {}
        self._free = list(range(active))[::-1]
        self._pins: dict[str, int] = {}
        self._retiring: set[str] = set()                               # unregistered while pinned
        self._counts = dict.fromkeys(("cpu_hits", "cpu_misses", "cpu_evictions", "device_hits", "device_misses",
                                      "device_evictions", "loads", "load_errors"), 0)

    # -- registry -----------------------------------------------------------------------------
    def register(self, name: str, lora_path, load: bool = True, check: bool = False) -> None:
        """Register `name` -> `lora_path` (inside the adapter root). With `load`, read it now and roll
        the registration back if it fails (the API's POST /v1/load_lora_adapter); with `check`, check
        its config and tensor header against the served model first (start-up: no weights read)."""
        if not isinstance(name, str) or not NAME.match(name) or name in self.reserved:
            raise AdapterError(f"lora_name {_short(str(name))}: use 1-128 letters, digits, '_' or '-'"
                               + (f", and not {sorted(self.reserved)}" if self.reserved else ""))
        path = confine(self.root, lora_path)
        if check:
            try:
                self.handle.check(path)
            except Exception as e:
                raise AdapterLoadError(f"adapter {name!r} ({self._relative(lora_path)}): "
                                       f"{self.redact(str(e) or type(e).__name__)}") from e
        with self._lock:
            if name in self._registry:
                raise AdapterExists(f"adapter {name!r} is already registered; unload it first")
            if name in self._retiring:
                raise AdapterExists(f"adapter {name!r} was unloaded but running requests still use it; retry later")
            self._gen += 1
            entry = self._registry[name] = _Entry(path, str(lora_path), self._gen)
        if load:
            try:
                self.prefetch(name).result()
            except BaseException:
                with self._lock:
                    if self._registry.get(name) is entry:
                        del self._registry[name]
                raise

    def unregister(self, name: str) -> None:
        """Forget `name` and free its RAM and slot (a pinned slot is freed when its last request ends)."""
        with self._lock:
            if name not in self._registry:
                raise UnknownAdapter.named(name)
            del self._registry[name]
            self._cpu.pop(name, None)
            self._loading.pop(name, None)          # a load in flight finds its entry gone and is dropped
            if self._pins.get(name):
                self._retiring.add(name)
            elif name in self._slot_of:
                self._free_slot(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._registry)

    def __contains__(self, name: str) -> bool:
        return name in self._registry

    # -- RAM tier -----------------------------------------------------------------------------
    def prefetch(self, name: str) -> Future:
        """A future of the adapter's RAM copy; reading from disk starts now, off the caller's thread."""
        with self._lock:
            entry = self._entry(name)
            if name in self._cpu:
                self._cpu.move_to_end(name)
                self._counts["cpu_hits"] += 1
                done = Future()
                done.set_result(self._cpu[name])
                return done
            if name in self._loading and self._loading[name][0] == entry.gen:
                return self._loading[name][1]
            self._counts["cpu_misses"] += 1
            future = self._pool.submit(self._read, name, entry)
            self._loading[name] = (entry.gen, future)
            return future

    def ready(self, name: str) -> bool:
        """Whether `acquire(name)` would not wait on the disk."""
        with self._lock:
            return name in self._slot_of or name in self._cpu

    def _read(self, name: str, entry: _Entry) -> AdapterWeights:    # on a pool thread
        try:
            confine(self.root, entry.given)        # the folder may have changed since registration
            weights = self._loader(name, entry.path)
            if self.max_cpu_bytes is not None and weights.nbytes > self.max_cpu_bytes:
                raise AdapterLoadError(f"needs {weights.nbytes:,} bytes, more than max_cpu_bytes = "
                                       f"{self.max_cpu_bytes:,}")
        except Exception as e:
            with self._lock:
                self._counts["load_errors"] += 1
                if self._loading.get(name, (None,))[0] == entry.gen:
                    del self._loading[name]
            log.error("adapter %r (%s) could not be loaded: %s", name, entry.path, e)
            problem = self.redact(str(e) or type(e).__name__)
            raise AdapterLoadError(f"adapter {name!r} ({self._relative(entry.given)}) could not be loaded: "
                                   f"{problem}") from e
        with self._lock:
            self._counts["loads"] += 1
            if self._loading.get(name, (None,))[0] == entry.gen:
                del self._loading[name]
            if self._registry.get(name) is entry:   # still wanted: keep it (else only this caller gets it)
                self._cpu[name] = weights
                self._trim_cpu(keep=name)
        return weights

    def _trim_cpu(self, keep: str) -> None:
        def over():
            return len(self._cpu) > self.max_cpu or (
                self.max_cpu_bytes is not None and sum(w.nbytes for w in self._cpu.values()) > self.max_cpu_bytes)
        for victim in [n for n in self._cpu if n != keep]:
            if not over():
                break
            del self._cpu[victim]
            self._counts["cpu_evictions"] += 1

    # -- device tier --------------------------------------------------------------------------
    def acquire(self, name: str, timeout: float | None = None) -> int:
        """The slot holding `name`, pinned until `release(name)`; waits only for this adapter's load."""
        while True:
            with self._lock:
                entry = self._entry(name)
                if name in self._slot_of:
                    self._counts["device_hits"] += 1
                    return self._pin(name)
                future = self.prefetch(name)
            weights = future.result(timeout)
            with self._lock:
                if self._registry.get(name) is not entry:   # unregistered or re-registered while we waited
                    continue
                if name in self._slot_of:                    # another request placed it meanwhile
                    self._counts["device_hits"] += 1
                    return self._pin(name)
                self._counts["device_misses"] += 1
                k = self._take_slot(name)
                try:
                    self.handle.write_slot(k, weights)
                except Exception as e:
                    self._free.append(k)
                    self.handle.clear_slot(k)
                    raise AdapterLoadError(f"adapter {name!r} does not fit the served model: {e}") from e
                self._slot_of[name], self._slot_nbytes[name] = k, weights.nbytes
                return self._pin(name)

    def release(self, name: str) -> None:
        with self._lock:
            if not self._pins.get(name):
                raise AdapterError(f"adapter {name!r} is not acquired")
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]
                if name in self._retiring:
                    self._retiring.discard(name)
                    self._free_slot(name)

    @contextlib.contextmanager
    def use(self, name: str, timeout: float | None = None):
        slot = self.acquire(name, timeout)
        try:
            yield slot
        finally:
            self.release(name)

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def _pin(self, name: str) -> int:
        self._slot_of.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._slot_of[name]

    def _take_slot(self, name: str) -> int:
        if self._free:
            return self._free.pop()
        victim = next((n for n in self._slot_of if not self._pins.get(n)), None)
        if victim is None:
            raise NoFreeSlot(f"all {self.max_active} adapter slots are in use by running requests; "
                             f"{name!r} must wait for one to finish")
        self._counts["device_evictions"] += 1
        return self._free_slot(victim, clear=False)

    def _free_slot(self, name: str, clear: bool = True) -> int:
        k = self._slot_of.pop(name)
        self._slot_nbytes.pop(name, None)
        if clear:
            self.handle.clear_slot(k)
            self._free.append(k)
        return k

    # -- bookkeeping --------------------------------------------------------------------------
    def redact(self, message: str) -> str:
        """`message` with the adapter root's location on this server cut out (paths become relative)."""
        for root in sorted({str(self.root.resolve()), str(self.root)}, key=len, reverse=True):
            message = message.replace(root + os.sep, "").replace(root, ".")
        return message

    def _relative(self, given) -> str:
        return self.redact(str(given))

    def _entry(self, name: str) -> _Entry:
        entry = self._registry.get(name)
        if entry is None:
            raise UnknownAdapter.named(name)
        return entry

    def metrics(self) -> dict:
        """Counters and gauges for /metrics: hits, misses, evictions per tier, resident bytes."""
        with self._lock:
            return {**self._counts,
                    "registered": len(self._registry), "cpu_adapters": len(self._cpu),
                    "cpu_bytes": sum(w.nbytes for w in self._cpu.values()),
                    "active_adapters": len(self._slot_of), "device_bytes": sum(self._slot_nbytes.values()),
                    "device_slot_bytes": self.handle.slot_bytes(), "pinned": len(self._pins),
                    "loading": len(self._loading), "max_cpu_adapters": self.max_cpu,
                    "max_active_adapters": self.max_active}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
