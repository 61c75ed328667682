"""Checkpoints that survive a SIGKILL: written into a hidden temporary folder, committed by one rename.

Layout of `OUT/checkpoints/step-000040/`:
  adapter/ (or model/)         the adapter, PEFT format, or for full fine-tuning the whole model
  trainer_state.safetensors    optimizer moments by parameter name, RNG states
  trainer_state.json           step, data position, configs, Python RNG state
A folder named `step-*` is complete by construction (`atomic_folder`); `.step-*.tmp` folders are
leftovers of a killed write and are ignored (and removed on the next save). Only safetensors and JSON are read back.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_folder, stale_temporaries
from ..io.peft_format import read_tensors

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


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
    for stale in stale_temporaries(root) if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    with atomic_folder(final) as tmp:       # a re-run of the same step replaces it
        weights.save(model, tmp / weights.folder)
        tensors = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        for p, st in optimizer.state.items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{param_names[p]}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(tmp / STATE_TENSORS))
        py_state = random.getstate()
        payload = dict(state, step=step, python_rng=[py_state[0], list(py_state[1]), py_state[2]])
        (tmp / STATE_JSON).write_text(json.dumps(payload, indent=1))
    if keep:
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, optimizer: torch.optim.Optimizer, params_by_name: dict[str, nn.Parameter]) -> dict:
    """Restore optimizer moments and RNG states; returns the JSON state (step, data position, ...)."""
    state = json.loads((path / STATE_JSON).read_text())
    tensors = read_tensors(path / STATE_TENSORS)
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, slot = key[len("optim."):].rpartition(".")
        if name not in params_by_name:
            raise ValueError(f"{path / STATE_TENSORS}: optimizer state for unknown parameter {name!r}")
        p = params_by_name[name]
        optimizer.state[p][slot] = value.to(p.device)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state

