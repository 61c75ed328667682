"""`lorakit plan` against measurement: planned training peak vs what `lorakit train` measures.

Each configuration runs `lorakit train` in a fresh process on SmolLM2-135M-Instruct with packed
carrier-policy rows (every micro-batch is exactly batch x max-len tokens, as the planner assumes),
fp32, and `--trace-memory`, and reads its summary.json:

- planned: the planner's peak for that run (`planned_memory.total_bytes`);
- traced: the most tensor bytes alive at once (the tracer in `lorakit.training.memory`), the number
  the planner models and what `torch.cuda.max_memory_allocated` reports on a GPU;
- RSS: the kernel's high-water mark above the pre-model baseline, with glibc's default malloc and
  with `--release-memory` (freed activations returned to the OS).

    .venv/bin/python bench/plan_vs_measured.py          # writes bench/results/plan_vs_measured.{json,png}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "lora r=16 all-linear": ["--method", "lora", "--rank", "16", "--alpha", "32", "--targets", "all-linear"],
    "lora + grad checkpointing": ["--method", "lora", "--rank", "16", "--alpha", "32", "--grad-checkpointing"],
    "full fine-tuning": ["--method", "full"],
    "full + grad accumulation 2": ["--method", "full", "--grad-accum", "2"],
}


def run(name: str, extra: list[str], release: bool, data: Path, work: Path, args) -> dict:
    out = work / f"{name.replace(' ', '_')}-{'release' if release else 'default'}"
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", args.model, "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch), "--max-len", str(args.seq), "--packing",
           "--lr", "1e-5", "--trace-memory", "--no-progress", *extra] + (["--release-memory"] if release else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    p, m = s["planned_memory"], s["peak_memory"]
    return {"config": name, "release_memory": release, "planned_mb": p["total_bytes"] / 1e6,
            "traced_mb": m["tensor_peak_bytes"] / 1e6, "rss_mb": m["peak_above_baseline_bytes"] / 1e6,
            "traced_over_planned": m["tensor_peak_bytes"] / p["total_bytes"],
            "rss_over_planned": m["peak_above_baseline_bytes"] / p["total_bytes"],
            "s_per_step": s["seconds"] / s["steps"], "peak_rule": p["peak_rule"],
            "components_mb": {c["component"]: c["bytes"] / 1e6 for c in p["components"]}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["release_memory"]): r for r in rows}
    series = [("planned", lambda n: by[(n, True)]["planned_mb"]),
              ("traced tensors", lambda n: by[(n, True)]["traced_mb"]),
              ("RSS, --release-memory", lambda n: by[(n, True)]["rss_mb"]),
              ("RSS, default malloc", lambda n: by[(n, False)]["rss_mb"])]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.8 / len(series)
    for k, (label, get) in enumerate(series):
        ax.bar([i + k * width for i in range(len(names))], [get(n) for n in names], width, label=label)
    ax.set_xticks([i + 1.5 * width for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("peak training memory (MB)")
    ax.set_title("SmolLM2-135M, fp32, packed 4x128: planned vs measured")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_vs_measured.json"))
    args = ap.parse_args()

    from tqdm import tqdm

    from lorakit.datasets import write

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write(Path(tmp) / "data", n_train=200, n_heldout=4, seed=1)["train"]
        jobs = [(n, e, r) for n, e in CONFIGS.items() for r in (True, False)]
        for name, extra, release in tqdm(jobs, desc="runs", unit="run"):
            rows.append(run(name, extra, release, data, Path(tmp), args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                               "rows": rows}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("| configuration | planned MB | traced MB (ratio) | RSS --release-memory (ratio) | RSS default malloc (ratio) |")
    print("|---|---|---|---|---|")
    by = {(r["config"], r["release_memory"]): r for r in rows}
    for name in CONFIGS:
        a, b = by[(name, True)], by[(name, False)]
        print(f"| {name} | {a['planned_mb']:,.0f} | {a['traced_mb']:,.0f} (x{a['traced_over_planned']:.2f}) | "
              f"{a['rss_mb']:,.0f} (x{a['rss_over_planned']:.2f}) | {b['rss_mb']:,.0f} (x{b['rss_over_planned']:.2f}) |")


if __name__ == "__main__":
    main()
