"""CLI flags derived from config dataclasses: each field's `help` metadata is its only documentation."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..methods import registry


def _parse_targets(text: str):
    # "qv" / "all-linear" / a regex stay strings; "q_proj,v_proj" becomes a list.
    return [t for t in text.split(",") if t] if "," in text else text


def add_config_args(parser: argparse.ArgumentParser, cls, only: list[str] | None = None,
                    skip: set | None = None, defaults: dict | None = None) -> None:
    """`defaults`: what the command uses where it differs from the dataclass's (the command applies it)."""
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or (skip and f.name in skip):
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, {}) else "")
        help_text = help_text.replace("%", "%%")          # argparse formats help with %
        if f.type in ("bool", bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in ("targets", "exclude", "modules_to_save"):
            parser.add_argument(*flags, dest=f.name, type=_parse_targets, default=None, help=help_text)
        elif f.type in ("dict", dict):
            parser.add_argument(*flags, dest=f.name, type=json.loads, default=None, help=help_text + " as JSON")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)


def config_values(cls, args: argparse.Namespace) -> dict:
    """The flags the user set for `cls`'s fields (unset flags are left to the dataclass defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = [value] if f.name == "modules_to_save" and isinstance(value, str) else value
    return values


def config_from_args(cls, args: argparse.Namespace, **overrides):
    try:
        return cls(**{**config_values(cls, args), **overrides})
    except ValueError as e:
        raise ValueError(_name_the_flag(cls, args, e)) from None


def add_method_args(parser: argparse.ArgumentParser, only: list[str] | None = None) -> None:
    """The flags of every method's config (`methods/registry.py`), each field once."""
    seen: set = set()
    for method in registry.METHODS.values():
        names = [f.name for f in dataclasses.fields(method.config) if f.name not in method.fixed]
        add_config_args(parser, method.config, only=only, skip=seen)
        seen.update(names)


def method_from_args(name: str, args: argparse.Namespace):
    """Method `name`'s config from the flags the user set."""
    method = registry.get(name)
    values = {k: v for k, v in config_values(method.config, args).items() if k not in method.fixed}
    try:
        return method.make(**values)
    except ValueError as e:
        raise ValueError(_name_the_flag(method.config, args, e)) from None


def _name_the_flag(cls, args: argparse.Namespace, error: ValueError) -> str:
    """'LoraConfig.r = 0: expected ...' -> '--rank 0: LoraConfig.r = 0: expected ...' (the flag as typed)."""
    for f in dataclasses.fields(cls):
        if f"{cls.__name__}.{f.name} " in str(error) and getattr(args, f.name, None) is not None:
            flag = (f.metadata.get("aliases") or ["--" + f.name.replace("_", "-")])[0]
            return f"{flag} {getattr(args, f.name)}: {error}"
    return str(error)
