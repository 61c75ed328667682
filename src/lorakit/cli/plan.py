"""Plan a fine-tune before renting hardware: parameters, memory by component, adapter and tenant storage.

Examples: `lorakit plan smollm2-135m-instruct --rank 16 --targets all-linear --seq-len 512`,
`lorakit plan --params 70B`, `lorakit plan --matrix 4096x4096 --rank 8`,
`lorakit plan --tenants 50 --base-gb 14 --adapter-mb 128`, `lorakit plan --params 70B --world-size 8
--shard full`. Add `--json` for machine-readable output.
"""
from __future__ import annotations

import json
import re

from rich.console import Console
from rich.table import Table

from ..config import LoraConfig
from ..plan import memory as mem
from ..plan.report import PlanConfig, plan_model, plan_params
from .args import add_config_args, add_method_args, config_from_args, method_from_args

PLAN_ONLY = "qlora"      # a method for the arithmetic only: LoRA on a 4-bit base (train it with --quantize)


def register(p):
    p.add_argument("model", nargs="?", help="smollm2-135m-instruct, a .gguf file, a transformers folder, or tiny-<family>")
    p.add_argument("--params", help="plan from a parameter count alone, e.g. 70B or 65B (the headline tables)")
    p.add_argument("--matrix", help="one projection, D_INxD_OUT (e.g. 4096x4096)")
    p.add_argument("--method", default="lora", choices=mem.METHODS)
    add_method_args(p, only=["r", "alpha", "targets", "exclude", "num_virtual_tokens", "projection"])
    add_config_args(p, PlanConfig, skip={"quantize"})            # --method qlora says it
    p.add_argument("--tenants", type=int, help="multi-tenant storage for N adapters")
    p.add_argument("--base-gb", type=float, help="base checkpoint size for --tenants (default: from the model)")
    p.add_argument("--adapter-mb", type=float, help="adapter size for --tenants (default: from the plan)")
    p.add_argument("--json", action="store_true")


def build(args) -> dict:
    run = config_from_args(PlanConfig, args, quantize=args.method == PLAN_ONLY)
    method_cfg = method_from_args("lora" if args.method == PLAN_ONLY else args.method, args)
    out: dict = {}
    if args.params:
        out["headline"] = plan_params(mem.parse_count(args.params), run.recipe, run.double_quant, run.world_size,
                                      run.shard)
    if args.matrix:
        m = re.fullmatch(r"(\d+)x(\d+)", args.matrix)
        if not m:
            raise ValueError(f"--matrix {args.matrix!r}: expected D_INxD_OUT, e.g. 4096x4096")
        r = method_cfg.r if isinstance(method_cfg, LoraConfig) else LoraConfig().r
        out["matrix"] = mem.matrix_plan(int(m[1]), int(m[2]), r, args.method)
    if args.model:
        out["model"] = plan_model(args.model, method_cfg, run)
    if args.tenants:
        base_gb = args.base_gb if args.base_gb is not None else \
            (out["model"]["parameters"]["total"] * run.frozen_bytes / mem.GB if "model" in out else None)
        adapter_mb = args.adapter_mb if args.adapter_mb is not None else \
            (out["model"]["adapter_file_bytes"] / 2**20 if "model" in out else None)
        if base_gb is None or adapter_mb is None:
            raise ValueError("--tenants needs a model, or --base-gb and --adapter-mb")
        out["tenants"] = mem.tenant_storage(base_gb, adapter_mb, args.tenants)
    if not out:
        raise ValueError("give a MODEL, --params, --matrix or --tenants")
    return out


