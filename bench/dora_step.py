"""A DoRA training step against a LoRA step, lorakit vs peft: what the magnitude costs.

Four runs, each in a fresh process on the same model, batch and config: lorakit LoRA, lorakit
DoRA, peft LoRA, peft DoRA. SmolLM2-135M (the embedded model; if it is not installed, a Llama of
its shapes with random weights, and the output says so), r=16 on every linear layer, batch 4x128
random tokens, fp32, torch.optim.AdamW on the trainable parameters, 2 threads. Every run uses the
same transformers forward with labels, so only the adapters differ. A step is forward + backward +
optimizer step; the figure is the fastest timed step after warm-up (the least disturbed one).

    .venv/bin/python bench/dora_step.py            # writes bench/results/dora_step.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("lorakit-lora", "lorakit-dora", "peft-lora", "peft-dora")


def base_model(name: str):
    import lorakit as lk

    try:
        model, _ = lk.load_base(name)
        return model, name
    except FileNotFoundError:   # not installed: same shapes, random weights
        import torch
        import transformers
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=2048, tie_word_embeddings=True)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config), "random Llama with SmolLM2-135M's shapes"


def worker(run: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    lib, method = run.split("-")
    if lib == "peft":
        import peft
    import lorakit as lk

    model, source = base_model(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    if lib == "lorakit":
        lk.inject(model, lk.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear", use_dora=method == "dora"))
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                           use_dora=method == "dora", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = times[args.warmup:]
    return {"run": run, "model": source, "trainable": sum(p.numel() for p in params), "first_loss": losses[0],
            "best_s": min(timed), "mean_s": sum(timed) / len(timed), "steps_s": timed,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="fresh processes per run, in alternating order")
    p.add_argument("--out", default="bench/results/dora_step.json")
    p.add_argument("--worker", choices=RUNS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    runs = {r: [] for r in RUNS}
    for i in range(args.repeat):
        for run in (RUNS if i % 2 == 0 else RUNS[::-1]):
            cmd = [sys.executable, __file__, "--worker", run] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if out.returncode:
                sys.exit(f"{run} failed:\n{out.stderr[-3000:]}")
            runs[run].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {run: min(rs, key=lambda r: r["best_s"]) for run, rs in runs.items()}
    ratios = {"lorakit_dora_over_lora": best["lorakit-dora"]["best_s"] / best["lorakit-lora"]["best_s"],
              "peft_dora_over_lora": best["peft-dora"]["best_s"] / best["peft-lora"]["best_s"],
              "lorakit_dora_over_peft_dora": best["lorakit-dora"]["best_s"] / best["peft-dora"]["best_s"]}
    first = best["lorakit-lora"]
    print(f"{first['model']}, r={args.r}, all-linear, batch {args.batch}x{args.seq}, fp32, {first['threads']} threads, "
          f"best of {args.steps} steps after {args.warmup} warm-up, {args.repeat} process(es) each\n")
    print("| run | s/step (best) | s/step (mean) | trainable | first loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for run, r in best.items():
        print(f"| {run} | {r['best_s']:.3f} | {r['mean_s']:.3f} | {r['trainable']:,} | {r['first_loss']:.4f} |")
    print(f"\nlorakit DoRA / LoRA: x{ratios['lorakit_dora_over_lora']:.2f} (target <= 1.3); "
          f"peft DoRA / LoRA: x{ratios['peft_dora_over_lora']:.2f}; "
          f"lorakit DoRA / peft DoRA: x{ratios['lorakit_dora_over_peft_dora']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": best, "all_runs": runs, "ratios": ratios},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
