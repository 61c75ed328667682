"""Show a model's architecture, its linear modules, what each preset adapts, and the trainable report.

Examples: `lorakit inspect smollm2-135m-instruct --targets qv --r 8`, `lorakit inspect ./my-model --json`,
`lorakit inspect smollm2-135m-instruct --method prefix --num-virtual-tokens 20`.
"""
from __future__ import annotations

import json
from collections import Counter

from rich.console import Console
from rich.table import Table

from ..inject import inject, trainable_report
from ..linear import shape as linear_shape
from ..methods import registry
from ..models import load_base
from ..targets import family, kind, linear_names, preset_matches, role, roles_summary
from .args import add_method_args, method_from_args


def register(p):
    p.add_argument("model", help="smollm2-135m-instruct, a .gguf file, a transformers folder, or tiny-{llama,qwen2,gpt2,bert}")
    p.add_argument("--method", default="lora", choices=[m for m, v in registry.METHODS.items() if v.family != "full"],
                   help="which adapter's trainable parameters to report (default: lora)")
    add_method_args(p, only=["r", "alpha", "targets", "exclude", "use_rslora", "num_virtual_tokens", "projection"])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def method_config(args):
    return method_from_args(args.method, args)


def inspect_model(model, config) -> dict:
    names = linear_names(model)
    shapes: dict[str, dict] = {}
    for n in names:
        d_in, d_out = linear_shape(model.get_submodule(n))
        row = shapes.setdefault(kind(n), {"count": 0, "d_in": d_in, "d_out": d_out})
        row["count"] += 1
    presets = {p: dict(Counter(kind(n) for n in chosen)) for p, chosen in preset_matches(model).items()}
    inject(model, config)
    c = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(c, "model_type", None),
        "family": family(model),
        "layers": getattr(c, "num_hidden_layers", None),
        "hidden_size": getattr(c, "hidden_size", None),
        "linear_modules": shapes,
        "presets": presets,
        "roles": {kind(n): role(n) for n in names},             # kind -> role (None: no known role)
        "roles_summary": roles_summary(names),
        "config": config.to_dict(),
        "report": trainable_report(model).to_dict(),
    }


def run(args) -> int:
    model, _ = load_base(args.model)
    info = inspect_model(model, method_config(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console()
    console.print(f"[bold]{info['architecture']}[/] ({info['model_type']}, family {info['family'] or 'unknown'}): "
                  f"{info['layers']} layers, hidden {info['hidden_size']}")
    t = Table(title="Linear modules by kind")
    for col in ("kind", "role", "count", "d_in", "d_out"):
        t.add_column(col, justify="left" if col in ("kind", "role") else "right")
    for k, row in info["linear_modules"].items():
        t.add_row(k, info["roles"][k] or "-", str(row["count"]), str(row["d_in"]), str(row["d_out"]))
    console.print(t)
    console.print(f"roles: {info['roles_summary'] or 'none recognised'}")
    t = Table(title="What each preset adapts")
    t.add_column("preset")
    t.add_column("modules", justify="right")
    t.add_column("kinds")
    for p, kinds in info["presets"].items():
        t.add_row(p, str(sum(kinds.values())), ", ".join(kinds) or "(matches nothing)")
    console.print(t)
    r = info["report"]
    shape = ", ".join(f"{k}={v}" for k, v in info["config"].items() if k in ("r", "targets", "use_dora",
                                                                               "num_virtual_tokens", "projection"))
    t = Table(title=f"Trainable parameters ({args.method}): {shape}")
    for col in ("kind", "modules", "params"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for k, row in r["by_kind"].items():
        t.add_row(k, str(row["modules"]), f"{row['params']:,}")
    t.add_row("[bold]total trainable[/]", str(r["matched_modules"]), f"[bold]{r['trainable']:,}[/]")
    console.print(t)
    console.print(f"trainable {r['trainable']:,} of {r['total']:,} parameters = {r['percent']:.3f}%")
    return 0