def run(args) -> int:
    out = build(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    console = Console()
    if "headline" in out:
        h = out["headline"]
        t = Table(title=f"{h['params'] / 1e9:g}B parameters: model states (GB = 1e9 bytes)")
        t.add_column("what")
        t.add_column("GB", justify="right")
        t.add_column("formula")
        t.add_row("full fine-tuning, 12-byte recipe", f"{h['full_12-byte_gb']:,.1f}", "fp16 weights 2 + fp16 grads 2 + fp32 Adam m, v 8")
        t.add_row("full fine-tuning, 16-byte recipe", f"{h['full_16-byte_gb']:,.1f}", "12-byte + fp32 master copy 4")
        t.add_row("LoRA frozen fp16/bf16 floor", f"{h['lora_fp16_floor_gb']:,.1f}", "2 bytes per frozen weight")
        t.add_row("QLoRA NF4 payload", f"{h['nf4_payload_gb']:,.1f}", "4 bits per weight")
        t.add_row("QLoRA NF4 + quantization constants", f"{h['nf4_with_constants_gb']:,.1f}",
                  f"+{h['quant_constant_bits']:.3f} bit/param")
        console.print(t)
        if "per_rank" in h:
            r = h["per_rank"]
            console.print(f"per rank of {r['world_size']} (--shard {r['shard']}): full 12-byte "
                          f"{r['full_12-byte_gb']:,.1f} GB, full 16-byte {r['full_16-byte_gb']:,.1f} GB, LoRA floor "
                          f"{r['lora_fp16_floor_gb']:,.1f} GB, QLoRA NF4 + constants {r['nf4_with_constants_gb']:,.1f} GB "
                          "(model states, before activations and all-gather buffers)")
    if "matrix" in out:
        m = out["matrix"]
        console.print(f"[bold]{m['d_in']}x{m['d_out']} projection, r={m['r']}[/]: full {m['full_params']:,} params "
                      f"({m['full_bytes'] / 1e6:.1f} MB fp16); LoRA {m['lora_params']:,} params = "
                      f"{m['percent_of_full']:.2f}% ({m['lora_bytes'] / 1e3:,.0f} KB fp16)"
                      + (f"; DoRA adds {m['dora_magnitude_params']:,} magnitude params "
                         f"({m['dora_extra_vs_lora_percent']:.2f}% of LoRA's)" if "dora_magnitude_params" in m else ""))
    if "model" in out:
        _print_model(console, out["model"])
    if "tenants" in out:
        s = out["tenants"]
        console.print(f"[bold]{s['tenants']} tenants[/]: merged full models {s['merged_full_models_gb']:,.1f} GB vs "
                      f"one base + adapters {s['shared_base_plus_adapters_gb']:,.2f} GB = {s['reduction_x']:.1f}x less")
    return 0


def _print_model(console: Console, p: dict) -> None:
    prm = p["parameters"]
    if p["method"] in ("prompt", "prefix"):
        console.print(f"[bold]{p['model']} ({p['architecture']}): {p['method']} tuning, "
                      f"{p['virtual_tokens']} virtual tokens[/]")
    else:
        t = Table(title=f"{p['model']} ({p['architecture']}): {p['method']}, r={p['r']}, targets={p['targets']}")
        for col in ("module kind", "modules", "d_in", "d_out", "params / module", "params"):
            t.add_column(col, justify="left" if col == "module kind" else "right")
        for k, row in prm["by_kind"].items():
            t.add_row(k, str(row["modules"]), str(row["d_in"]), str(row["d_out"]),
                      f"{row['lora_params_per_module']:,}", f"{row['params']:,}")
        console.print(t)
    console.print(f"trainable {prm['trainable']:,} of {prm['total']:,} base parameters = {prm['percent']:.3f}%"
                  + (f" (DoRA magnitude: +{prm['dora_extra_magnitude']:,})" if p["method"] == "dora" else ""))
    t = Table(title=f"Memory ({p['recipe']} recipe)")
    for col in ("component", "GB", "formula"):
        t.add_column(col, justify="right" if col == "GB" else "left")
    for c in p["memory"]["components"]:
        t.add_row(c["component"], f"{c['gb']:,.3f}", c["formula"])
    if p["memory"]["head_gradient_bytes"]:
        t.add_row("(head gradient)", f"{p['memory']['head_gradient_bytes'] / mem.GB:,.3f}",
                  "output head's gradient, alive with every activation at the start of backward")
    t.add_row("[bold]peak[/]", f"[bold]{p['memory']['total_gb']:,.3f}[/]", p["memory"]["peak_rule"])
    console.print(t)
    if "memory_per_rank" in p:
        t = Table(title=f"Memory per rank ({p['world_size']} ranks, --shard {p['shard']})")
        for col in ("component", "GB", "formula"):
            t.add_column(col, justify="right" if col == "GB" else "left")
        for c in p["memory_per_rank"]["components"]:
            t.add_row(c["component"], f"{c['gb']:,.3f}", c["formula"])
        t.add_row("[bold]peak per rank[/]", f"[bold]{p['memory_per_rank']['total_gb']:,.3f}[/]",
                  p["memory_per_rank"]["peak_rule"])
        console.print(t)
    tt = p["targets_table"]
    console.print(f"targets at r={p['r']}: qv {tt['qv'] or 0:,} vs all-linear {tt['all-linear'] or 0:,}"
                  + (f" ({tt['all_linear_vs_qv']:.2f}x)" if "all_linear_vs_qv" in tt else ""))
    console.print("rank table (all-linear): " + ", ".join(f"r={r['r']}: {r['params']:,}" for r in p["rank_table"]))
