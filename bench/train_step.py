"""A LoRA training step, lorakit vs peft, on the same model, batch and config, in one run.

Each library runs in its own fresh process (so peak RSS is its own), on the same SFT batch: rows
of the carrier-policy set padded or cut to --seq tokens, loss only on the answer tokens. Both use
torch.optim.AdamW on the adapter parameters. peft runs the way its users run it: the transformers
forward with labels (full-vocabulary logits at every position). lorakit runs `loss_sum`, which
applies the output head only where a label exists.

    .venv/bin/python bench/train_step.py            # SmolLM2-135M, r=16, all-linear, batch 4x128, fp32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import roofline


def batch(tokenizer, n: int, seq: int):
    import torch

    from lorakit.datasets import carrier
    from lorakit.training.data import IGNORE, tokenize

    rows, _ = carrier.generate(n_train=max(n, 8), n_heldout=4, seed=1)
    ids = torch.full((n, seq), tokenizer.pad_token_id)
    labels = torch.full((n, seq), IGNORE)
    mask = torch.zeros((n, seq), dtype=torch.long)
    for i, row in enumerate(rows[:n]):
        ex, _ = tokenize(row, tokenizer, max_len=seq)
        k = len(ex.input_ids)
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(ex.input_ids), torch.tensor(ex.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def worker(lib: str, args) -> dict:
    import torch

    from lorakit.training.memory import PeakMemory

    import lorakit as lk

    if lib == "peft":
        import peft  # imported before the baseline, like lorakit: library code is not training memory

    torch.manual_seed(0)
    memory = PeakMemory().start()

    model, tokenizer = lk.load_base(args.model)
    data = batch(tokenizer, args.batch, args.seq)
    if lib == "lorakit":
        from lorakit.training.memory import return_freed_memory
        from lorakit.training.trainer import loss_sum

        if args.release_memory:
            return_freed_memory()   # what the Trainer does with --release-memory

        lk.inject(model, lk.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear"))

        def step_loss():
            s, n = loss_sum(model, data)
            return s / n
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))

        def step_loss():
            return model(**data, use_cache=False).loss
    model.train()
    memory.reset_peak()   # measure training, not the load spike; the resident model still counts
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = times[args.warmup:]
    tokens = int(data["attention_mask"].sum())
    config = model.config
    return {"lib": lib, "trainable": sum(p.numel() for p in params), "first_loss": losses[0],
            "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "seconds_per_step": sum(timed) / len(timed), "tokens_per_s": tokens * len(timed) / sum(timed),
            "peak_rss_mb": memory.peak() / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="fresh processes per library, alternating")
    p.add_argument("--release-memory", action="store_true", help="lorakit's opt-in glibc mmap threshold")
    p.add_argument("--out", default="bench/results/train_step.json")
    p.add_argument("--worker", choices=["lorakit", "peft"])
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    runs = {"peft": [], "lorakit": []}
    for _ in range(args.repeat):          # alternate the libraries so machine noise hits both alike
        for lib in runs:
            cmd = [sys.executable, __file__, "--worker", lib] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if out.returncode:
                sys.exit(f"{lib} worker failed:\n{out.stderr[-3000:]}")
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the least disturbed run of each library: the fastest one
    results = {lib: max(rs, key=lambda r: r["tokens_per_s"]) for lib, rs in runs.items()}
    limits = roofline.machine()            # measured after the workers, so it does not disturb them
    for r in results.values():
        flops = roofline.train_flops_per_token(r["base_params"], r["layers"], r["hidden"], args.seq, r["trainable"])
        r["model_flops_per_token"] = flops
        r["mfu_fp32"] = roofline.mfu(r["tokens_per_s"], flops, limits["fp32_gflops"])
    lk, pf = results["lorakit"], results["peft"]
    ratios = {"tokens_per_s": lk["tokens_per_s"] / pf["tokens_per_s"], "peak_rss": lk["peak_rss_mb"] / pf["peak_rss_mb"]}
    print(f"{args.model}, r={args.r}, all-linear, batch {args.batch}x{args.seq}, fp32, {lk['threads']} threads")
    print(f"{'':10}{'tokens/s':>10}{'s/step':>9}{'peak RSS MB':>13}{'first loss':>12}{'trainable':>12}")
    for r in (pf, lk):
        print(f"{r['lib']:10}{r['tokens_per_s']:>10.0f}{r['seconds_per_step']:>9.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['first_loss']:>12.4f}{r['trainable']:>12,}")
    print(f"lorakit / peft: tokens/s x{ratios['tokens_per_s']:.2f}, peak RSS x{ratios['peak_rss']:.2f}")
    cpu = limits["cpu"]
    print(f"{cpu['model']} ({', '.join(cpu['flags'])}): fp32 {limits['fp32_gflops']:.0f} GFLOP/s, bf16 "
          f"{limits['bf16_gflops']:.0f} GFLOP/s ({limits['matmul_n']}^3 matmul), copy {limits['bandwidth_gbs']:.1f} GB/s")
    print("MFU of the fp32 peak (PaLM/nanoGPT model FLOPs; frozen base: 4N + 6N_adapter + 12LHT per token): "
          + ", ".join(f"{r['lib']} {r['mfu_fp32']:.3f}" for r in (pf, lk)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": limits, "results": results, "all_runs": runs,
                                          "ratios": ratios},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
