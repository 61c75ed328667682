"""The CPU runtime, measured: lorakit as installed (GNU OpenMP, glibc malloc) against
`LORAKIT_RUNTIME=tuned` (Intel OpenMP preloaded, KMP_BLOCKTIME=1; tcmalloc too where the system has
it), on the two jobs that matter: serving 16 concurrent requests on 16 adapters (bench/serve.py's
(b)/(e) lorakit side, plain) and a LoRA training step (bench/train_step.py's lorakit worker).
Alternating rounds, fresh processes, medians; the CPU and its ISA flags are recorded, because which
runtime wins is a property of the CPU.

    .venv/bin/python bench/runtime.py               # ~8 minutes; writes bench/results/runtime.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from roofline import cpu_info

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "src"))


def environment(mode: str, threads: int) -> dict:
    from lorakit import runtime

    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(HERE.parent / "src"))
    env.pop("LD_PRELOAD", None)
    env.pop(runtime.CHILD, None)
    return runtime.tuned_environment(env) if mode == "tuned" else env


def run(cmd: list[str], env: dict) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(HERE / "results" / "runtime.json"))
    args = p.parse_args()
    import serve as serve_bench                      # bench/serve.py: its adapters and its worker

    folder = Path(tempfile.mkdtemp(prefix="lorakit-runtime-"))
    serve_bench.make_adapters("smollm2-135m-instruct", folder, 16, 16, 32)
    jobs = {"serve 16 adapters (tok/s)": [sys.executable, str(HERE / "serve.py"), "--worker", "e2e-lorakit", "--dir",
                                          str(folder), "--variant", "plain", "--threads", str(args.threads)],
            "train step LoRA (tok/s)": [sys.executable, str(HERE / "train_step.py"), "--worker", "lorakit",
                                        "--steps", "4", "--warmup", "1"]}
    results = {job: {"stock": [], "tuned": []} for job in jobs}
    for i in range(args.rounds):
        for job, cmd in jobs.items():
            for mode in ("stock", "tuned") if i % 2 == 0 else ("tuned", "stock"):
                print(f"round {i + 1}: {job}, {mode}", file=sys.stderr)
                results[job][mode].append(run(cmd, environment(mode, args.threads))["tokens_per_s"])
    cpu = cpu_info()
    lines = [f"{cpu.get('model')} ({', '.join(cpu.get('flags', []))}), {args.threads} threads, median of {args.rounds}",
             "| job | stock | tuned | tuned / stock |", "|---|---:|---:|---:|"]
    for job, by in results.items():
        stock, tuned = statistics.median(by["stock"]), statistics.median(by["tuned"])
        lines.append(f"| {job} | {stock:.1f} | {tuned:.1f} | x{tuned / stock:.2f} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "args": vars(args), "runs": results, "table": "\n".join(lines)},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
