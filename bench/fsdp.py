"""Past one device on CPU: lorakit's FSDP2 run against its own DDP, one process, and peft sharded alike.

The same job everywhere: SmolLM2-135M, LoRA r=16 all-linear (and full fine-tuning for lorakit),
the carrier-policy rows cut to --max-len, global batch --batch rows, AdamW, gloo on CPU (NCCL on
CUDA, unchanged). Each configuration is a fresh process group; configurations alternate over
--repeat rounds and the fastest round of each is kept. Steady tokens/s leaves out the first step.

    .venv/bin/python bench/fsdp.py                  # lora N=1, DDP N=2, FSDP N=2; peft N=1, N=2 FSDP2
    .venv/bin/python bench/fsdp.py --methods lora,full --repeat 2

The peer: accelerate 1.16 turns its FSDP plugin on only for accelerator devices (its state.py
sets DistributedType.FSDP for MULTI_GPU/NPU/XPU/..., never MULTI_CPU: on CPU a plugin is ignored
and the run is plain DDP). So the peft runs here shard the peft model with the same FSDP2 calls
accelerate's fsdp_version=2 with transformer_based_wrap makes (each decoder layer, then the
root), and step it the way peft's users do (the transformers forward with labels, its mean loss).
Per rank: the RSS high-water mark above the process's pre-load baseline (model included), and for
lorakit also the traced peak of live tensor bytes (`--trace-memory`, a separate run, ~5% slower)
beside the planner's per-rank prediction, which counts what the tracer counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from roofline import cpu_info

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def steady(rows: list[dict]) -> float:
    """Tokens/s over steps 2..n from lorakit's metrics rows (each carries cumulative tokens/s)."""
    cum, t = 0, []
    for r in rows:
        cum += r["tokens"]
        t.append((cum, cum / r["tokens_per_s"]))
    (c0, t0), (c1, t1) = t[0], t[-1]
    return (c1 - c0) / (t1 - t0)


def lorakit_job(args, data: Path, method: str, ranks: int, fsdp: bool, trace: bool, out: Path) -> dict:
    flags = ["--model", args.model, "--data", str(data), "--out", str(out), "--steps", str(args.steps),
             "--batch-size", str(args.batch), "--max-len", str(args.max_len), "--lr", "1e-4", "--no-progress",
             "--warmup", "0", "--method", method, *(["--rank", str(args.r), "--alpha", str(2 * args.r),
                                                     "--targets", "all-linear"] if method == "lora" else [])]
    flags += ["--fsdp"] * fsdp + ["--trace-memory"] * trace
    launch = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}", "-m", "lorakit", "train"] if ranks > 1 \
        else [sys.executable, "-m", "lorakit", "train"]
    _run(launch + flags, ranks)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ranks_ = summary.get("per_rank") or [{"peak_memory": summary["peak_memory"],
                                          "model_state_bytes": summary["model_state_bytes"]}]
    return {"tokens_per_s": steady(metrics), "peak_rss_mb": [r["peak_memory"]["peak_above_baseline_bytes"] / 2**20
                                                             for r in ranks_],
            "traced_peak_mb": [r["peak_memory"]["tensor_peak_bytes"] / 2**20 for r in ranks_] if trace else None,
            "model_states_mb": [r["model_state_bytes"] / 2**20 for r in ranks_],
            "planned_mb": summary["planned_memory"].get("total_bytes", 0) / 2**20, "first_loss": metrics[0]["loss"],
            "final_loss": metrics[-1]["loss"]}


def _run(cmd: list[str], ranks: int) -> None:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT / "src"),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


