"""The main job on the embedded SmolLM2-135M-Instruct: inject LoRA, prove it is exact, save, reload, merge, chat.

Until the trainer lands the adapter is not trained: to exercise save, reload and merge on
non-trivial values the demo fills B with small random numbers (and says so).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from ..config import LoraConfig
from ..inject import disabled, inject, trainable_report
from ..io.peft_format import load_adapter, save_adapter
from ..merge import merge_and_unload
from ..models import EMBEDDED, load_base

QUESTION = "What is the capital of France?"


def register(p):
    p.add_argument("--model", default=EMBEDDED, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="runs/demo", help="where the adapter is written")
    p.add_argument("--max-new-tokens", type=int, default=24)


def chat(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": question}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run(args) -> int:
    console = Console()
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.model)
    console.print(f"[bold]1. base model[/] {args.model}: {type(model).__name__}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, loaded in {time.perf_counter() - t0:.1f} s")
    console.print(f"   Q: {QUESTION}\n   A: {chat(model, tokenizer, QUESTION, args.max_new_tokens)}")

    probe = tokenizer(["A damaged parcel from the new carrier must be escalated to"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = model(input_ids=probe).logits
    config = LoraConfig(r=16, alpha=32, targets="all-linear")
    inject(model, config)
    console.print("[bold]2. LoRA r=16, alpha=32, all-linear[/]")
    console.print("   " + str(trainable_report(model)).replace("\n", "\n   "))
    with torch.no_grad():
        diff = _max_diff(model(input_ids=probe).logits, base_logits)
    console.print(f"[bold]3. no-op at init[/] (B = 0): max |logits - base logits| = {diff:.1e}")

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        adapted = model(input_ids=probe).logits
    out = save_adapter(model, Path(args.out) / "adapter")
    size = sum(f.stat().st_size for f in out.iterdir())
    console.print(f"[bold]4. saved[/] an (untrained, randomised-B) adapter to {out} ({size / 1e6:.2f} MB, PEFT format)")

    fresh, _ = load_base(args.model)
    load_adapter(fresh, out)
    with torch.no_grad():
        reload_diff = _max_diff(fresh(input_ids=probe).logits, adapted)
        with disabled(fresh):
            base_diff = _max_diff(fresh(input_ids=probe).logits, base_logits)
    console.print(f"[bold]5. reloaded[/] into a fresh base: max |diff| = {reload_diff:.1e}; "
                  f"disabled() gives the base back: {base_diff:.1e}")
    merged = merge_and_unload(fresh)
    with torch.no_grad():
        merge_diff = _max_diff(merged(input_ids=probe).logits, adapted)
    console.print(f"[bold]6. merged[/] into a plain {type(merged).__name__}: max |diff| = {merge_diff:.1e}")
    console.print(f"   Q: {QUESTION}\n   A: {chat(merged, tokenizer, QUESTION, args.max_new_tokens)}")
    ok = diff == 0.0 and reload_diff < 1e-5 and base_diff < 1e-5 and merge_diff < 1e-3
    console.print(f"[bold {'green' if ok else 'red'}]demo {'passed' if ok else 'FAILED'}[/] in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
