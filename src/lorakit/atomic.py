"""Atomic writes, of one file or a whole folder: write beside the target, fsync, rename.

A crash leaves the old file (folder) or the new one, never a mix and never half of either. Every
writer of results, adapters, checkpoints, merged models and the model cache goes through here.
It sits at the bottom of the package because the model cache (`models.py`) commits folders too.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep_existing: bool = False):
    """Yield an empty temporary folder beside `path`; on success it becomes `path` in one rename.

    An existing `path` is replaced (renamed aside first, removed after the commit), or with
    `keep_existing` left as it is: another writer finished the same folder first (a shared cache).
    Temporary folders are named `.<name>.*.tmp`; `stale_temporaries` finds those a killed run left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
        _commit(tmp, path, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make a folder that several writers filled (e.g. the ranks of a sharded checkpoint) `path`,
    in one rename, after its files are on disk. `tmp` must sit beside `path` and be named
    `.<name>.*.tmp`, so that `stale_temporaries` finds it if the writers are killed first."""
    tmp, path = Path(tmp), Path(path)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync(f)
    _commit(tmp, path, keep_existing=False)


def stale_temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob(".*.tmp") if p.is_dir())


def _commit(tmp: Path, path: Path, keep_existing: bool) -> None:
    old = None
    if path.exists():
        if keep_existing:
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.rename(tmp, path)                                   # the commit point
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
