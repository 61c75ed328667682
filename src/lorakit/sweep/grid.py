"""A sweep's grid file: parse, validate and expand it into one flat set of training names per run.

A grid file (YAML, so JSON too) has up to four top-level keys:

    grid:                       # the cross product of these axes
      r: [4, 16]
      targets: [qv, all-linear]
    runs:                       # and/or explicit configurations, each one run
      - {method: dora, r: 8, lr: 1e-3}
    fixed:                      # settings every run shares: any `lorakit train` flag
      steps: 80
      kl_base: 3
    alpha_policy: fixed-ratio   # how alpha follows r (the --alpha-policy flag overrides it)

Axes are `AXES`; each value is checked here, and every expanded run is checked again by building
its configs (`training.run.split_kwargs`) before anything trains, so bad input fails at once and
names the key at fault. Each run keeps only the settings its method has (prompt and prefix runs take
no rank, alpha, targets or dropout; LoRA runs no virtual tokens), and runs that become identical
are kept once.

Alpha policies (LoRA and DoRA runs): `fixed-alpha` uses `alpha` as given whatever r is, so the
scale alpha/r falls as r grows; `fixed-ratio` sets alpha = alpha_ratio * r (default 2), so the
scale stays alpha_ratio at every rank; `rslora` keeps alpha and scales by alpha/sqrt(r)
(Kalajdzievski, 2023, arXiv:2312.03732). This module reads files and makes dicts; it never trains.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from pathlib import Path

from ..config import LoraConfig, PromptTuningConfig
from ..methods import registry
from ..training.run import split_kwargs
from ..training.trainer import TrainConfig

POLICIES = ("fixed-alpha", "fixed-ratio", "rslora")
METHODS = ("lora", "dora", "prompt", "prefix")   # full fine-tuning has no base to regress against
TOP_KEYS = ("grid", "runs", "fixed", "alpha_policy")
FROM_COMMAND = ("model", "data", "eval_data", "out", "resume")   # one per sweep, given on the command line
POLICY_OWNED = {"use_rslora": "alpha_policy: rslora", "use_dora": "method: dora"}
DEFAULT_RATIO = 2.0


class GridError(ValueError):
    """A grid file that cannot be run; the message names the key at fault."""


def _number(v) -> float:
    # YAML 1.1 reads 2e-3 (no dot) as a string; take it as the number it plainly is
    if isinstance(v, str):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError
    return v


def _positive(v) -> float:
    v = _number(v)
    if v <= 0:
        raise ValueError
    return v


def _count(v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError
    return v


def _dropout(v) -> float:
    v = _number(v)
    if not 0 <= v < 1:
        raise ValueError
    return v


def _targets(v):
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(isinstance(t, str) and t for t in v):
        return v
    raise ValueError


def _choice(options):
    def check(v):
        if v not in options:
            raise ValueError
        return v
    return check


def _quantize(v):
    if v in (None, "none", False):
        return None
    if v == "nf4":
        return v
    raise ValueError


# axis -> (check that returns the clean value, what a good value looks like)
AXES = {
    "r": (lambda v: _count(v, 1), "an integer >= 1"),
    "alpha": (_positive, "a positive number"),
    "alpha_ratio": (_positive, "a positive number (alpha = alpha_ratio * r under alpha_policy fixed-ratio)"),
    "lr": (_positive, "a positive number"),
    "targets": (_targets, "a preset (qv, attention, mlp, all-linear), a regex, or a list of module names"),
    "dropout": (_dropout, "a number in [0, 1)"),
    "method": (_choice(METHODS), f"one of {', '.join(METHODS)}"),
    "quantize": (_quantize, "none or nf4"),
    "num_virtual_tokens": (lambda v: _count(v, 1), "an integer >= 1 (prompt and prefix runs)"),
    "seed": (lambda v: _count(v, 0), "an integer >= 0"),
}
TRAIN_NAMES = {f.name: f for f in dataclasses.fields(TrainConfig)}
# method -> the names its runs take (TrainConfig's and its own config's)
OWN = {m: set(TRAIN_NAMES) | {f.name for f in dataclasses.fields(registry.get(m).config)} for m in METHODS}
OWN["lora"] |= {"alpha_ratio"}
OWN["dora"] |= {"alpha_ratio"}
KNOWN = set().union(*OWN.values())


def _clean(where: str, key: str, value):
    """One setting, checked: an axis by its rule, any other training name by its dataclass type."""
    if key in AXES:
        check, expected = AXES[key]
        try:
            return check(value)
        except (ValueError, TypeError):
            raise GridError(f"{where}: {value!r} is not a valid {key}: expected {expected}") from None
    field_type = str(TRAIN_NAMES[key].type) if key in TRAIN_NAMES else ""
    if field_type == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise GridError(f"{where}: {value!r} is not a number") from None
    return value


def _check_key(where: str, key, allowed_hint: str) -> None:
    if key in FROM_COMMAND:
        raise GridError(f"{where}: {key!r} is given on the command line (--{key.replace('_', '-')}), "
                        "not in the grid file")
    if key in POLICY_OWNED:
        raise GridError(f"{where}: set {POLICY_OWNED[key]} instead of {key!r}")
    if key not in KNOWN:
        raise GridError(f"{where}: unknown key {key!r}; {allowed_hint}")


def load(path: str | Path) -> dict:
    """Read a grid file (YAML or JSON) into a dict; `expand` validates it."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    return spec


