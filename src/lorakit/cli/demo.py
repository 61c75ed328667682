"""The main job: teach the embedded SmolLM2-135M-Instruct a new carrier policy with LoRA, and prove it.

A support model already routes returns; a new policy sends damaged items delivered by Kestrel
Express to the tier-2 claims queue (CLM-T2-KX). The demo generates the tickets, scores the base on
held-out tickets it never trains on, trains a LoRA adapter, scores again, checks that general
ability did not break (perplexity on Python's own documentation prose, general chat prompts), and
writes the adapter and a report.

Trained on the tickets alone, the adapter learns the policy and breaks the model elsewhere (it
answers every chat with an empty reply or a code; prose perplexity rises severalfold). Two guards
keep the base intact: rehearsal rows (the base's own answers to general prompts, disjoint from the
regression prompts) and a KL penalty holding the adapted model's predictions to the base's on the
tickets' input tokens and on general prose (standard-library docstrings, disjoint from the
language-reference prose the regression check reads).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
import urllib.request
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..methods import registry
from ..datasets import carrier
from ..datasets.replay import replay_rows
from ..evaluate.prose import docstring_prose
from ..evaluate.regression import regression_eval
from ..evaluate.report import Thresholds, verdict, write_report
from ..evaluate.task import task_eval
from ..inject import trainable_report
from ..atomic import write_text
from ..models import EMBEDDED, fast_bf16, load_base
from ..training.data import read_rows
from ..training.run import train_model
from ..training.trainer import TrainConfig



# Input adapters start from the embeddings (prompt) or the keys and values (prefix) of a task
# description rather than from noise; random starts measured 32.5% (prompt) and 46.7% with
# perplexity x4 (prefix) on this task (BENCHMARKS.md).
INIT_TEXT = "You are a support assistant. Read the ticket and answer with the code of the queue it goes to."
# method -> (adapter config, default learning rate, what the console says)
# The demo's recipe per method (registry name -> config values, peak lr, what the console says).
METHODS = {
    "lora": (dict(r=16, alpha=32, targets="all-linear"), 2e-3, "LoRA r=16, alpha=32, all-linear"),
    "dora": (dict(r=16, alpha=32, targets="all-linear"), 2e-3, "DoRA r=16, alpha=32, all-linear"),
    "prompt": (dict(num_virtual_tokens=20, prompt_init="text", init_text=INIT_TEXT), 3e-2,
               "prompt tuning, 20 virtual tokens from a task description"),
    "prefix": (dict(num_virtual_tokens=20, prefix_init="text", prefix_text=INIT_TEXT), 1e-2,
               "prefix tuning, 20 virtual tokens from a task description"),
}


# A 4-bit base takes twice LoRA's step. Measured on this task, 80 steps: at 2e-3 the
# NF4 base reaches 73.3% held-out (the float base 94.2%; the NF4 base needs 160 steps to catch up),
# at 4e-3 99.2% (the float base 100%, but it keeps fewer general answers: 38% vs 62%, so the float
# default stays 2e-3). BENCHMARKS.md, "The demo task on a 4-bit base". Other methods: not measured.
QLORA_LR_FACTOR = {"lora": 2.0}


def register(p):
    p.add_argument("--model", default=EMBEDDED, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="runs/demo", help="where data, adapter and report are written")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps (default: 80)")
    p.add_argument("--n-train", type=int, default=600, help="training tickets (default: 600)")
    p.add_argument("--n-heldout", type=int, default=120, help="held-out tickets (default: 120)")
    p.add_argument("--kl-base", type=float, default=3.0, help="KL-to-base weight (0 turns the guard off)")
    p.add_argument("--no-guards", action="store_true", help="train on the tickets alone, no KL (to see the damage)")
    p.add_argument("--method", default="lora", choices=list(METHODS),
                   help="adapter: lora (default), dora, prompt (20 virtual tokens) or prefix (20 virtual tokens)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: per method, see METHODS; "
                                           "x2 for LoRA with --quantize)")
    p.add_argument("--quantize", choices=["nf4"], help="train QLoRA: the base's block linear layers in 4-bit NF4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training (default: where the CPU or GPU computes bf16 in hardware)")
    p.add_argument("--no-serve", action="store_true", help="skip the last step: serving the adapter over HTTP")


def _side_by_side(before, after, rows) -> Table:
    t = Table(title="Three held-out tickets, before and after", show_lines=True)
    for col in ("ticket", "expected", "base", "adapted"):
        t.add_column(col, overflow="fold", max_width=60 if col == "ticket" else 14)
    shown = set()
    for i, row in enumerate(rows):
        code = row["messages"][-1]["content"]
        if code not in shown:
            shown.add(code)
            t.add_row(row["messages"][1]["content"], code, before.records[i]["got"], after.records[i]["got"])
    return t


def run(args) -> int:
    console, start = Console(), time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    paths = carrier.write(out / "data", n_train=args.n_train, n_heldout=args.n_heldout, seed=args.seed)
    heldout, _ = read_rows(paths["heldout"])
    console.rule("[bold]lorakit demo: a new carrier policy, taught with LoRA")
    console.print(f"data: {args.n_train} training tickets, {args.n_heldout} held-out tickets whose products, customers "
                  f"and phrasings never occur in training -> {paths['train'].parent}")

    model, tokenizer = load_base(args.model)
    console.print(f"base: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    console.print("[bold]1/4 base model on held-out tickets[/]")
    before = task_eval(model, tokenizer, heldout, max_new_tokens=8)

    summary = _train(console, args, model, tokenizer, paths["train"], out)
    console.print("[bold]3/4 adapted model on the same held-out tickets[/]")
    after = task_eval(model, tokenizer, heldout, max_new_tokens=8)
    console.print("[bold]4/4 regression: general prose perplexity and general prompts, adapter off vs on[/]")
    regression = regression_eval(model, tokenizer)

    thresholds = Thresholds(min_task_gain=0.10, max_ppl_increase=0.05)
    decision = verdict(before, after, regression, thresholds)
    meta = {"model": args.model, "adapter": summary["adapter"], "data": str(paths["heldout"]), "steps": args.steps,
            "train_seconds": round(summary["seconds"], 1), "peak_memory_mb": round(
                summary["peak_memory"]["peak_above_baseline_bytes"] / 2**20)}
    md, js = write_report(out / "run", before, after, regression, thresholds, meta)
    console.print(_side_by_side(before, after, heldout))
    _print_result(console, before, after, regression, thresholds, decision)
    console.print(f"adapter: {summary['adapter']}\nreport:  {md} and {js.name}\n"
                  f"metrics: {out / 'run' / 'metrics.jsonl'}, loss curve: {out / 'run' / 'loss.png'}\n"
                  f"train: {summary['seconds']:.0f} s, peak memory {meta['peak_memory_mb']} MB above baseline; "
                  f"whole demo {time.perf_counter() - start:.0f} s")
    (out / "run" / "demo.json").write_text(json.dumps({"verdict": decision, "before": before.accuracy,
                                                       "after": after.accuracy}, indent=2) + "\n")
    if args.method in ("lora", "dora") and not args.quantize and not args.no_serve:
        del model                                                     # the server loads its own base
        _serve(console, args.model, Path(summary["adapter"]), out / "adapters", heldout)
    return 0 if decision["verdict"] != "FAIL" else 1


def _train(console: Console, args, model, tokenizer, train_path: Path, out: Path) -> dict:
    """Step 2: the guards' rows mixed into the tickets (unless --no-guards), then the method's run."""
    kl = 0.0 if args.no_guards else args.kl_base
    if not args.no_guards:
        console.print("[bold]   guards[/]: rehearsal rows (the base's own answers to general prompts) and "
                      "general prose for the KL-to-base penalty")
        rehearsal = replay_rows(model, tokenizer) + [{"kl_text": p} for p in docstring_prose(100)]
        rows = train_path.read_text().splitlines() + [json.dumps(r) for r in rehearsal]
        random.Random(args.seed).shuffle(rows)
        train_path = train_path.parent / "train_with_guards.jsonl"
        write_text(train_path, "\n".join(rows) + "\n")
    values, default_lr, what = METHODS[args.method]
    lr = args.lr or default_lr * (QLORA_LR_FACTOR.get(args.method, 1.0) if args.quantize else 1.0)
    bf16, why = fast_bf16(next(model.parameters()).device)
    bf16 = bf16 if args.bf16 is None else args.bf16
    precision = "bf16 autocast" if bf16 else "fp32"
    console.print(f"[bold]2/4 training[/] ({what}, lr {lr:g}, {precision}"
                  f"{f' ({why})' if args.bf16 is None else ' (--bf16)' if bf16 else ' (--no-bf16)'}, KL-to-base {kl}"
                  f"{', NF4 base (QLoRA)' if args.quantize else ''})")
    cfg = TrainConfig(model=args.model, data=str(train_path), out=str(out / "run"), steps=args.steps,
                      batch_size=8, lr=lr, warmup=0.1, bf16=bf16, seed=args.seed, kl_base=kl, quantize=args.quantize,
                      method=args.method)
    summary = train_model(model, tokenizer, cfg, registry.get(args.method).make(**values))
    console.print("   " + str(trainable_report(model)).splitlines()[-1])
    return summary


def _print_result(console: Console, before, after, regression, thresholds, decision) -> None:
    t = Table(title="Result")
    for col in ("", "base", "adapted"):
        t.add_column(col)
    t.add_row("held-out routing accuracy (95% CI)", f"{before.accuracy:.1%} [{before.low:.0%}, {before.high:.0%}]",
              f"{after.accuracy:.1%} [{after.low:.0%}, {after.high:.0%}]")
    t.add_row("general-prose perplexity", f"{regression.ppl_off:.3f}", f"{regression.ppl_on:.3f} ({regression.ppl_change:+.2%})")
    t.add_row(f"general prompts kept (similarity >= {thresholds.similar_at})", "", f"{decision['agreement']:.0%}")
    console.print(t)
    color = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}[decision["verdict"]]
    console.print(f"verdict: [bold {color}]{decision['verdict']}[/]" + "".join(f"\n  - {r}" for r in decision["reasons"]))


def _serve(console: Console, model: str, adapter: Path, root: Path, heldout: list[dict]) -> None:
    """Serve the base and the new adapter over HTTP and ask each the same held-out ticket."""
    from ..serve.api import create_app, serve_in_background
    from ..serve.server import ServeConfig, build

    name = "carrier-policy"
    shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(adapter, root / name)
    console.print(f"[bold]serving[/]: the base and {name!r} from one resident model "
                  f"(lorakit serve --model {model} --adapters {root})")
    served = build(ServeConfig(model=model, adapters=str(root)))
    row = next((r for r in heldout if "CLM-T2-KX" in r["messages"][-1]["content"]), heldout[0])
    t = Table(title="One held-out ticket through POST /v1/chat/completions")
    for col in ("model", "answer", "expected"):
        t.add_column(col)
    with serve_in_background(create_app(served)) as url:
        for m in (served.name, name):
            body = {"model": m, "messages": row["messages"][:-1], "max_tokens": 8, "temperature": 0}
            request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.load(response)["choices"][0]["message"]["content"]
            t.add_row(m, answer.strip(), row["messages"][-1]["content"])
        console.print(f"   {url}/v1/models lists: {', '.join(d['id'] for d in json.load(urllib.request.urlopen(url + '/v1/models'))['data'])}")
    console.print(t)
