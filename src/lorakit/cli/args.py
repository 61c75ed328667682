"""CLI flags derived from config dataclasses: each field's `help` metadata is its only documentation."""
from __future__ import annotations

import argparse
import dataclasses
import json


def _parse_targets(text: str):
    # "qv" / "all-linear" / a regex stay strings; "q_proj,v_proj" becomes a list.
    return [t for t in text.split(",") if t] if "," in text else text


def add_config_args(parser: argparse.ArgumentParser, cls, only: list[str] | None = None) -> None:
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else None
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
    return cls(**{**config_values(cls, args), **overrides})
