"""Checkpoints that survive a SIGKILL: written into a hidden temporary folder, committed by one rename.

Layout of `OUT/checkpoints/step-000040/`:
  adapter/ (or model/)         the adapter, PEFT format, or for full fine-tuning the whole model
  trainer_state.safetensors    optimizer moments by parameter name, RNG states
  trainer_state.json           step, data position, configs, Python RNG state
A sharded run (`--fsdp`) writes `dcp/` instead of the adapter and the optimizer moments: a
`torch.distributed.checkpoint` folder in which every rank wrote its own shard of the trainable
weights and of their optimizer state. It loads on any number of ranks (2 -> 1, 1 -> 2), sharded
or not, since DCP reshards by parameter name; trainer_state.safetensors then holds the RNG only.
A folder named `step-*` is complete by construction (`atomic_folder`); `.step-*.tmp` folders are
leftovers of a killed write and are ignored (and removed on the next save). Only safetensors and JSON are read back.
"""
from __future__ import annotations

import contextlib
import json
import random
import warnings
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_folder, commit_folder, stale_temporaries
from ..io.peft_format import read_tensors

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
SHARDED = "dcp"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest(path: str | Path) -> Path | None:
    """The newest complete checkpoint under a run folder, or `path` itself if it is one."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    root = checkpoint_root(path) if checkpoint_root(path).is_dir() else path
    done = sorted(p for p in root.glob("step-*") if (p / STATE_JSON).is_file())
    return done[-1] if done else None


def save(out: str | Path, step: int, model: nn.Module, weights, optimizer: torch.optim.Optimizer,
         param_names: dict[nn.Parameter, str], state: dict, keep: int = 2) -> Path:
    root = checkpoint_root(out)
    _remove_stale(root)
    final = root / f"step-{step:06d}"
    with atomic_folder(final) as tmp:       # a re-run of the same step replaces it
        weights.save(model, tmp / weights.folder)
        tensors = _rng_tensors()
        for p, st in optimizer.state.items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{param_names[p]}.{key}"] = value.detach().cpu().contiguous()
        _write_state(tmp, tensors, state, step)
    _prune(root, final, keep)
    return final


def save_sharded(out: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 keep: int = 2, trainable_only: bool = True) -> Path:
    """Every rank calls this: each writes its shards into one temporary folder (same path on all
    ranks: the run folder must be shared), then rank 0 adds the trainer state and commits it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    main = not dist.is_initialized() or dist.get_rank() == 0
    root = checkpoint_root(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.{SHARDED}.tmp"
    if main:
        _remove_stale(root)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))
    with _one_process_is_meant():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED), no_dist=not dist.is_initialized())
    if main:
        _write_state(tmp, _rng_tensors(), state, step)
        commit_folder(tmp, final)
        _prune(root, final, keep)
    _barrier()
    return final


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _write_state(folder: Path, tensors: dict, state: dict, step: int) -> None:
    save_file(tensors, str(folder / STATE_TENSORS))
    py_state = random.getstate()
    payload = dict(state, step=step, python_rng=[py_state[0], list(py_state[1]), py_state[2]])
    (folder / STATE_JSON).write_text(json.dumps(payload, indent=1))


def _remove_stale(root: Path) -> None:
    for stale in stale_temporaries(root) if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, final: Path, keep: int) -> None:
    if keep:
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns that it assumes one process when there is no process group, even when told so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder was written by a sharded (--fsdp) run."""
    return (Path(path) / SHARDED).is_dir()


def load(path: Path, optimizer: torch.optim.Optimizer, params_by_name: dict[str, nn.Parameter]) -> dict:
    """Restore optimizer moments and RNG states; returns the JSON state (step, data position, ...).
    Moments land in each parameter's layout, so a single-process checkpoint resumes sharded too."""
    tensors = read_tensors(path / STATE_TENSORS)
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, slot = key[len("optim."):].rpartition(".")
        if name not in params_by_name:
            raise ValueError(f"{path / STATE_TENSORS}: optimizer state for unknown parameter {name!r}")
        p = params_by_name[name]
        optimizer.state[p][slot] = _like(value.to(p.device), p)
    return _restore_state(path, tensors)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = True) -> dict:
    """Restore a sharded checkpoint's weights and optimizer state into `model` (sharded over any
    number of ranks, or not at all) and the RNG states; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    target = {"model": model_sd, "optim": optim_sd}
    try:
        with _one_process_is_meant():
            dcp.load(target, checkpoint_id=str(path / SHARDED), no_dist=not dist.is_initialized())
    except Exception as e:          # DCP raises CheckpointException, wrapping each rank's error
        raise ValueError(f"{path / SHARDED}: cannot load this sharded checkpoint into this model: {e}") from e
    # dcp.load has checked every trainable tensor is in the file; the frozen ones are not meant to be
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                   options=StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only))
    return _restore_state(path, read_tensors(path / STATE_TENSORS))


def _like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like parameter `p` (sharded the same way when `p` is a shard)."""
    if hasattr(p, "device_mesh") and value.shape == p.shape:
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value, p.device_mesh, p.placements)
    return value


def _restore_state(path: Path, tensors: dict) -> dict:
    state = json.loads((path / STATE_JSON).read_text())
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state