def peft_job(args, data: Path, ranks: int) -> dict:
    cmd = [__file__, "--peft-worker", "--data", str(data), *[a for a in sys.argv[1:] if a != "--peft-worker"]]
    launch = [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT / "src"),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    proc = subprocess.run(launch + cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"peft worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peft_worker(args) -> None:
    """peft's LoRA on the same rows and batches; FSDP2 over each decoder layer and the root when N > 1."""
    import peft
    import torch

    import lorakit as lk
    from lorakit.training import distributed, fsdp
    from lorakit.training.data import collate, load_dataset
    from lorakit.training.memory import PeakMemory

    rank, world = distributed.init()
    torch.manual_seed(0)
    memory = PeakMemory().start()
    model, tokenizer = lk.load_base(args.model)
    rows = load_dataset(args.data, tokenizer, args.max_len, progress=False).examples
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    if world > 1:
        fsdp.shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))   # lorakit's epoch-0 order
    memory.reset_peak()
    model.train()
    marks, losses = [], []
    for step in range(args.steps):
        batch = [rows[j] for j in order[step * args.batch:(step + 1) * args.batch].tolist()]
        mine = collate(batch[rank::world], tokenizer.pad_token_id)
        loss = model(**mine, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        marks.append((sum(len(ex.input_ids) for ex in batch), time.perf_counter()))
    tokens = sum(n for n, _ in marks[1:])
    peaks = distributed.gather_objects(memory.peak() / 2**20)
    if distributed.is_main():
        print(json.dumps({"tokens_per_s": tokens / (marks[-1][1] - marks[0][1]), "peak_rss_mb": peaks,
                          "first_loss": losses[0], "final_loss": losses[-1]}))
    distributed.finish()


def table(results: dict, args) -> str:
    lines = [f"| job | N | tokens/s | vs 1 process | peak RSS / rank (MB) | traced peak / rank (MB) | planned / rank (MB) "
             "| model states / rank (MB) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lib, method = name.split(" ")[:2]
        base = results.get(f"{lib} {method} N=1") or r
        traced = ", ".join(f"{x:.0f}" for x in r["traced_peak_mb"]) if r.get("traced_peak_mb") else "-"
        states = ", ".join(f"{x:.0f}" for x in r["model_states_mb"]) if r.get("model_states_mb") else "-"
        planned = f"{r['planned_mb']:.0f}" if r.get("planned_mb") else "-"
        lines.append(f"| {name} | {r['ranks']} | {r['tokens_per_s']:.0f} | x{r['tokens_per_s'] / base['tokens_per_s']:.2f} "
                     f"| {', '.join(f'{x:.0f}' for x in r['peak_rss_mb'])} | {traced} | {planned} | {states} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", default="lora", help="comma-separated: lora, full")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows per step, over all ranks)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating the configurations")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-trace", action="store_true", help="skip the traced runs (per-rank peak vs the plan)")
    p.add_argument("--out", default="bench/results/fsdp.json")
    p.add_argument("--data", default=None)
    p.add_argument("--peft-worker", action="store_true")
    args = p.parse_args()
    if args.peft_worker:
        return peft_worker(args)
    from lorakit.datasets import write

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "lorakit-bench-fsdp"
    data = Path(args.data) if args.data else write(work / "data", n_train=64, n_heldout=4, seed=0)["train"]
    jobs = {}
    for method in args.methods.split(","):
        jobs |= {f"lorakit {method} N=1": (method, 1, False), f"lorakit {method} DDP N=2": (method, 2, False),
                 f"lorakit {method} FSDP N=2": (method, 2, True)}
    runs: dict[str, list] = {name: [] for name in jobs} | ({} if args.no_peft else {"peft lora N=1": [],
                                                                                     "peft lora FSDP2 N=2": []})
    for _ in range(args.repeat):
        for name in runs:
            print(f"running {name}", file=sys.stderr)
            if name in jobs:
                method, ranks, sharded = jobs[name]
                runs[name].append(lorakit_job(args, data, method, ranks, sharded, False, work / "run") | {"ranks": ranks})
            else:
                ranks = 2 if "N=2" in name else 1
                runs[name].append(peft_job(args, data, ranks) | {"ranks": ranks})
    results = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    for name, (method, ranks, sharded) in {} if args.no_trace else jobs.items():   # per-rank peak vs the plan
        print(f"tracing {name}", file=sys.stderr)
        traced = lorakit_job(args, data, method, ranks, sharded, True, work / "traced")
        results[name] |= {"traced_peak_mb": traced["traced_peak_mb"], "planned_mb": traced["planned_mb"]}
    text = table(results, args)
    print(f"{args.model}, batch {args.batch}x{args.max_len} tokens, {args.steps} steps, LoRA r={args.r} all-linear; "
          f"{cpu_info()}\n{text}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu_info(), "results": results, "all_runs": runs,
                                          "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