def expand(spec: dict, alpha_policy: str | None = None) -> list[dict]:
    """Every run of the grid, in file order: flat training names (no model, data or out), deduplicated."""
    for key in spec:
        if key not in TOP_KEYS:
            raise GridError(f"unknown top-level key {key!r}: expected {', '.join(TOP_KEYS)}")
    policy = alpha_policy or spec.get("alpha_policy") or "fixed-alpha"
    if policy not in POLICIES:
        raise GridError(f"alpha_policy: {policy!r} is not one of {', '.join(POLICIES)}")
    axes_hint = f"sweepable axes are {', '.join(AXES)}"
    if not isinstance(spec.get("fixed") or {}, dict):
        raise GridError("fixed: expected a mapping of training names to values")
    fixed = dict(spec.get("fixed") or {})
    for key, value in fixed.items():
        _check_key(f"fixed.{key}", key, "fixed takes `lorakit train` flag names (see lorakit train --help)")
        fixed[key] = _clean(f"fixed.{key}", key, value)

    points = _grid_points(spec.get("grid"), fixed, axes_hint) + _run_points(spec.get("runs"), axes_hint)
    if not points:
        raise GridError("the grid is empty: give at least one axis with values under grid:, or a configuration "
                        "under runs:")

    out, seen = [], set()
    for i, point in enumerate(points):
        where = f"run {i + 1} ({_describe(point)})"
        config = resolve({**fixed, **point}, policy, where)
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(config)
    return out


def _grid_points(grid, fixed: dict, axes_hint: str) -> list[dict]:
    """The cross product under grid: (none when absent), each value checked."""
    if grid is None:
        return []
    if not isinstance(grid, dict):
        raise GridError(f"grid: expected a mapping of axes to lists of values ({axes_hint})")
    axes = {}
    for key, values in grid.items():
        if key not in AXES:
            _check_key(f"grid.{key}", key, axes_hint)
            raise GridError(f"grid.{key}: {key!r} is not a sweepable axis ({axes_hint}); "
                            "put it under fixed: to set it for every run")
        if key in fixed:
            raise GridError(f"grid.{key}: {key!r} is also under fixed; give it in one place")
        # a list is several settings, anything else one; a list of module names as one
        # targets setting is nested: targets: [[q_proj, v_proj], all-linear]
        values = values if isinstance(values, list) else [values]
        if not values:
            raise GridError(f"grid.{key}: an empty list of values leaves the grid with no runs")
        axes[key] = [_clean(f"grid.{key}[{i}]", key, v) for i, v in enumerate(values)]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else []


def _run_points(runs, axes_hint: str) -> list[dict]:
    """The explicit configurations under runs: (none when absent), each value checked."""
    if runs is None:
        return []
    if not isinstance(runs, list):
        raise GridError("runs: expected a list of configurations (mappings of axes to one value each)")
    points = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise GridError(f"runs[{i}]: expected a mapping of axes to values, got {run!r}")
        for key in run:
            if key not in AXES:
                _check_key(f"runs[{i}].{key}", key, axes_hint)
        points.append({k: _clean(f"runs[{i}].{k}", k, v) for k, v in run.items()})
    return points


def resolve(point: dict, policy: str, where: str = "run") -> dict:
    """One run's settings -> the flat names `lorakit.train` takes, alpha set by the policy; validated."""
    method = point.get("method", "lora")
    point = {k: v for k, v in point.items() if k in OWN[method]}
    if method in ("lora", "dora"):
        r = point.get("r", LoraConfig.r)
        if policy == "fixed-ratio":
            if "alpha" in point:
                raise GridError(f"{where}: alpha is set, but alpha_policy fixed-ratio derives it from r "
                                "(use alpha_ratio, or alpha_policy fixed-alpha)")
            point["alpha"] = point.pop("alpha_ratio", DEFAULT_RATIO) * r
        elif "alpha_ratio" in point:
            raise GridError(f"{where}: alpha_ratio only applies with alpha_policy fixed-ratio (policy is {policy})")
        if policy == "rslora":
            point["use_rslora"] = True
    try:
        split_kwargs({**point, "data": "-"})
    except (ValueError, TypeError) as e:
        raise GridError(f"{where}: {e}") from None
    return point


def _describe(point: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "defaults"


def run_id(config: dict, context: dict) -> str:
    """A stable folder name: readable settings plus a hash of everything that decides the run's record."""
    digest = hashlib.sha256(json.dumps({"config": config, "context": context}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:8]
    method = config.get("method", "lora")
    if method in ("prompt", "prefix"):
        shape = f"vt{config.get('num_virtual_tokens', PromptTuningConfig.num_virtual_tokens)}"
    else:
        targets = config.get("targets", LoraConfig.targets)
        slug = targets if isinstance(targets, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,24}", targets) else "custom"
        shape = f"r{config.get('r', LoraConfig.r)}-{slug}"
    lr = config.get("lr", TrainConfig.lr)
    return f"{method}-{shape}-lr{lr:g}-{digest}"
