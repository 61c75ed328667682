"""A LoRA training step, lorakit vs peft, on the same model, batch and config, in one run.

Each library runs in its own fresh process (so peak RSS is its own), on the same SFT batch: rows
of the carrier-policy set padded or cut to --seq tokens, loss only on the answer tokens. Both use
torch.optim.AdamW on the adapter parameters. peft runs the way its users run it: the transformers
forward with labels (full-vocabulary logits at every position). lorakit runs `loss_sum`, which
applies the output head only where a label exists.

--precision bf16 runs both the way bf16 LoRA is run in practice: the frozen base stored in bf16,
adapters (and so the optimizer state) in fp32 (peft's autocast_adapter_dtype default), the step
under torch.autocast(bfloat16). Its MFU is against the measured bf16 peak.

    .venv/bin/python bench/train_step.py                    # SmolLM2-135M, r=16, all-linear, batch 4x128, fp32
    .venv/bin/python bench/train_step.py --precision bf16   # the same in bf16
    .venv/bin/python bench/train_step.py --runtime tuned    # both libraries under LORAKIT_RUNTIME=tuned's runtime
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
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


def forward_overhead(body, data, bf16: bool, disabled, repeat: int = 4) -> float:
    """The unmerged adapters' cost over the bare model on the decoder stack's forward (no grad): the
    same process and model, adapters disabled and enabled alternately, the best of `repeat` each.
    The FLOPs put it at N_adapter / N."""
    import torch

    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(2 * repeat + 2):
            on = i % 2 == 1
            with nullcontext() if on else disabled():
                t = time.perf_counter()
                body(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
                best[on] = min(best[on], time.perf_counter() - t)
    return best[True] / best[False] - 1


def worker(lib: str, args) -> dict:
    import torch

    from lorakit import runtime
    from lorakit.training.memory import PeakMemory

    import lorakit as lk

    if lib == "peft":
        import peft  # imported before the baseline, like lorakit: library code is not training memory

    torch.manual_seed(0)
    memory = PeakMemory().start()

    bf16 = args.precision == "bf16"
    model, tokenizer = lk.load_base(args.model, dtype="bfloat16" if bf16 else "float32")
    data = batch(tokenizer, args.batch, args.seq)
    body = model.model                     # the decoder stack: the forward both libraries share
    if lib == "lorakit":
        from lorakit.training.memory import return_freed_memory
        from lorakit.training.trainer import loss_sum

        if args.release_memory:
            return_freed_memory()   # what the Trainer does with --release-memory

        lk.inject(model, lk.LoraConfig(r=args.r, alpha=2 * args.r, targets="all-linear"))

        from lorakit.training.attention import fp32_backward

        def step_loss():
            with fp32_backward() if bf16 else nullcontext():   # what the Trainer does under bf16
                s, n = loss_sum(model, data)
            return s / n
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))

        def step_loss():
            return model(**data, use_cache=False).loss
    overhead = forward_overhead(body, data, bf16, (lambda: lk.disabled(model)) if lib == "lorakit"
                                else model.disable_adapter)
    model.train()
    memory.reset_peak()   # measure training, not the load spike; the resident model still counts
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, times = [], []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with autocast:
            loss = step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = times[args.warmup:]
    tokens = int(data["attention_mask"].sum())
    config = model.config
    assert {p.dtype for p in params} == {torch.float32}, f"{lib}: adapters not in fp32"
    return {"lib": lib, "trainable": sum(p.numel() for p in params), "first_loss": losses[0], "losses": losses,
            "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "forward_overhead": overhead,
            "seconds_per_step": sum(timed) / len(timed), "tokens_per_s": tokens * len(timed) / sum(timed),
            "peak_rss_mb": memory.peak() / 2**20, "threads": torch.get_num_threads(),
            "runtime": runtime.loaded_libraries()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: base stored in bf16, fp32 adapters, autocast (both libraries)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="fresh processes per library, alternating")
    p.add_argument("--release-memory", action="store_true", help="lorakit's opt-in glibc mmap threshold")
    p.add_argument("--runtime", choices=["stock", "tuned"], default="stock",
                   help="tuned: both workers under the runtime LORAKIT_RUNTIME=tuned sets up (Intel OpenMP, tcmalloc)")
    p.add_argument("--out", default=None, help="default bench/results/train_step[_bf16][_tuned].json")
    p.add_argument("--worker", choices=["lorakit", "peft"])
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    from lorakit import runtime

    env = dict(os.environ, TQDM_DISABLE="1")
    env = runtime.tuned_environment(env) if args.runtime == "tuned" else env
    runs = {"peft": [], "lorakit": []}
    for _ in range(args.repeat):          # alternate the libraries so machine noise hits both alike
        for lib in runs:
            cmd = [sys.executable, __file__, "--worker", lib] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{lib} worker failed:\n{out.stderr[-3000:]}")
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the least disturbed run of each library: the fastest one
    results = {lib: max(rs, key=lambda r: r["tokens_per_s"]) for lib, rs in runs.items()}
    limits = roofline.machine()            # measured after the workers, so it does not disturb them
    for r in results.values():
        flops = roofline.train_flops_per_token(r["base_params"], r["layers"], r["hidden"], args.seq, r["trainable"])
        r["model_flops_per_token"] = flops
        r["mfu"] = roofline.mfu(r["tokens_per_s"], flops, limits[f"{args.precision}_gflops"])
    lk, pf = results["lorakit"], results["peft"]
    ratios = {"tokens_per_s": lk["tokens_per_s"] / pf["tokens_per_s"], "peak_rss": lk["peak_rss_mb"] / pf["peak_rss_mb"]}
    print(f"{args.model}, r={args.r}, all-linear, batch {args.batch}x{args.seq}, {args.precision}, {lk['threads']} threads, "
          f"{args.runtime} runtime ({', '.join(lk['runtime']) or 'GNU OpenMP, glibc malloc'})")
    print(f"{'':10}{'tokens/s':>10}{'s/step':>9}{'peak RSS MB':>13}{'first loss':>12}{'trainable':>12}")
    for r in (pf, lk):
        print(f"{r['lib']:10}{r['tokens_per_s']:>10.0f}{r['seconds_per_step']:>9.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['first_loss']:>12.4f}{r['trainable']:>12,}")
    print(f"lorakit / peft: tokens/s x{ratios['tokens_per_s']:.2f}, peak RSS x{ratios['peak_rss']:.2f}")
    cpu = limits["cpu"]
    print(f"{cpu['model']} ({', '.join(cpu['flags'])}): fp32 {limits['fp32_gflops']:.0f} GFLOP/s, bf16 "
          f"{limits['bf16_gflops']:.0f} GFLOP/s ({limits['matmul_n']}^3 matmul), copy {limits['bandwidth_gbs']:.1f} GB/s")
    share = lk["trainable"] / lk["base_params"]
    print(f"unmerged adapters' forward cost over the bare decoder (FLOP share {share:.1%}): "
          + ", ".join(f"{r['lib']} +{r['forward_overhead']:.1%}" for r in (pf, lk)))
    print(f"MFU of the {args.precision} peak (PaLM/nanoGPT model FLOPs; frozen base: 4N + 6N_adapter + 12LHT per "
          "token): " + ", ".join(f"{r['lib']} {r['mfu']:.3f}" for r in (pf, lk)))
    print("losses: " + "; ".join(f"{r['lib']} " + " ".join(f"{x:.4f}" for x in r["losses"]) for r in (pf, lk)))
    suffix = ("_bf16" if args.precision == "bf16" else "") + ("_tuned" if args.runtime == "tuned" else "")
    args.out = args.out or f"bench/results/train_step{suffix}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": limits, "results": results, "all_runs": runs,
                                          "ratios": ratios},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
